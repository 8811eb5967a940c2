"""Weight-only int8: the quantization error bound, the layers against their dequantized weights,
the model against fp32, freed float weights, fast == slow generation, and tensor parallel."""

from __future__ import annotations

import copy
import types
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from cpmgen.checkpoint import splits
from cpmgen.config import ModelArgs
from cpmgen.generate import Stats, generate
from cpmgen.model import CPMModel
from cpmgen.parallel import apply_tensor_parallel, shutdown
from cpmgen.quantize import KERNEL_MAX_ROWS, Int8Linear, Int8RowParallelLinear, quantize_int8, quantize_rows
from cpmgen.sampling import SamplingParams
from cpmgen.synthetic import random_state_dict
from cpmgen.window import Window

# hidden 64 and 4 * 64 are multiples of 16 (the CPU kernel's input width); vocab and ffn split in 2.
ARGS = ModelArgs(num_layers=2, hidden_size=64, num_heads=4, vocab_size=300, max_positions=64)
BLOCK_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def make_model(dtype: torch.dtype = torch.float32, state: dict | None = None) -> CPMModel:
    model = CPMModel(ARGS)
    model.load_state_dict(state or random_state_dict(ARGS, seed=0))
    return model.to(dtype).eval().requires_grad_(False)


def exact_weight(layer: Int8Linear) -> torch.Tensor:
    """W_int8 * scale in fp32: the weight the layer stands for, without a rounding of its own."""
    return layer.weight_int8.float() * layer.scale.float()[:, None]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


def logits(model: CPMModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, torch.arange(ids.shape[1])).float()


IDS = torch.randint(0, ARGS.vocab_size, (2, 50), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_error_is_at_most_half_a_scale(dtype):
    weight = 0.02 * torch.randn(48, 200, generator=torch.Generator().manual_seed(1))
    weight[5] = 0.0  # an all-zero row
    weight[7, 3] = 4.0  # an outlier: its row gets a coarse scale
    weight = weight.to(dtype)
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.dtype == dtype and scale.shape == (48,)
    assert int(q.abs().max()) <= 127
    error = (weight.float() - q.float() * scale.float()[:, None]).abs()
    assert bool((error <= scale.float()[:, None] / 2 * (1 + 1e-6)).all())
    assert bool((q[5] == 0).all()) and q[7, 3] == 127


@pytest.mark.parametrize("rows", [1, 3, KERNEL_MAX_ROWS + 9], ids=["decode", "batch", "prefill"])
@pytest.mark.parametrize("features", [(64, 192), (256, 64), (40, 24)], ids=["qkv", "4h_to_h", "odd-width"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_equals_its_dequantized_weight(dtype, features, rows):
    """Up to the documented roundings, each at most 2^-8 relative (bf16's unit roundoff): the
    CPU kernel takes bf16 inputs and gives a bf16 product x @ W_int8^T (accumulated in fp32);
    a bf16 model rounds twice more, after the scale and after the bias."""
    in_features, out_features = features
    generator = torch.Generator().manual_seed(rows)
    weight = (0.02 * torch.randn(out_features, in_features, generator=generator)).to(dtype)
    bias = (0.02 * torch.randn(out_features, generator=generator)).to(dtype)
    layer = Int8Linear(weight, bias)
    x = torch.randn(2, rows, in_features, generator=generator).to(dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, rows, out_features)
    product = F.linear(x.to(torch.bfloat16).float(), exact_weight(layer))
    error = (out.float() - (product + bias.float())).abs()
    roundings = 1 if dtype == torch.float32 else 3
    assert bool((error <= roundings * 2**-8 * (product.abs() + bias.float().abs()) + 1e-6).all())


def test_kernel_input_need_not_be_aligned():
    """A bf16 view 2 bytes into its storage, which would crash the kernel, is copied for it first."""
    layer = Int8Linear(0.02 * torch.randn(32, 64).bfloat16(), None)
    x = torch.randn(65).bfloat16()[1:].view(1, 64)
    assert x.data_ptr() % 32
    ref = F.linear(x.float(), exact_weight(layer))
    assert bool(((layer(x).float() - ref).abs() <= 2 * 2**-8 * ref.abs() + 1e-6).all())  # product, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_logits_stay_close_to_the_float_model(dtype):
    model = make_model(dtype)
    reference = logits(model, IDS)
    quantized = logits(quantize_int8(copy.deepcopy(model)), IDS)
    assert rel_error(quantized, reference) < 0.03  # about 0.011 here, in both dtypes
    assert (quantized.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9


def dequantized_model(state: dict, world: int = 1) -> CPMModel:
    """A float model holding exactly the weights an int8 model at `world` ranks stands for:
    column-parallel and output layers quantize whole rows at any world; a row-parallel layer
    quantizes each rank's columns on their own."""
    deq = {}
    for name, tensor in state.items():
        if name.endswith("weight") and any(f".{linear}." in name for linear in BLOCK_LINEARS):
            row_parallel = name.endswith(("attention.dense.weight", "mlp.dense_4h_to_h.weight"))
            pieces = tensor.chunk(world, dim=1) if row_parallel else [tensor]
            deq[name] = torch.cat([exact_weight(Int8Linear(piece, None)) for piece in pieces], dim=1)
        else:
            deq[name] = tensor
    model = make_model(state=deq)
    head = exact_weight(Int8Linear(state["word_embeddings.weight"], None))
    model.lm_head = types.MethodType(lambda self, x: F.linear(x, head), model)
    return model


def test_model_equals_the_model_of_its_dequantized_weights():
    state = random_state_dict(ARGS, seed=0)
    quantized = logits(quantize_int8(make_model(state=state)), IDS)
    reference = logits(dequantized_model(state), IDS)
    assert rel_error(quantized, reference) < 0.01  # bf16 inputs of the linears: about 0.003


def test_float_weights_are_freed():
    model = make_model()
    replaced = [f"transformer.layers.{i}.{name}" for i in range(ARGS.num_layers) for name in BLOCK_LINEARS]
    watched = [weakref.ref(model.get_submodule(name).weight) for name in replaced]
    quantize_int8(model)
    assert all(ref() is None for ref in watched)  # gone at once, no garbage collection needed
    for name in replaced:
        layer = model.get_submodule(name)
        assert type(layer) is Int8Linear and not hasattr(layer, "weight")
        assert layer.weight_int8.dtype == torch.int8
    weights = [name for name, _ in model.named_parameters() if name.endswith("weight")]
    assert all("embeddings" in name or "layernorm" in name for name in weights)
    # The input lookup keeps the float table; the output layer reads its int8 copy.
    assert model.word_embeddings.weight.dtype == torch.float32
    assert model.lm_head_int8.weight_int8.shape == (ARGS.vocab_size, ARGS.hidden_size)


def test_bf16_model_runs_in_bf16():
    model = quantize_int8(make_model(torch.bfloat16))
    layer = model.transformer.layers[0].mlp.dense_h_to_4h
    assert layer.scale.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    with torch.inference_mode():
        cache = model.new_kv_cache(2, 32)
        out = model(IDS[:, :20], torch.arange(20), cache)
        step = model(IDS[:, 20:21], torch.tensor([20]), cache)
    assert out.dtype == step.dtype == torch.bfloat16
    assert bool(torch.isfinite(out).all())


def test_quantizing_twice_or_a_rewritten_layer_is_an_error():
    model = quantize_int8(make_model())
    with pytest.raises(ValueError, match="output layer was already replaced"):
        quantize_int8(model)
    other = make_model()
    other.transformer.layers[1].mlp.dense_4h_to_h = nn.Identity()
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.dense_4h_to_h: Identity"):
        quantize_int8(other)


@pytest.fixture(scope="module")
def quantized_novel_model():
    return quantize_int8(make_model())


@pytest.mark.parametrize("stride", [1, 8, 32])
def test_fast_generation_equals_slow(quantized_novel_model, stride):
    """Decode steps go through the int8 kernel, the slow path's full windows (over
    KERNEL_MAX_ROWS tokens) through the bf16 F.linear: the same tokens all the same."""
    window = Window(ARGS.max_positions - 1, stride)
    prompt = list(range(20, 40))
    new = 3 * ARGS.max_positions + 2 * stride + 10
    runs = {}
    for fast in (True, False):
        stats = Stats()
        runs[fast] = list(generate(quantized_novel_model, prompt, window, SamplingParams(greedy=True), new,
                                   1, fast, torch.Generator().manual_seed(1), stats))
        assert stats.slides >= 3
    assert runs[True] == runs[False]


# ----------------------------------------------------------------------------- tensor parallel


def _rank(rank: int, world: int, init_file: str, state: dict, ids: torch.Tensor, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    with torch.device("meta"):
        model = CPMModel(ARGS)
    apply_tensor_parallel(model, rank, world)
    model.load_state_dict({name: splits.shard(name, t, world, rank).clone() for name, t in state.items()}, assign=True)
    model.eval().requires_grad_(False)
    quantize_int8(model)
    assert type(model.transformer.layers[0].mlp.dense_4h_to_h) is Int8RowParallelLinear
    result = logits(model, ids)
    if rank == 0:
        torch.save(result, out_file)
    shutdown(0)  # leaves with os._exit: gloo's threads can abort an ordinary interpreter exit


def test_tensor_parallel_two_ranks(tmp_path):
    """Row-parallel partial products are scaled by their rank's scales, summed, and the bias
    added once; the vocab-parallel output layer is gathered."""
    state = random_state_dict(ARGS, seed=5)
    out_file = tmp_path / "logits.pt"
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), state, IDS, str(out_file)), nprocs=2)
    two_ranks = torch.load(out_file)
    assert rel_error(two_ranks, logits(dequantized_model(state, world=2), IDS)) < 0.01
