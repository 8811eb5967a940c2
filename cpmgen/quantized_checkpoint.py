"""Quantized checkpoint folders: `cpmgen quantize DIR --to int8|int4 --output OUT`.

A folder holds `quantized.json` (the kind and the architecture), `model.safetensors` (the state
dict of a quantized CPMModel: for each linear the packed integer weights, group parameters,
scales and fp32 bias of cpmgen.quantize.QuantizedLinear, under the linear's Megatron name;
the output layer's int8 copy under `lm_head_quantized.*`; the embeddings and LayerNorms as
stored in the source) and the source's vocab. Loading it builds the modules straight from those
tensors: no float weight is made or quantized, so a load takes seconds and holds little more
than the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from cpmgen.checkpoint.reader import Checkpoint
from cpmgen.checkpoint.writer import copy_vocab
from cpmgen.config import ModelArgs
from cpmgen.errors import UserError
from cpmgen.model import CPMModel
from cpmgen.quantize import (BITS, MAX_INT4_INPUTS, QuantizedLinear, block_linears, quantize_weight, quantized_linear,
                             set_lm_head)

CONFIG_NAME = "quantized.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "cpmgen-quantized"
HEAD = "lm_head_quantized"


def is_quantized_folder(path: Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def _quantized_tensors(prefix: str, weight: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    t = quantize_weight(weight, bits)
    return {f"{prefix}.packed": t["packed"], f"{prefix}.gparams": t["gparams"], f"{prefix}.scale": t["scale"]}


def quantized_bytes(ckpt: Checkpoint, kind: str) -> int:
    """About the size of the folder `write_quantized` makes of `ckpt`: a byte (int8) or half a
    byte (int4) per weight, and a tenth more for the scales and the float tensors."""
    weights = ckpt.nbytes() // ckpt.dtype().itemsize // (2 if kind == "int4" else 1)
    return weights * 11 // 10


def write_quantized(out: Path, ckpt: Checkpoint, args: ModelArgs, kind: str,
                    advance: Optional[Callable[[int], None]] = None) -> Path:
    """Write the quantized folder of `ckpt` into the (empty, existing) folder `out`, one
    source tensor at a time (the source stays memory-mapped; only the output is held)."""
    from safetensors.torch import save_file

    bits = BITS[kind]
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in ckpt.full_tensors():
        prefix = quantized_linear(name)
        if prefix and name.endswith(".weight"):
            tensors.update(_quantized_tensors(prefix, tensor, bits if tensor.shape[1] <= MAX_INT4_INPUTS else 8))
        elif prefix:
            tensors[name] = tensor.float().contiguous()  # the kernel's epilogue is fp32
        else:
            tensors[name] = tensor.contiguous().clone()
            if name == "word_embeddings.weight":
                tensors.update(_quantized_tensors(HEAD, tensor, 8))
        ckpt.release(name)
        if advance:
            advance(1)
    save_file(tensors, out / WEIGHTS_NAME, metadata={"format": FORMAT})
    config = {"format": FORMAT, "quantize": kind, "dtype": str(ckpt.dtype()).removeprefix("torch."),
              "num_layers": args.num_layers, "hidden_size": args.hidden_size, "num_heads": args.num_heads,
              "vocab_size": args.vocab_size, "max_positions": args.max_positions, "layernorm_eps": args.layernorm_eps}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    shutil.copymode(out / CONFIG_NAME, out / WEIGHTS_NAME)  # safetensors writes 0600; give it the usual mode
    copy_vocab(ckpt.path, out)
    return out / WEIGHTS_NAME


def read_quantized(path: Path) -> tuple[dict, Path, dict[str, torch.Tensor]]:
    """(config, weight file, tensors) of a quantized folder; anything unreadable is a UserError."""
    from safetensors import safe_open

    path = Path(path)
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path / CONFIG_NAME}: not readable JSON ({e}); quantize the model again") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("quantize") not in BITS:
        raise UserError(f"{path / CONFIG_NAME}: not a cpmgen quantized folder's config; quantize the model again")
    file = path / WEIGHTS_NAME
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # SafetensorError, OSError: missing, corrupt or truncated
        raise UserError(f"{file}: cannot read the weights (missing, corrupt or truncated); quantize the model again") from e
    return config, file, tensors


def build_quantized_model(ckpt: Checkpoint, args: ModelArgs, dtype: torch.dtype,
                          advance: Optional[Callable[[int], None]] = None) -> CPMModel:
    """The quantized CPMModel of a quantized folder (CPU), float tensors in `dtype`. The float
    tensors are taken out of `ckpt` as they are converted (its stored copies are not kept)."""
    tensors = ckpt.shards[0]
    with torch.device("meta"):
        model = CPMModel(args)
    try:
        for parent, name, dotted in block_linears(model):
            linear = getattr(parent, name)
            setattr(parent, name, _linear_from(tensors, dotted, linear.in_features))
            if advance:
                advance(2)
        set_lm_head(model, _linear_from(tensors, HEAD, args.hidden_size))
        floats = {}
        for name in model.state_dict():
            if not _quantized_name(name):
                floats[name] = tensors[name].to(dtype)
                if floats[name].data_ptr() != tensors[name].data_ptr():
                    ckpt.release(name)  # converted: its mapped pages would stay resident beside the copy
                del tensors[name]  # taken out: the stored copy is not kept
    except KeyError as e:
        raise UserError(f"{ckpt.files[0]}: missing tensor {e.args[0]}; quantize the model again") from None
    model.load_state_dict({**model.state_dict(), **floats}, assign=True)
    if advance:
        advance(len(floats))
    return model.requires_grad_(False)


def _quantized_name(name: str) -> bool:
    return name.startswith(HEAD + ".") or quantized_linear(name) is not None or name.rpartition(".")[2] in (
        "packed", "gparams", "scale")


def _linear_from(tensors: dict[str, torch.Tensor], prefix: str, in_features: int) -> QuantizedLinear:
    packed, gparams = tensors[f"{prefix}.packed"], tensors[f"{prefix}.gparams"]
    bits = 4 if gparams.numel() else 8
    return QuantizedLinear(packed, gparams, tensors[f"{prefix}.scale"], tensors.get(f"{prefix}.bias"), in_features, bits)
