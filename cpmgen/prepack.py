"""Faster CPU linears for batch-1 decode, which runs at the speed the weights are read.

Decoding one token is a matrix-vector product per linear layer, and time goes into reading
the weights. For that shape, `F.linear` calls MKL's GEMV, which runs on one core. Two forms
split the rows over all cores instead (README, Performance, has the measurements):

- "onednn": oneDNN's linear on a weight reordered once into its blocked layout. The same packed
  weights also speed up a window's prefill, and every path (decode, prefill, the slow
  recompute) goes through the same packed layers. The output layer needs a packed copy of the
  word embedding (the input lookup still reads it plain). Used on Intel CPUs with AVX-512,
  where it was measured (its packed fp32 prefill was also faster than `F.linear`'s there).
- "gemv": cpmgen's fp32/bf16 GEMV (kernels/gemv.cpp) on the weights as they are, for calls of a
  few rows; a window's prefill goes to a matrix product on the same weights: oneDNN's for fp32
  (on x86 with torch 2.13 or later; it reads the plain layout, no packed copy), `F.linear` for bf16
  (in fp32 where the CPU has no bf16 products). No copy of anything, and a fused decode block
  runs in one parallel region. Used on the other CPUs: on
  AVX2 and on AMD's AVX-512 it decoded faster than oneDNN's packed linears in fp32 and bf16,
  and than MKL's GEMV.

The model code is untouched: `prepack_linears(model)` swaps modules after loading, as
parallel.py does for tensor parallelism. Results differ from `F.linear` by rounding only
(summation order).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn

from cpmgen import kernels
from cpmgen.model import CPMModel, TiedOutput


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN linear kernels exist for this device and dtype (CPU fp32 always; bf16 needs AVX-512)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.cache
def cpu_vendor(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    """The CPU's vendor_id ("GenuineIntel", "AuthenticAMD"), "" where there is none (not Linux)."""
    try:
        with open(cpuinfo_path) as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "vendor_id":
                    return value.strip()
    except OSError:
        pass
    return ""


def auto_form() -> str:
    """The form "auto" means where both run (see the module docstring)."""
    intel_avx512 = torch.backends.cpu.get_cpu_capability() == "AVX512" and cpu_vendor() == "GenuineIntel"
    return "onednn" if intel_avx512 else "gemv"


def chosen_form(device: torch.device, dtype: torch.dtype, form: str = "auto") -> str | None:
    """The form `prepack_linears` uses ("onednn" or "gemv"), or None where neither runs."""
    onednn = supported(device, dtype)
    gemv = device.type == "cpu" and dtype in kernels.INPUT_DTYPES and kernels.loaded()
    if form == "auto":
        form = auto_form() if onednn and gemv else "onednn" if onednn else "gemv"
    if form == "gemv":
        return "gemv" if gemv else None
    return "onednn" if onednn else None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    # The layout is chosen for batch size 1 (decode); oneDNN still takes any number of rows.
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """An nn.Linear whose weight lives in oneDNN's blocked layout (an opaque mkldnn tensor)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # Not persistent: a state dict of this module would hold an opaque tensor no loader reads.
        self.register_buffer("packed_weight", pack_weight(linear.weight), persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias)


class PackedOutput(nn.Module):
    """The tied output layer on a packed copy of the word-embedding table (which the input
    lookup still needs in its plain layout)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("packed_weight", pack_weight(table), persistent=False)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, None)


class GemvLinear(nn.Linear):
    """An nn.Linear (the same weight and bias) whose calls go to cpmgen's GEMV (kernels/gemv.cpp),
    which hands calls of many rows on to a matrix product."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.op("gemv_linear")(x, self.weight, self.bias)


class GemvOutput(nn.Module):
    """The tied output layer through cpmgen's GEMV, on the word-embedding table itself."""

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return kernels.op("gemv_linear")(x, table, None)


def prepack_linears(model: CPMModel, replaced: Callable[[torch.Tensor], None] = lambda weight: None,
                    form: str = "auto") -> int:
    """Replace every plain nn.Linear of the blocks, and the output layer, by faster ones: `form`
    "onednn", "gemv", or "auto" (the one for this CPU, see the module docstring).

    With "onednn" the output layer, tied to the word embedding that the input lookup still needs
    in its plain layout, costs a packed copy of that matrix (vocab x hidden); it is the largest
    single weight, read on every step, so the copy pays for itself in speed. `replaced(weight)`
    is called with each plain weight once its packed copy exists (the word embedding too, which
    is only looked up from then on), so a loader can let the weight's mapped pages go before the
    next one is packed: peak memory stays at the model's size, not twice it. "gemv" keeps the
    weights as they are and calls `replaced` for none. Returns the number of layers replaced
    (0 where neither form runs this model)."""
    weight = model.word_embeddings.weight
    form = chosen_form(weight.device, weight.dtype, form)
    if form is None or weight.requires_grad:
        return 0
    count = 0
    for block in model.transformer.layers:
        for parent in (block.attention, block.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:  # tensor-parallel row layers keep their own forward
                    setattr(parent, name, PackedLinear(child) if form == "onednn" else GemvLinear(child))
                    if form == "onednn":
                        replaced(child.weight)
                    count += 1
    if type(model.lm_head) is TiedOutput:  # not quantized, not gathered over ranks
        model.lm_head = PackedOutput(weight) if form == "onednn" else GemvOutput()
        if form == "onednn":
            replaced(weight)  # from now on only looked up: a few rows a step
        count += 1
    return count
