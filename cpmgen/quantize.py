"""Weight-only int8 quantization of a loaded CPMModel (`--quantize int8`).

Decoding one token reads every weight once, so its speed is the speed at which the weights
stream from memory; int8 weights are a quarter of fp32 and half of bf16. Each output row of a
weight matrix gets one scale (symmetric, per output channel): W ~ W_int8 * scale[:, None],
with |W - W_int8 * scale| <= scale / 2. Activations stay in floating point.

On CPU the product x @ W_int8^T runs in `torch._weight_int8pack_mm`, whose vectorized kernels
take bf16 activations only (its fp32 and fp16 kernels are scalar, ten times slower): an fp32
model rounds the linear's input to bf16 for it and gets the product back in bf16 (accumulated
in fp32). The kernel gets unit scales; scale and bias are applied after it in the model's
dtype, so an fp32 model keeps fp32 scales. On a CPM-Small stack at batch 1 the kernel reads
28 GB/s of int8 weights on two cores, against 36 GB/s of fp32 weights for oneDNN's prepacked
linear: a whole decode step takes 6.1 ms instead of 13.8 (7.0 prepacked bf16). The kernel
converts the weights again for every 4 input rows, so beyond KERNEL_MAX_ROWS rows (prefill, a
window re-encode, the slow path) F.linear on the weight converted to bf16 once is faster; a
1023-token prefill then runs near a bf16 model's speed.

On CUDA the weight is dequantized to the activation dtype for each call and F.linear does the
rest: the memory is saved, the speed is not gained (untested here: no GPU).

Tensor parallel (parallel.py) is supported: a rank quantizes its own shards, RowParallelLinear
becomes Int8RowParallelLinear (the partial products are scaled, all-reduced, then the bias is
added once), and the gathered vocab-parallel output layer stays gathered. A rank's row-parallel
shard has its own scales, so an mp=2 model is not bit-equal to the mp=1 quantized one.
"""

from __future__ import annotations

import types
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from cpmgen.model import CPMModel
from cpmgen.parallel import RowParallelLinear, VocabParallelEmbedding

QMAX = 127  # symmetric: -127..127, so that -W quantizes to -W_int8
QUANTIZE_ROWS = 1024  # rows quantized at a time (see quantize_rows)

# Up to this many input rows the int8 kernel is faster than converting the weight to bf16
# for F.linear (CPM-Small stack, two cores: 32 rows 24 ms against 30, 64 rows 49 against 43).
KERNEL_MAX_ROWS = 32

# `_weight_int8pack_mm`'s AVX-512 kernel loads 16 values at a time with aligned loads: other
# input widths give wrong results or crash the process, and so do misaligned inputs.
KERNEL_K_MULTIPLE = 16
KERNEL_ALIGNMENT = 32  # bytes, for the activation rows


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8: (W_int8 [N, K], scale [N] in weight's dtype), W ~ W_int8 * scale[:, None].

    The scale is rounded to the stored dtype before the weights are divided by it, so the
    bound |W - W_int8 * scale| <= scale / 2 holds for the scale actually stored. Rows go
    QUANTIZE_ROWS at a time: whole-matrix float temporaries of the 30000-row output layer
    took the loading peak of an int8 CPM-Small from 0.4 to 1 GB."""
    weight_int8 = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=weight.dtype, device=weight.device)
    for start in range(0, weight.shape[0], QUANTIZE_ROWS):
        rows = slice(start, start + QUANTIZE_ROWS)
        w = weight[rows].detach().float()
        scale[rows] = w.abs().amax(dim=1) / QMAX
        divisor = scale[rows].float().clamp(min=torch.finfo(torch.float32).tiny)[:, None]  # zero rows stay zero
        weight_int8[rows] = torch.round(w / divisor).clamp(-QMAX, QMAX)
    return weight_int8, scale


class Int8Linear(nn.Module):
    """y = (x @ W_int8^T) * scale + bias: an nn.Linear whose weight is stored as int8."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight_int8, scale = quantize_rows(weight)
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("scale", scale)
        # The CPU kernel takes scales in bf16 only: it gets ones, and the real scales are
        # applied to its output in the model's dtype.
        self.register_buffer("unit_scale", torch.ones_like(scale, dtype=torch.bfloat16), persistent=False)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def dequantized(self) -> torch.Tensor:
        """W_int8 * scale in the model's dtype (what the CUDA path multiplies by)."""
        return self.weight_int8.to(self.scale.dtype) * self.scale[:, None]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)

    def _linear(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.linear(x, self.dequantized(), bias)
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        if rows.shape[0] <= KERNEL_MAX_ROWS and self.in_features % KERNEL_K_MULTIPLE == 0:
            # (A compiled graph cannot read pointers; the buffers it allocates are aligned.)
            if not torch.compiler.is_compiling() and rows.data_ptr() % KERNEL_ALIGNMENT:
                rows = rows.clone()
            product = torch._weight_int8pack_mm(rows, self.weight_int8, self.unit_scale)
        else:
            product = F.linear(rows, self.weight_int8.to(torch.bfloat16))  # |W_int8| <= 127: exact in bf16
        product = product.view(*x.shape[:-1], self.out_features)
        out = product * self.scale if bias is None else torch.addcmul(bias, product, self.scale)
        return out.to(x.dtype)


class Int8RowParallelLinear(Int8Linear):
    """RowParallelLinear on int8 shards: y = all_reduce((x_r @ W_r^T) * scale_r) + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._linear(x, None)  # each rank's shard has its own scales: scale before the sum
        dist.all_reduce(out)
        return out + self.bias


def _int8_lm_head(self: CPMModel, x: torch.Tensor) -> torch.Tensor:
    return self.lm_head_int8(x)


def _int8_gathered_lm_head(self: CPMModel, x: torch.Tensor) -> torch.Tensor:
    """parallel.py's gathered head on the int8 copy of this rank's vocab slice."""
    local = self.lm_head_int8(x).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return torch.cat(parts, dim=-1)


def quantize_int8(model: CPMModel, replaced: Callable[[torch.Tensor], None] = lambda weight: None) -> CPMModel:
    """Replace, in place, the four linears of every block and the output layer by int8 ones.

    Call it on a loaded model (after load_state_dict) and before anything else rewrites its
    layers: a layer that is neither nn.Linear nor parallel.RowParallelLinear is an error. The
    model holds no reference to the float weights of the block linears afterwards (only their
    int8 copies and the biases); `replaced(weight)` is called with each as soon as its int8
    copy exists, so a loader can release its memory-mapped pages before the next one is
    read (as prepack.prepack_linears does). The output layer is tied to the word embedding, whose float table the input
    lookup still needs: it gets an int8 copy (vocab x hidden bytes) and keeps the table."""
    if "lm_head" in vars(model) and not isinstance(model.word_embeddings, VocabParallelEmbedding):
        raise ValueError("the output layer was already replaced (prepacked or quantized); quantize a freshly loaded model")
    for i, block in enumerate(model.transformer.layers):
        for parent_name, parent in (("attention", block.attention), ("mlp", block.mlp)):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    replacement = Int8Linear.from_linear(child)
                elif type(child) is RowParallelLinear:
                    replacement = Int8RowParallelLinear.from_linear(child)
                else:
                    raise ValueError(f"cannot quantize transformer.layers.{i}.{parent_name}.{name}: "
                                     f"{type(child).__name__} is not a plain or row-parallel linear")
                setattr(parent, name, replacement)  # the last reference to the float weight goes
                replaced(child.weight)
    gathered = isinstance(model.word_embeddings, VocabParallelEmbedding)
    model.lm_head_int8 = Int8Linear(model.word_embeddings.weight, None)
    model.lm_head = types.MethodType(_int8_gathered_lm_head if gathered else _int8_lm_head, model)
    replaced(model.word_embeddings.weight)  # from now on only looked up: a few rows a step
    return model
