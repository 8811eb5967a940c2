"""From settings to a ready model: device and dtype, checkpoint, architecture, weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from cpmgen.checkpoint.reader import Checkpoint, open_checkpoint, resolve_args
from cpmgen.config import DTYPE_ALIASES, ModelArgs, RuntimeSection, Settings
from cpmgen.errors import UserError
from cpmgen.fused_decode import fuse_decode
from cpmgen.hugepages import streamed_tensors, use_huge_pages
from cpmgen.memory import trim_heap
from cpmgen.model import CPMModel, decode_step
from cpmgen.quantize import QuantizedLinear

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """A checked runtime.device (RuntimeSection.validate) on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return TORCH_DTYPES[DTYPE_ALIASES.get(name, name)]


def resolve_kv_dtype(name: str, dtype: torch.dtype, quantized: bool, device: torch.device) -> Optional[torch.dtype]:
    """A checked runtime.kv_cache_dtype for a model of `dtype` weights (quantized: int8 or int4
    linears): the dtype to keep keys and values in, None for the projection's own. auto keeps an
    fp32 model's in bf16 where its linears are quantized: those already round their inputs to 8
    bits, the cache is a large share of what such a step reads, and a bf16 cache halves it."""
    if name == "auto":
        return torch.bfloat16 if quantized and dtype == torch.float32 else None
    kv = resolve_dtype(name, device)
    if kv == torch.float16 and device.type == "cpu":
        raise UserError(f"--kv-cache-dtype {name}: the CPU's attention reads fp32 or bf16 caches; choose bf16")
    return None if kv == dtype else kv


def model_path(settings: Settings) -> Path:
    if not settings.model.path:
        raise UserError("no model folder: pass --model DIR, set model.path in a config, or export CPMGEN_MODEL=DIR")
    return Path(settings.model.path).expanduser()


def open_model(settings: Settings, strict: bool = True, rank: Optional[int] = None,
               world: Optional[int] = None) -> Checkpoint:
    """The checkpoint named by the settings, opened as they say (see open_checkpoint)."""
    return open_checkpoint(model_path(settings), strict=strict, rank=rank, world=world,
                           trust=settings.model.trust_checkpoint)


@dataclass
class Loaded:
    model: CPMModel
    args: ModelArgs
    device: torch.device
    dtype: torch.dtype
    decode: Callable = decode_step  # the one-token step: decode_step or its compiled form


def load_model(settings: Settings, advance: Optional[Callable[[int], None]] = None,
               checkpoint: Optional[Checkpoint] = None, rank: int = 0, world: int = 1) -> Loaded:
    """Build the model and load its weights: all of them, merged tensor by tensor from any
    model-parallel size (world 1), or rank `rank`'s shard at model-parallel size `world`,
    sliced in memory from a checkpoint stored at any size (memory-mapped: a rank reads only
    the bytes of its own slices)."""
    device = resolve_device(settings.runtime.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_dtype(settings.runtime.dtype, device)
    ckpt = checkpoint or open_model(settings)
    args = resolve_args(ckpt, settings.model)
    if ckpt.format == "quantized":
        return _load_quantized(settings, ckpt, args, device, dtype, advance, world)
    with torch.device("meta"):
        model = CPMModel(args)
    if world > 1:
        from cpmgen.parallel import apply_tensor_parallel

        apply_tensor_parallel(model, rank, world)
    if settings.runtime.quantize != "none":
        from cpmgen.quantize import quantized_linear
    state = {}
    for name, tensor in ckpt.full_tensors() if world == 1 else ckpt.rank_tensors(world, rank):
        if settings.runtime.quantize != "none" and name.endswith(".weight") and quantized_linear(name):
            # Kept as stored: quantize_model rounds it to `dtype` a block of rows at a time, so no
            # converted copy of the whole model is ever held.
            state[name] = tensor.to(device)
        else:
            state[name] = tensor.to(device=device, dtype=dtype)
        if state[name].data_ptr() != tensor.data_ptr():
            ckpt.release(name)  # converted or moved: the mapped pages are no longer needed
        if advance:
            advance(1)
    model.load_state_dict(state, assign=True)
    model.requires_grad_(False)
    del state
    optimize(model, settings.runtime, ckpt)
    return _loaded(model, args, device, dtype, settings, ckpt)


def _load_quantized(settings: Settings, ckpt: Checkpoint, args: ModelArgs, device: torch.device, dtype: torch.dtype,
                    advance: Optional[Callable[[int], None]], world: int) -> Loaded:
    """A `cpmgen quantize` folder: the quantized modules are built from its tensors as stored."""
    from cpmgen.quantized_checkpoint import build_quantized_model

    stored = ckpt.quantization["quantize"]
    if settings.runtime.quantize not in ("none", stored):
        raise UserError(f"--quantize {settings.runtime.quantize}: {ckpt.path} holds {stored} weights; "
                        f"drop --quantize or quantize the original checkpoint")
    if world > 1:
        raise UserError(f"--mp {world}: {ckpt.path} is a quantized folder, which runs on one rank; "
                        "pass the original checkpoint with --quantize instead")
    count = len(ckpt.names())
    model = build_quantized_model(ckpt, args, dtype).to(device)  # takes the float tensors out of ckpt
    if advance:
        advance(count)
    return _loaded(model, args, device, dtype, settings, ckpt)


def _loaded(model: CPMModel, args: ModelArgs, device: torch.device, dtype: torch.dtype, settings: Settings,
            ckpt: Checkpoint) -> Loaded:
    # A step streams the weights: faster from 2 MB pages. Megatron rank files and quantized
    # folders: their mapped pages are let go as each weight is copied (released). An HF folder's
    # tensors are renamed and converted on the way in, so its mapping would stay resident beside
    # the copies, doubling its memory: it stays where it is.
    if device.type == "cpu" and ckpt.format in ("megatron", "quantized"):
        use_huge_pages(streamed_tensors(model), released(ckpt))
    trim_heap()  # converted and replaced copies were freed one by one; hand their memory back
    quantized = any(isinstance(module, QuantizedLinear) for module in model.modules())
    model.keep_kv_in(resolve_kv_dtype(settings.runtime.kv_cache_dtype, dtype, quantized, device))
    fuse_decode(model)  # CPU: a one-token step in fewer, larger ops
    return Loaded(model.eval(), args, device, dtype, compile_decode(model) if settings.runtime.compile else decode_step)


def compile_decode(model: CPMModel) -> Callable:
    """decode_step, compiled for `model` (prefill lengths vary, so it stays eager).

    Freezing lets inductor treat the weights as constants. It cannot lower oneDNN's opaque
    prepacked weights, so --compile replaces prepacking, and on the CPU it lowers the linears
    to MKL's one-core GEMV, slower than the default (README, Performance). On CUDA the step is
    also captured as a CUDA graph, which removes the per-kernel launch cost that dominates
    batch-1 decode there."""
    options = {"freezing": True, "triton.cudagraphs": model.word_embeddings.weight.is_cuda}
    return torch.compile(decode_step, fullgraph=True, dynamic=False, options=options)


def released(ckpt: Optional[Checkpoint]) -> Callable[[torch.Tensor], None]:
    """A callback for a weight that has just been copied or converted: lets go of the checkpoint's
    mapped pages where the weight is a checkpoint tensor itself (found by its address, whatever
    the model calls it: a quantized folder stores the output layer under another name), and of
    the heap the copy left free. A weight converted while loading is a copy whose source pages
    were let go then."""
    names = {} if ckpt is None else {t.data_ptr(): name for shard in ckpt.shards for name, t in shard.items()
                                     if t.numel()}

    def replaced(weight: torch.Tensor) -> None:
        if weight.data_ptr() in names:
            ckpt.release(names[weight.data_ptr()])
        trim_heap()  # the conversion's temporaries, before the next weight makes its own

    return replaced


def optimize(model: CPMModel, runtime: RuntimeSection, ckpt: Optional[Checkpoint] = None) -> None:
    """Swap the linears for faster forms of the same weights (int8, int4 or oneDNN-prepacked), and let
    go of the mapped checkpoint pages of every weight they replaced."""
    from cpmgen.prepack import prepack_linears

    replaced = released(ckpt)
    if runtime.quantize != "none":
        from cpmgen.quantize import quantize_model

        quantize_model(model, runtime.quantize, replaced)
    if runtime.prepack and not runtime.compile:
        prepack_linears(model, replaced)

