"""Int8 and int4 linears: the weight round trip, the C++ kernel against the torch reference (bitwise),
the layers against their dequantized weights, the model against fp32, freed float weights,
fast == slow generation, and tensor parallel."""

from __future__ import annotations

import copy
import subprocess
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import cpmgen.quantize
from cpmgen.checkpoint import splits
from cpmgen.generate import Stats, generate
from cpmgen import kernels
from cpmgen.config import Settings
from cpmgen.fused_decode import fuse_decode
from cpmgen.loading import load_model
from cpmgen.model import CPMModel
from cpmgen.parallel import apply_tensor_parallel, shutdown
from cpmgen.quantize import (BITS, GROUP, QUANTIZED_LINEARS, QuantizedLinear, QuantizedOutput,
                             QuantizedRowParallelLinear, quantize_model, quantize_rows_int8, quantize_weight,
                             reference_linear, unpack_int_weight)
from cpmgen.sampling import SamplingParams
from cpmgen.synthetic import random_state_dict
from cpmgen.window import Window

from helpers import CPM_TINY, TINY

# TINY's hidden 64 and 4 * 64 hold whole int4 groups; its vocab and ffn split in 2.
KINDS = ("int8", "int4")


def make_model(dtype: torch.dtype = torch.float32, state: dict | None = None) -> CPMModel:
    model = CPMModel(TINY)
    model.load_state_dict(state or random_state_dict(TINY, seed=0))
    return model.to(dtype).eval().requires_grad_(False)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


def logits(model: CPMModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, torch.arange(ids.shape[1])).float()


IDS = torch.randint(0, TINY.vocab_size, (2, 50), generator=torch.Generator().manual_seed(3))


def test_the_kernel_library_is_built():
    """`make install` builds it; without it every quantized linear runs the slow reference. It
    uses the best loops the CPU runs, and refuses ones it does not."""
    assert kernels.op("qlinear") is not None
    assert kernels.isa() == kernels.isas()[0] and kernels.isas()[-1] == "generic"
    with pytest.raises(RuntimeError, match="this CPU runs .*generic, not sse9"):
        with kernels.use_isa("sse9"):
            pass
    assert kernels.isa() == kernels.isas()[0]


def test_a_build_that_fails_as_cpp20_is_tried_as_cpp17(tmp_path, monkeypatch, capsys):
    """torch 2.14's headers refuse anything before C++20 (what torch's own extension builder
    passes), so that comes first; where it does not build (older torch headers, a compiler
    without it), the build goes on as C++17."""
    assert "-std=c++20" in kernels.compile_command() and "-std=c++17" in kernels.compile_command(standard="c++17")
    tried, built = [], []

    def run(command, check):
        tried.append(next(flag for flag in command if flag.startswith("-std=")))
        if "-std=c++20" in command:
            raise subprocess.CalledProcessError(1, command)
        Path(command[command.index("-o") + 1]).write_bytes(b"library")
        built.append(command)

    monkeypatch.setattr(kernels, "LIBRARY", tmp_path / "_kernels.so")
    monkeypatch.setattr(kernels.subprocess, "run", run)
    assert kernels.build() == 0
    assert tried == ["-std=c++20", "-std=c++17"]
    assert (tmp_path / "_kernels.so").read_bytes() == b"library" and len(built) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_kernels.so"] and capsys.readouterr().err == ""
    # and where neither builds: said once, nothing left behind
    monkeypatch.setattr(kernels.subprocess, "run", lambda command, check: (_ for _ in ()).throw(OSError("no c++")))
    assert kernels.build() == 0
    assert list(tmp_path.iterdir()) == []
    assert capsys.readouterr().err.count("the CPU kernels did not build (no c++)") == 1


def test_the_weights_hold_every_int8_value_the_kernels_read():
    """The AVX2 loops move the activation's sign onto the weight: a weight of -128 would not
    survive that, so the quantizer keeps to -127..127 (padding is 0)."""
    t = quantize_weight(torch.tensor([[-1.0, 1.0, -0.5, 0.25, 0.0]]), 8)
    assert int(t["packed"].min()) >= 1


def test_int8_round_trip_error_is_at_most_half_a_scale():
    weight = 0.02 * torch.randn(48, 200, generator=torch.Generator().manual_seed(1))
    weight[5] = 0.0  # an all-zero row
    weight[7, 3] = 4.0  # an outlier: its row gets a coarse scale
    t = quantize_weight(weight, 8)
    ints = unpack_int_weight(t["packed"], t["gparams"], 48, 200, 8)
    assert t["packed"].shape == (3, 50, 16, 4) and t["scale"].shape == (48,)
    assert int(ints.abs().max()) <= 127 and bool((ints[5] == 0).all()) and ints[7, 3] == 127
    error = (weight - ints.float() * t["scale"][:, None]).abs()
    assert bool((error <= t["scale"][:, None] / 2 * (1 + 1e-6)).all())


@pytest.mark.parametrize("kind", KINDS)
def test_rows_quantized_a_block_at_a_time_give_the_same_tensors_at_any_block_size(kind, monkeypatch):
    weight = torch.randn(100, 96, generator=torch.Generator().manual_seed(4))
    whole = quantize_weight(weight, BITS[kind])
    monkeypatch.setattr(cpmgen.quantize, "QUANTIZE_FLOATS", 1)  # LANES rows at a time
    for name, tensor in quantize_weight(weight, BITS[kind]).items():
        assert torch.equal(tensor, whole[name]), name


def test_int4_round_trip():
    """Group scales and zero points are integers (q in 1..63, z in 0..15, nibbles 0..15); exact
    zeros and zero groups stay exactly zero; the squared error is that of rounding to a step of
    a fifteenth of the group's range (1/12 of a step squared on average) or less."""
    generator = torch.Generator().manual_seed(2)
    weight = 0.02 * torch.randn(40, 6 * GROUP, generator=generator)
    weight[3, :GROUP] = 0.0  # a zero group
    weight[4, 5] = 0.0
    weight[9, 7] = 1.0  # an outlier: its group gets a coarse step, the row's other groups do not
    t = quantize_weight(weight, 4)
    assert t["packed"].shape == (3, 6 * GROUP // 8, 16, 4) and t["gparams"].shape == (3, 6, 2, 16)
    q, z = t["gparams"][:, :, 0], t["gparams"][:, :, 1]
    assert int(q.min()) >= 1 and int(q.max()) <= 63 and int(z.max()) <= 15
    ints = unpack_int_weight(t["packed"], t["gparams"], 40, 6 * GROUP, 4)
    restored = ints.float() * t["scale"][:, None]
    assert bool((restored[3, :GROUP] == 0).all()) and restored[4, 5] == 0
    groups = weight.view(40, 6, GROUP)
    steps = (groups.amax(dim=2) - groups.amin(dim=2)) / 15
    squared = (restored - weight).view(40, 6, GROUP).square().mean(dim=2)
    assert bool((squared <= steps.square() / 6).all())
    assert float(squared.mean()) <= float(steps.square().mean()) / 12


@pytest.mark.parametrize("rows", [1, 3, 5, 37], ids=["decode", "batch", "batch-5", "prefill"])
@pytest.mark.parametrize("features", [(64, 192), (256, 64), (40, 24), (64, 72)],
                         ids=["qkv", "4h_to_h", "odd-width", "odd-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("isa", kernels.isas())
def test_kernel_equals_the_reference_bitwise(isa, kind, dtype, features, rows):
    """Every version of the loops this CPU runs (AVX-512 VNNI, AVX2, plain C++) gives the reference's bits,
    with the output blocks two at a time (a prefill's rows; "odd-blocks": 5 blocks of 16) or one."""
    in_features, out_features = features
    generator = torch.Generator().manual_seed(rows)
    layer = QuantizedLinear.from_weight(0.02 * torch.randn(out_features, in_features, generator=generator),
                                        0.02 * torch.randn(out_features, generator=generator), cpmgen.quantize.BITS[kind])
    x = torch.randn(2, rows, in_features, generator=generator).to(dtype)
    x[0, 0, :4] = torch.tensor([8.0, -8.0, 7.9, -7.9])  # inputs quantized to +-127, the extremes of the products
    with kernels.use_isa(isa):
        out = layer(x)
    assert out.dtype == dtype and out.shape == (2, rows, out_features)
    reference = reference_linear(x.reshape(-1, in_features), layer.int_weight(), layer.scale, layer.bias)
    assert torch.equal(out.reshape(-1, out_features), reference)


@pytest.mark.parametrize("group", [8, 24, 64])
@pytest.mark.parametrize("isa", kernels.isas())
@pytest.mark.parametrize("rows", [5, 9], ids=["few-rows", "blocks-in-pairs"])
def test_int4_groups_of_any_multiple_of_8_inputs_give_the_reference_bits(isa, group, rows, monkeypatch):
    """The kernel reads a group's 64-byte vectors two at a time: groups of an odd number of them
    (8 and 24 inputs) and of more than two (64) give the reference's bits too, and so do the loops
    over two blocks at once that many rows run."""
    monkeypatch.setattr(cpmgen.quantize, "GROUP", group)
    generator = torch.Generator().manual_seed(group)
    layer = QuantizedLinear.from_weight(0.02 * torch.randn(40, 3 * 64, generator=generator), None, 4)
    assert layer.group == group and layer.gparams.numel() == 48 * (3 * 64 // group) * 2
    x = torch.randn(rows, 3 * 64, generator=generator)
    with kernels.use_isa(isa):
        out = layer(x)
    assert torch.equal(out, reference_linear(x, layer.int_weight(), layer.scale, layer.bias))


@pytest.mark.parametrize("kind", KINDS)
def test_layer_equals_its_dequantized_weight_up_to_the_input_rounding(kind):
    """|y - x @ W_q^T - b| <= sum_k |x_k - sx * xq_k| |W_q[n, k]| <= sx / 2 * sum_k |W_q[n, k]|."""
    generator = torch.Generator().manual_seed(4)
    layer = QuantizedLinear.from_weight(0.02 * torch.randn(96, 128, generator=generator),
                                        0.02 * torch.randn(96, generator=generator), cpmgen.quantize.BITS[kind])
    x = torch.randn(7, 128, generator=generator)
    weight = layer.dequantized()
    _, sx = quantize_rows_int8(x)
    bound = sx / 2 * weight.abs().sum(dim=1) * (1 + 1e-4) + 1e-6
    assert bool(((layer(x) - F.linear(x, weight, layer.bias)).abs() <= bound).all())


@pytest.mark.parametrize("kind,tolerance", [("int8", 0.03), ("int4", 0.15)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_logits_stay_close_to_the_float_model(dtype, kind, tolerance):
    model = make_model(dtype)
    reference = logits(model, IDS)
    quantized = logits(quantize_model(copy.deepcopy(model), kind), IDS)
    assert rel_error(quantized, reference) < tolerance  # int8 about 0.01, int4 about 0.07 here
    assert (quantized.argmax(-1) == reference.argmax(-1)).float().mean() > (0.9 if kind == "int8" else 0.75)


def test_without_the_kernel_the_reference_gives_the_same_logits(monkeypatch):
    model = quantize_model(make_model(), "int4")
    with_kernel = logits(model, IDS)
    monkeypatch.setattr(cpmgen.quantize.kernels, "op", lambda name: None)
    assert torch.equal(logits(model, IDS), with_kernel)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", KINDS)
def test_quantizing_from_a_stored_fp16_checkpoint_equals_quantizing_its_loaded_copy(write_ckpt, kind, dtype):
    """--quantize reads each block linear in its stored dtype (no converted copy of the model is
    held) and gives the weights of quantizing the model loaded in `dtype`."""
    from cpmgen.config import Settings
    from cpmgen.loading import load_model

    settings = Settings()
    settings.model.path = str(write_ckpt(dtype=torch.float16))
    settings.runtime.dtype, settings.runtime.prepack = dtype, False
    plain = quantize_model(load_model(settings).model, kind)
    settings.runtime.quantize = kind
    loaded = load_model(settings).model
    plain.keep_kv_in(loaded.transformer.layers[0].attention.kv_dtype)  # auto: bf16 beside quantized linears in fp32
    for (name, a), (_, b) in zip(plain.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.inference_mode():
        assert torch.equal(plain(IDS, torch.arange(IDS.shape[1])), loaded(IDS, torch.arange(IDS.shape[1])))


@pytest.mark.parametrize("kind", KINDS)
def test_float_weights_are_freed(kind):
    model = make_model()
    replaced = [f"transformer.layers.{i}.{name}" for i in range(TINY.num_layers) for name in QUANTIZED_LINEARS]
    watched = [weakref.ref(model.get_submodule(name).weight) for name in replaced]
    quantize_model(model, kind)
    assert all(ref() is None for ref in watched)  # gone at once, no garbage collection needed
    for name in replaced:
        layer = model.get_submodule(name)
        assert type(layer) is QuantizedLinear and not hasattr(layer, "weight")
        assert layer.packed.dtype == torch.uint8 and layer.bits == cpmgen.quantize.BITS[kind]
    weights = [name for name, _ in model.named_parameters() if name.endswith("weight")]
    assert all("embeddings" in name or "layernorm" in name for name in weights)
    # The input lookup keeps the float table; the output layer reads its int8 copy.
    assert model.word_embeddings.weight.dtype == torch.float32
    head = model.lm_head.linear
    assert type(model.lm_head) is QuantizedOutput and head.bits == 8 and head.out_features == TINY.vocab_size


def test_bf16_model_runs_in_bf16():
    model = quantize_model(make_model(torch.bfloat16), "int4")
    with torch.inference_mode():
        cache = model.new_kv_cache(2, 32)
        out = model(IDS[:, :20], torch.arange(20), cache)
        step = model(IDS[:, 20:21], torch.tensor([20]), cache)
    assert out.dtype == step.dtype == torch.bfloat16
    assert bool(torch.isfinite(out).all())


def test_quantizing_twice_or_a_rewritten_layer_is_an_error():
    model = quantize_model(make_model(), "int8")
    with pytest.raises(ValueError, match="output layer was already replaced"):
        quantize_model(model, "int4")
    other = make_model()
    other.transformer.layers[1].mlp.dense_4h_to_h = nn.Identity()
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.dense_4h_to_h: Identity"):
        quantize_model(other, "int8")


@pytest.mark.parametrize("kv_dtype", (None, torch.bfloat16), ids=("kv-as-computed", "bf16-kv"))
@pytest.mark.parametrize("fused", (False, True), ids=("modules", "fused"))
@pytest.mark.parametrize("kind", KINDS)
def test_fast_generation_equals_slow(kind, fused, kv_dtype):
    """Decode steps run one row through the kernel, the slow path whole windows: the same logits,
    with the keys and values kept as computed or rounded to bf16 (cached or not)."""
    model = quantize_model(make_model(), kind)
    model.keep_kv_in(kv_dtype)
    if fused:
        assert fuse_decode(model) == TINY.num_layers
    assert model.new_kv_cache(1).k[0].dtype == (kv_dtype or torch.float32)
    window = Window(TINY.max_positions - 1, 8)
    prompt = list(range(20, 40))
    new = 3 * TINY.max_positions + 26
    runs = {}
    for fast in (True, False):
        stats = Stats()
        runs[fast] = list(generate(model, prompt, window, SamplingParams(greedy=True), new,
                                   1, fast, torch.Generator().manual_seed(1), stats))
        assert stats.slides >= 3
    assert runs[True] == runs[False]


# ----------------------------------------------------------------------------- the KV cache's dtype


@pytest.mark.parametrize("fused", (False, True), ids=("modules", "fused"))
def test_bf16_keys_and_values_are_rounded_with_a_cache_or_without(fused):
    """The slow path (no cache) rounds keys and values as a bf16 cache holds them: its logits are
    bitwise a cached prefill's, and not those of keys and values kept in fp32."""
    model = quantize_model(make_model(), "int8")
    if fused:
        fuse_decode(model)
    exact = logits(model, IDS)
    model.keep_kv_in(torch.bfloat16)
    cache = model.new_kv_cache(IDS.shape[0], TINY.max_positions)
    with torch.inference_mode():
        cached = model(IDS, torch.arange(IDS.shape[1]), cache)
    assert cache.k[0].dtype == torch.bfloat16
    assert torch.equal(cached, logits(model, IDS))
    assert not torch.equal(cached, exact) and rel_error(cached, exact) < 0.02


def load_tiny(**runtime) -> CPMModel:
    settings = Settings()
    settings.model.path = str(CPM_TINY)
    for key, value in runtime.items():
        setattr(settings.runtime, key, value)
    settings.validate()
    return load_model(settings).model


@pytest.mark.parametrize("runtime, expected", [
    (dict(), torch.float32),
    (dict(dtype="bf16"), torch.bfloat16),
    (dict(quantize="int8"), torch.bfloat16),  # auto: bf16 beside int8 / int4 linears
    (dict(quantize="int4"), torch.bfloat16),
    (dict(quantize="int8", kv_cache_dtype="fp32"), torch.float32),
    (dict(kv_cache_dtype="bfloat16"), torch.bfloat16),
])
def test_the_kv_cache_dtype_setting(runtime, expected):
    model = load_tiny(**runtime)
    assert model.kv_cache_dtype == expected
    assert {layer.attention.kv_dtype for layer in model.transformer.layers} == {
        None if expected == model.word_embeddings.weight.dtype else expected}
    assert model.new_kv_cache(1).v[-1].dtype == expected


# ----------------------------------------------------------------------------- tensor parallel


def _rank(rank: int, world: int, init_file: str, state: dict, ids: torch.Tensor, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    with torch.device("meta"):
        model = CPMModel(TINY)
    apply_tensor_parallel(model, rank, world)
    model.load_state_dict({name: splits.shard(name, t, world, rank).clone() for name, t in state.items()}, assign=True)
    model.eval().requires_grad_(False)
    quantize_model(model, "int8")
    assert type(model.transformer.layers[0].mlp.dense_4h_to_h) is QuantizedRowParallelLinear
    result = logits(model, ids)
    if rank == 0:
        torch.save(result, out_file)
    shutdown(0)  # leaves with os._exit: gloo's threads can abort an ordinary interpreter exit


@pytest.mark.slow
def test_tensor_parallel_two_ranks(tmp_path):
    """Row-parallel partial products are scaled by their rank's scales, summed, and the bias
    added once; the vocab-parallel output layer is gathered: close to the one-rank int8 model."""
    state = random_state_dict(TINY, seed=5)
    out_file = tmp_path / "logits.pt"
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), state, IDS, str(out_file)), nprocs=2)
    two_ranks = torch.load(out_file)
    one_rank = logits(quantize_model(make_model(state=state), "int8"), IDS)
    assert rel_error(two_ranks, one_rank) < 0.02
    assert (two_ranks.argmax(-1) == one_rank.argmax(-1)).float().mean() > 0.9
