"""The decode step in fewer ops (cpmgen/fused_decode.py, kernels/attention.cpp and block.cpp): the
fused attention gives the plain attention's values within rounding and the same cache contents;
the fused block gives bitwise the values of its modules, and the fused stack of blocks those of its
blocks; they run only where they should."""

from __future__ import annotations

import contextlib
import math
import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from cpmgen import kernels
from cpmgen.config import Settings
from cpmgen.fused_decode import (DecodeAttention, DecodeBlock, DecodeTransformer, FusedStep, KernelGeluMLP,
                                  KernelLayerNorm, fuse_decode)
from cpmgen.loading import load_model
from cpmgen.model import Attention, Block, CPMModel, KVCache, Transformer, decode_step
from cpmgen.synthetic import random_state_dict

from helpers import TINY, at_thread_counts, ops_run

pytestmark = pytest.mark.skipif(not kernels.loaded(), reason="the kernel library is not built")


def attentions(args, seed: int = 0) -> tuple[Attention, DecodeAttention]:
    torch.manual_seed(seed)
    plain = Attention(args).requires_grad_(False)
    return plain, DecodeAttention(plain)


def filled_caches(args, batch: int, slots: int) -> tuple[KVCache, KVCache]:
    """Two identical caches of random keys and values (stale entries past each row's position too)."""
    g = torch.Generator().manual_seed(1)
    shape = (batch, args.num_heads, slots, args.head_dim)
    k = [torch.randn(shape, generator=g) for _ in range(args.num_layers)]
    v = [torch.randn(shape, generator=g) for _ in range(args.num_layers)]
    return KVCache([t.clone() for t in k], [t.clone() for t in v]), KVCache(k, v)


def plain_transformer(blocks, final_layernorm) -> Transformer:
    """A Transformer (its own loop over the blocks) holding `blocks`."""
    transformer = Transformer.__new__(Transformer)
    nn.Module.__init__(transformer)
    transformer.layers, transformer.final_layernorm = nn.ModuleList(blocks), final_layernorm
    return transformer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# a multiple of the kernel's 8 lanes, one that is not, and the released models' 64 and 80 (compiled as fixed sizes)
@pytest.mark.parametrize("head_dim", [16, 20, 64, 80])
def test_one_token_steps_match_the_plain_attention(dtype, head_dim):
    """Rows at different positions (the model masks each to its own slots 0..position): the same
    outputs within rounding, and bitwise the same keys and values written at the same slots."""
    args = dataclasses.replace(TINY, hidden_size=4 * head_dim)
    plain, fused = attentions(args)
    plain, fused = plain.to(dtype), fused.to(dtype)
    batch, slots = 3, 40
    positions = torch.tensor([0, 17, 39])
    x = torch.randn(batch, 1, args.hidden_size, generator=torch.Generator().manual_seed(2)).to(dtype)
    plain_cache, fused_cache = filled_caches(args, batch, slots)
    keys = torch.arange(slots)
    mask = (keys[None, :] <= positions[:, None])[:, None, None, :]
    with torch.inference_mode():
        expected = plain(x, positions[:, None], mask, plain_cache, 1, slots)
        out = fused(x, positions[:, None], mask, fused_cache, 1, slots)
    assert out.dtype == dtype and out.shape == expected.shape
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), rtol=tolerance, atol=tolerance)
    assert torch.equal(fused_cache.k[1], plain_cache.k[1]) and torch.equal(fused_cache.v[1], plain_cache.v[1])
    assert torch.equal(fused_cache.k[0], plain_cache.k[0])  # other layers untouched


def test_scores_far_below_the_maximum_get_weight_zero():
    """A key whose score is far below the best one's gets weight 0 (e^-1000 underflows), as in torch."""
    args = dataclasses.replace(TINY, num_heads=1, hidden_size=16)
    plain, fused = attentions(args)
    q = torch.zeros(16)
    q[0] = 100.0
    k = torch.zeros(16)
    v = torch.arange(16.0)
    with torch.no_grad():
        plain.query_key_value.weight.zero_()
        plain.query_key_value.bias.copy_(torch.cat([q, k, v]))
    plain_cache, fused_cache = filled_caches(args, 1, 8)
    for cache in (plain_cache, fused_cache):
        cache.k[0][0, 0, :, 0] = torch.tensor([-50.0, 50.0, 0, 0, 0, 0, 0, 0])  # scores -1250, +1250
    x = torch.zeros(1, 1, 16)
    with torch.inference_mode():
        expected = plain(x, torch.tensor([2]), None, plain_cache, 0, 3)
        out = fused(x, torch.tensor([2]), None, fused_cache, 0, 3)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_position_outside_the_cache_is_refused():
    args = dataclasses.replace(TINY, num_layers=1)
    _, fused = attentions(args)
    cache, _ = filled_caches(args, 1, 8)
    with pytest.raises(RuntimeError, match="position 8 outside the cache's 8 slots"):
        with torch.inference_mode():
            fused(torch.zeros(1, 1, args.hidden_size), torch.tensor([8]), None, cache, 0, 9)


def test_prefill_and_the_recompute_run_the_causal_attention_kernel():
    """A window's prefill into the cache and the slow recompute without one run causal_attention
    (the cache's rows or the projection's, read alike) and cpmgen's GELU: the same bits as each
    other, the plain model's values within rounding. A masked forward keeps SDPA."""
    model = CPMModel(TINY)
    model.load_state_dict(random_state_dict(TINY, 0))
    model.eval().requires_grad_(False)
    ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        plain_cache = model.new_kv_cache(2, 16)
        plain = [model(ids, torch.arange(12), plain_cache), model(ids, torch.arange(12))]
        assert fuse_decode(model) == TINY.num_layers
        assert all(type(block.mlp) is KernelGeluMLP for block in model.transformer.layers)
        fused_cache = model.new_kv_cache(2, 16)
        ran = ops_run(lambda: model(ids, torch.arange(12), fused_cache))
        assert "cpmgen::causal_attention" in ran and "cpmgen::gelu_tanh_" in ran and "aten::gelu" not in ran
        fused = [model(ids, torch.arange(12), fused_cache), model(ids, torch.arange(12))]
        assert torch.equal(fused[0], fused[1])
        for a, b in zip(plain, fused):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fused_cache.k[1][:, :, :12], plain_cache.k[1][:, :, :12], rtol=1e-5, atol=1e-5)
        shifted = torch.arange(3, 15)  # positions 3..14: a mask, not plain causal
        assert "cpmgen::causal_attention" not in ops_run(lambda: model(ids, shifted))
        step = decode_step(model, ids[:, 0], torch.tensor([12, 12]), fused_cache)
        assert step.shape == (2, TINY.vocab_size)


@pytest.mark.parametrize("head_dim,heads", [(64, 3), (80, 2), (48, 2), (20, 3)])  # fixed-size and any-size loops
@pytest.mark.parametrize("tokens", [1, 2, 5, 33, 100, 1030])  # 1030: key rows a multiple of 4 KB apart unpadded
def test_the_causal_attention_is_sdpas_within_rounding_at_any_thread_count_and_stride(head_dim, heads, tokens):
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(2, tokens, 3 * heads * head_dim, generator=g) * 3
    q, k, v = (t.view(2, tokens, heads, head_dim).transpose(1, 2) for t in qkv.split(heads * head_dim, dim=-1))
    attend = kernels.op("causal_attention")
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    outputs = at_thread_counts(lambda: attend(q, k, v))
    out = outputs[0]
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    assert all(torch.equal(out, other) for other in outputs[1:])
    assert torch.equal(attend(q.contiguous(), k.contiguous(), v.contiguous()), out)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_the_gelu_kernel_is_within_16_ulp_of_the_exact_tanh_gelu():
    def gelu(t):  # the kernel works in place: on a copy here
        return kernels.op("gelu_tanh_")(t.clone())

    g = torch.Generator().manual_seed(9)
    x = torch.cat([torch.linspace(-30, 30, 600001), torch.randn(199_997, generator=g) * 3, torch.tensor([0.0, -0.0])])
    wide = x.double()  # 0.5 x (1 + tanh(u)) = x sigmoid(2u), which keeps its precision in double far below 0
    exact = wide * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (wide + 0.044715 * wide**3))
    assert torch.allclose(exact, torch.nn.functional.gelu(wide, approximate="tanh"), rtol=1e-12, atol=1e-15)
    outputs = at_thread_counts(lambda: gelu(x.view(8, -1)).reshape(-1), (1, 2))
    y = outputs[0]
    assert y.dtype == torch.float32 and torch.equal(y, outputs[1])
    ulp = 2.0 ** -23
    # 16 ulp where the values matter; far below 0, e^2u inherits the rounding of u (as any fp32 form does)
    assert ((y.double() - exact).abs() <= 16 * ulp * exact.abs().clamp(min=1e-3)).all()  # ATen: over 1000
    assert y[x > 10].equal(x[x > 10]) and (y[x < -10].abs() < 1e-30).all()  # the identity, and zero far below
    # bf16: computed in fp32 and rounded once
    b = (torch.randn(3, 3072, generator=g) * 4).bfloat16()
    assert torch.equal(gelu(b), gelu(b.float()).bfloat16())
    assert torch.isnan(gelu(torch.tensor([float("nan")]))).all()
    in_place = x.clone()  # what KernelGeluMLP and the block's step run: the same values, written over
    assert kernels.op("gelu_tanh_")(in_place) is in_place and torch.equal(in_place, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layer_norm_kernel_is_nn_layernorms_within_rounding_and_the_same_bits_for_a_row_anywhere(dtype):
    """KernelLayerNorm (what a CPU model's layer norms and the fused block run): within
    nn.LayerNorm's own rounding error of the exact values, rows far from 0 too, a length that is
    not a multiple of the kernel's 16 lanes too; and each row's bits whatever the other rows or
    the thread count."""
    g = torch.Generator().manual_seed(10)
    for hidden in (768, 100):
        norm = nn.LayerNorm(hidden)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(hidden, generator=g))
            norm.bias.copy_(torch.randn(hidden, generator=g))
        norm = norm.to(dtype)
        kernel = KernelLayerNorm(norm)
        assert kernel.weight is norm.weight and kernel.bias is norm.bias and kernel.eps == norm.eps
        x = (torch.randn(3, 300, hidden, generator=g) * 2 + 1000 * torch.rand(3, 300, 1, generator=g)).to(dtype)
        with torch.inference_mode():
            outputs = at_thread_counts(lambda: kernel(x), (1, 2, 3))
            y = outputs[0]
            assert y.dtype == dtype and all(torch.equal(y, other) for other in outputs[1:])
            assert torch.equal(kernel(x[1, 7:8]), y[1, 7:8]) and torch.equal(kernel(x[:, 5]), y[:, 5])  # one row, a strided view
            exact = nn.functional.layer_norm(x.double(), (hidden,), norm.weight.double(), norm.bias.double(), norm.eps)
            assert (y.double() - exact).abs().max() <= 1.5 * (norm(x).double() - exact).abs().max()
    with pytest.raises(RuntimeError, match="weight and bias must be"):
        kernels.op("layer_norm")(torch.randn(2, 8), torch.ones(8).bfloat16(), torch.zeros(8), 1e-5)


def test_a_fused_model_swaps_every_layer_norm():
    model = CPMModel(TINY)
    model.load_state_dict(random_state_dict(TINY, 0))
    fuse_decode(model)
    norms = [model.transformer.final_layernorm] + [getattr(block, name) for block in model.transformer.layers
                                                   for name in ("input_layernorm", "post_attention_layernorm")]
    assert all(type(norm) is KernelLayerNorm for norm in norms)
    assert "cpmgen::layer_norm" in ops_run(lambda: model(torch.tensor([[1, 2, 3]]), torch.arange(3)))


def test_the_causal_attention_refuses_what_it_does_not_take():
    attend = kernels.op("causal_attention")
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match="q, k and v must be \\[batch, heads, tokens, head_dim\\] of one shape"):
        attend(q, torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16))
    with pytest.raises(RuntimeError, match="must be fp32 with each head_dim row contiguous"):
        attend(q.bfloat16(), q.bfloat16(), q.bfloat16())


# every kind in fp32 and bf16; oneDNN bf16 needs AVX-512 (skipped without it). Six rows: more than
# the GEMV takes (its blocks then run op by op) and than the int kernels' four rows a pass.
@pytest.mark.parametrize("batch", [2, 6])
@pytest.mark.parametrize("kind,dtype", [(kind, dtype) for kind in ("plain", "onednn", "gemv-avx512bf16", "gemv-avx2",
                                                                   "gemv-generic", "int8", "int4")
                                        for dtype in (torch.float32, torch.bfloat16)])
def test_the_fused_block_gives_the_bits_of_its_modules(kind, dtype, batch):
    """Prefill, then one-token steps with the rows at different positions: the logits of the model
    with DecodeBlock equal bitwise those of the same model running its blocks' modules, for every
    kind of linear the op runs (the GEMV in each form this CPU runs)."""
    kind, _, gemv_form = kind.partition("-")
    if gemv_form and gemv_form not in kernels.gemv_forms():
        pytest.skip(f"this CPU does not run the {gemv_form} GEMV")
    with kernels.use_gemv(gemv_form) if gemv_form else contextlib.nullcontext():
        fused_block_against_its_modules(kind, dtype, batch)


def fused_block_against_its_modules(kind: str, dtype: torch.dtype, batch: int) -> None:
    from cpmgen.prepack import chosen_form, prepack_linears
    from cpmgen.quantize import quantize_model

    args = dataclasses.replace(TINY, hidden_size=128, num_heads=4)
    model = CPMModel(args)
    model.load_state_dict(random_state_dict(args, 0))
    model.eval().requires_grad_(False).to(dtype)
    if kind in ("onednn", "gemv"):
        if chosen_form(torch.device("cpu"), dtype, kind) is None:
            pytest.skip(f"no {kind} {dtype} linear on this CPU")
        prepack_linears(model, form=kind)
    elif kind != "plain":
        quantize_model(model, kind)
    assert fuse_decode(model) == args.num_layers
    stack, whole_step = model.transformer, model.fused_step
    fused = list(stack.layers)
    assert type(stack) is DecodeTransformer and all(type(block) is DecodeBlock for block in fused)
    assert type(whole_step) is FusedStep
    modules = [Block.__new__(Block) for _ in fused]  # the same modules, run one by one
    for plain, block in zip(modules, fused):
        plain.__dict__.update(block.__dict__)
    ids = torch.randint(0, args.vocab_size, (batch, 20), generator=torch.Generator().manual_seed(4))
    outputs = []
    # the blocks' modules; the DecodeBlocks called one by one; all of them in one call; the whole
    # step (embeddings, blocks, final norm, output layer) in one call
    for transformer, step in ((plain_transformer(modules, stack.final_layernorm), None),
                              (plain_transformer(fused, stack.final_layernorm), None), (stack, None),
                              (stack, whole_step)):
        model.transformer, model.fused_step = transformer, step
        with torch.inference_mode():
            cache = model.new_kv_cache(batch, 32)
            logits = [model(ids[:, :12], torch.arange(12), cache)[:, -1]]
            logits += [decode_step(model, ids[:, i], torch.arange(batch) + i, cache) for i in range(12, 16)]
            # every row at one position (the plan's single index for all of them)
            logits += [decode_step(model, ids[:, i], torch.full((batch,), i), cache) for i in range(16, 20)]
        outputs.append(torch.stack(logits))
    assert outputs[0].dtype == dtype and all(torch.equal(outputs[0], other) for other in outputs[1:])


@pytest.mark.parametrize("kind", ["modules", "gemv", "int8", "int4"])
def test_a_bf16_models_bf16_cache_gives_the_logits_of_an_fp32_cache(kind):
    """A bf16 model keeps its keys and values in a bf16 cache (half the bytes a step reads): they
    are bf16 values, so a prefill and one-token steps at different positions give bitwise the
    logits the same model gives with an fp32 cache, which ends up holding the same values. For the
    modules' own attention and for the fused step of each kind of linear it runs in bf16."""
    from cpmgen.prepack import chosen_form, prepack_linears
    from cpmgen.quantize import quantize_model

    args = dataclasses.replace(TINY, hidden_size=128, num_heads=4)
    model = CPMModel(args)
    model.load_state_dict(random_state_dict(args, 0))
    model.eval().requires_grad_(False).to(torch.bfloat16)
    if kind == "gemv":
        if chosen_form(torch.device("cpu"), torch.bfloat16, "gemv") is None:
            pytest.skip("no gemv bf16 linear on this CPU")
        prepack_linears(model, form="gemv")
    elif kind != "modules":
        quantize_model(model, kind)
    if kind != "modules":
        assert fuse_decode(model) == args.num_layers
    batch, slots = 2, 32
    caches = [model.new_kv_cache(batch, slots),
              KVCache.allocate(args.num_layers, batch, args.num_heads, slots, args.head_dim, torch.float32, "cpu")]
    assert caches[0].k[0].dtype == torch.bfloat16 and 2 * caches[0].nbytes == caches[1].nbytes
    ids = torch.randint(0, args.vocab_size, (batch, 20), generator=torch.Generator().manual_seed(6))
    outputs = []
    for cache in caches:
        with torch.inference_mode():
            logits = [model(ids[:, :12], torch.arange(12), cache)[:, -1]]
            logits += [decode_step(model, ids[:, i], torch.arange(batch) + i, cache) for i in range(12, 20)]
        outputs.append(torch.stack(logits))
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(bf16.float(), fp32) for bf16, fp32 in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v))


def test_tensor_parallel_blocks_and_fp16_keep_their_modules():
    """Row-parallel linears all-reduce, which the op does not: such blocks keep their own forward
    (the attention is still fused). fp16, which the ops do not take, keeps the plain model."""
    from cpmgen.parallel import RowParallelLinear

    model = CPMModel(TINY)
    model.load_state_dict(random_state_dict(TINY, 0))
    block = model.transformer.layers[0]
    block.attention.dense = RowParallelLinear(TINY.hidden_size, TINY.hidden_size)
    assert fuse_decode(model) == TINY.num_layers
    assert type(model.transformer.layers[0]) is Block and type(model.transformer.layers[0].attention) is DecodeAttention
    assert type(model.transformer.layers[0].input_layernorm) is KernelLayerNorm and not DecodeBlock.fits(block)
    assert type(model.transformer.layers[1]) is DecodeBlock
    assert type(model.transformer) is Transformer  # not every block is a DecodeBlock: each runs its own
    assert model.fused_step is None
    half = CPMModel(TINY).to(torch.float16)
    assert fuse_decode(half) == 0 and type(half.transformer.layers[0]) is Block and half.fused_step is None


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_a_loaded_cpu_model_runs_its_decode_step_fused(write_ckpt, quantize):
    settings = Settings()
    settings.model.path = str(write_ckpt())
    settings.runtime.quantize = quantize
    model = load_model(settings).model
    assert all(type(layer) is DecodeBlock and type(layer.attention) is DecodeAttention for layer in model.transformer.layers)
    assert type(model.transformer) is DecodeTransformer and type(model.fused_step) is FusedStep
    assert not any(name.startswith("fused_step") for name in model.state_dict())  # it holds no tensors of its own


def test_the_whole_step_refuses_a_token_outside_the_vocabulary():
    model = CPMModel(TINY)
    model.load_state_dict(random_state_dict(TINY, 0))
    model.eval().requires_grad_(False)
    fuse_decode(model)
    cache = model.new_kv_cache(1, 8)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=f"token id {TINY.vocab_size} outside the vocabulary"):
        decode_step(model, torch.tensor([TINY.vocab_size]), torch.tensor([0]), cache)


def test_a_fused_model_deep_copies_into_one_of_its_own():
    """copy.deepcopy (as a converter does before changing a model) gives a model whose blocks run
    their own copied tensors: the same logits, and changing the copy leaves the original alone."""
    model = CPMModel(TINY)
    model.load_state_dict(random_state_dict(TINY, 0))
    model.eval().requires_grad_(False)
    fuse_decode(model)
    twin = copy.deepcopy(model)
    assert type(twin.transformer) is DecodeTransformer and all(type(layer) is DecodeBlock for layer in twin.transformer.layers)
    assert type(twin.fused_step) is FusedStep and twin.fused_step.sources[2] is twin.transformer
    ids = torch.randint(0, TINY.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    logits = []
    for m in (model, twin):
        with torch.inference_mode():
            cache = m.new_kv_cache(1, 16)
            m(ids[:, :8], torch.arange(8), cache)
            logits.append(decode_step(m, ids[:, 8], torch.tensor([8]), cache))
    assert torch.equal(logits[0], logits[1])
    twin.transformer.layers[0].mlp.dense_4h_to_h.weight.zero_()
    with torch.inference_mode():
        cache = twin.new_kv_cache(1, 16)
        twin(ids[:, :8], torch.arange(8), cache)
        assert not torch.equal(decode_step(twin, ids[:, 8], torch.tensor([8]), cache), logits[0])
        cache = model.new_kv_cache(1, 16)
        model(ids[:, :8], torch.arange(8), cache)
        assert torch.equal(decode_step(model, ids[:, 8], torch.tensor([8]), cache), logits[0])


@pytest.mark.parametrize("kind", ["gemv", "int8"])
def test_steps_under_inference_mode_then_no_grad_give_the_same_logits(kind):
    """A block's step keeps its intermediate values in buffers from one step to the next: a step
    under torch.no_grad after steps under inference mode (and back) writes them too, with the same
    logits (a buffer made in inference mode could not be written outside it: the process ended)."""
    from cpmgen.prepack import chosen_form, prepack_linears
    from cpmgen.quantize import quantize_model

    model = CPMModel(TINY)
    model.load_state_dict(random_state_dict(TINY, 0))
    model.eval().requires_grad_(False)
    if kind == "gemv":
        if chosen_form(torch.device("cpu"), torch.float32, "gemv") is None:
            pytest.skip("no gemv linear on this CPU")
        prepack_linears(model, form="gemv")
    else:
        quantize_model(model, kind)
    assert fuse_decode(model) == TINY.num_layers
    ids = torch.randint(0, TINY.vocab_size, (1, 9), generator=torch.Generator().manual_seed(5))
    logits = []
    for mode in (torch.inference_mode, torch.no_grad, torch.inference_mode):
        with mode():
            cache = model.new_kv_cache(1, 16)
            model(ids[:, :8], torch.arange(8), cache)
            logits.append(decode_step(model, ids[:, 8], torch.tensor([8]), cache))
    assert torch.equal(logits[0], logits[1]) and torch.equal(logits[0], logits[2])
