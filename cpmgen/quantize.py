"""Int8 and int4 weights for a loaded CPMModel (`--quantize int8|int4`).

Decoding one token reads every weight once, so its speed is the speed at which the weights
stream from memory: int8 weights are a quarter of fp32 and half of bf16, int4 about an eighth
of fp32 (4.25 bits per weight with the group scales).

- int8: per output row, symmetric: W ~ scale[n] * w, w in -127..127.
- int4: per output row and group of GROUP inputs, asymmetric: W ~ scale[n] * q[n, g] * (u - z[n, g]),
  u in 0..15, with an integer group scale q in 1..63 and zero point z in 0..15.

The linears quantize their input on the fly, per row, symmetric (xq = round(x * 127 / max|x|),
as CTranslate2's int8 compute type does), and sum the integer products exactly in int32; only the
epilogue y = acc * (sx * scale) + bias is floating point (fp32). So every output element is
computed the same way whatever the number of rows (a decode step, a window's prefill, the slow
recompute): fast and slow generation see bitwise the same logits, and the C++ kernel
(cpmgen/kernels/qlinear.cpp: AVX-512 VNNI, AVX2 or plain C++ loops, whichever the CPU runs) and
the torch reference here agree bitwise.

Weights are stored in the kernel's blocked layout (see qlinear.cpp): 16 output rows interleaved
4 inputs at a time, offset to unsigned; `QuantizedLinear.int_weight()` unpacks them. The
quantized checkpoint folders of cpmgen/quantized_checkpoint.py store these same tensors.

On CUDA the weight is unpacked to the activation dtype for each call and F.linear does the
rest (inputs not quantized): the memory is saved, the speed is not gained.

Tensor parallel (parallel.py) is supported: a rank quantizes its own shards, RowParallelLinear
becomes QuantizedRowParallelLinear (each rank's partial product is scaled, all-reduced, then
the bias is added once), and the gathered vocab-parallel output layer stays gathered.
"""

from __future__ import annotations

from typing import Callable, Optional

import re

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from cpmgen import kernels
from cpmgen.model import CPMModel, TiedOutput
from cpmgen.parallel import GatheredOutput, RowParallelLinear

BITS = {"int8": 8, "int4": 4}
LANES = 16  # output rows per block of the packed layout
GROUP = 32  # int4: inputs per group
GROUP_SCALE_MAX = 63  # int4 group scales 1..63: |q * (u - z) * xq| * 17,000 inputs < 2^31
MAX_INT4_INPUTS = 17_000
# int4 group scales tried, relative to the one that spans the group's range: the one with the
# least squared error is kept (a slightly smaller step often fits a group better).
SCALE_SEARCH = (0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1)
# Weight values quantized at a time (whole rows, at least LANES): bounds the float temporaries,
# of which int4's scale search holds several of this size at once. A fixed count of rows made
# them grow with the row length (CPM-Large's MLP rows are 10240 long) and set a loading
# model's peak memory.
QUANTIZE_FLOATS = 1 << 21


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _int4_groups(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit of groups [rows, G, group] with integer group scales:
    (unit [rows], q [rows, G], z [rows, G], u [rows, G, group]), W ~ unit * q * (u - z)."""
    tiny = torch.finfo(torch.float32).tiny  # zero rows and groups stay zero
    low, high = groups.amin(dim=2).clamp(max=0), groups.amax(dim=2).clamp(min=0)
    span = (high - low) / 15
    unit = span.amax(dim=1) / GROUP_SCALE_MAX
    best = None
    for factor in SCALE_SEARCH:
        q = torch.round(span * factor / unit.clamp(min=tiny)[:, None]).clamp(1, GROUP_SCALE_MAX)
        step = (q * unit[:, None]).clamp(min=tiny)
        z = torch.round(-low / step).clamp(0, 15)
        u = (torch.round(groups / step[..., None]) + z[..., None]).clamp(0, 15)
        error = ((u - z[..., None]) * step[..., None] - groups).square().sum(dim=2)
        if best is None:
            best = [error, q, z, u]
        else:
            better = error < best[0]
            best = [torch.where(better, error, best[0]), torch.where(better, q, best[1]),
                    torch.where(better, z, best[2]), torch.where(better[..., None], u, best[3])]
    return unit, best[1], best[2], best[3]


# The linears of a block that are quantized (the output layer is too, from the word embedding).
QUANTIZED_LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_BLOCK_LINEAR = re.compile(r"^(transformer\.layers\.\d+\.(?:" + "|".join(map(re.escape, QUANTIZED_LINEARS))
                           + r"))\.(weight|bias)$")


def quantized_linear(name: str) -> Optional[str]:
    """"transformer.layers.3.mlp.dense_h_to_4h" for that linear's weight or bias, else None."""
    match = _BLOCK_LINEAR.match(name)
    return match.group(1) if match else None


def quantize_weight(weight: torch.Tensor, bits: int, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """{"packed", "gparams", "scale"}: the layout qlinear.cpp reads (gparams is empty for int8).

    int8: symmetric per row. int4: asymmetric per group of GROUP inputs, an integer scale and
    zero point per group and one float scale per row. Rows go a block of about QUANTIZE_FLOATS
    values at a time (each row's values depend on that row alone), so the temporaries stay small
    next to the weight; `dtype`: the model's float type, which each
    block of rows is rounded to first (as if the weight had been loaded in it), so a weight
    can be quantized from its stored copy without a converted copy of the whole model."""
    n, k = weight.shape
    n_pad, k_pad = _round_up(n, LANES), _round_up(k, 4 if bits == 8 else GROUP)
    ints = torch.full((n_pad, k_pad), 128 if bits == 8 else 0, dtype=torch.uint8)  # padding: weight 0
    gparams = torch.zeros(n_pad, 2, k_pad // GROUP if bits == 4 else 0, dtype=torch.uint8)
    gparams[:, 0] = 1
    scale = torch.zeros(n_pad, dtype=torch.float32)
    block_rows = max(LANES, QUANTIZE_FLOATS // k_pad)
    for start in range(0, n, block_rows):
        rows = slice(start, min(start + block_rows, n))
        w = torch.zeros(rows.stop - start, k_pad)
        w[:, :k] = weight[rows].detach().to(dtype or weight.dtype).float().cpu()
        if bits == 8:
            scale[rows] = w.abs().amax(dim=1) / 127
            q = torch.round(w / scale[rows].clamp(min=torch.finfo(torch.float32).tiny)[:, None]).clamp(-127, 127)
            ints[rows] = (q + 128).to(torch.uint8)
        else:
            scale[rows], q, z, u = _int4_groups(w.view(w.shape[0], -1, GROUP))
            ints[rows] = u.to(torch.uint8).view(w.shape)
            gparams[rows, 0], gparams[rows, 1] = q.to(torch.uint8), z.to(torch.uint8)
    blocks = n_pad // LANES
    if bits == 8:
        packed = ints.view(blocks, LANES, k_pad // 4, 4).permute(0, 2, 1, 3)
    else:
        nibbles = ints.view(blocks, LANES, k_pad // 8, 2, 4).permute(0, 2, 3, 1, 4)  # [b, k/8, lo|hi, 16, 4]
        packed = nibbles[:, :, 0] | (nibbles[:, :, 1] << 4)
    return {"packed": packed.contiguous(), "scale": scale[:n].clone(),
            "gparams": gparams.view(blocks, LANES, 2, -1).permute(0, 3, 2, 1).contiguous()}


def unpack_int_weight(packed: torch.Tensor, gparams: torch.Tensor, n: int, k: int, bits: int) -> torch.Tensor:
    """The integer weight [n, k] (int16) the packed tensors stand for: w, or q * (u - z) for int4."""
    rows = packed.shape[0] * LANES
    if bits == 8:
        return (packed.permute(0, 2, 1, 3).reshape(rows, -1).to(torch.int16) - 128)[:n, :k]
    nibbles = torch.stack((packed & 15, packed >> 4), dim=2)  # [b, k/8, 2, 16, 4]
    u = nibbles.permute(0, 3, 1, 2, 4).reshape(rows, -1).to(torch.int16)
    q, z = (gparams[:, :, i].permute(0, 2, 1).reshape(rows, -1).to(torch.int16) for i in (0, 1))
    group = u.shape[1] // q.shape[1]
    return ((u - z.repeat_interleave(group, dim=1)) * q.repeat_interleave(group, dim=1))[:n, :k]


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 of activations [m, k]: (xq int8, sx fp32 [m, 1]), x ~ sx * xq."""
    x = x.float()
    amax = x.abs().amax(dim=1, keepdim=True)
    inverse = torch.full_like(amax, 127.0) / amax  # not 127 / amax: torch computes that as 127 * (1 / amax)
    xq = torch.where(amax > 0, torch.round(x * inverse), 0.0).clamp(-127, 127)
    return xq.to(torch.int8), amax / 127


def reference_linear(x: torch.Tensor, int_weight: torch.Tensor, scale: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
    """What the kernel computes, in torch operations: x [m, k] fp32 or bf16 -> [m, n] in x's dtype.
    The integer sums are exact in float64 (far below 2^53)."""
    xq, sx = quantize_rows_int8(x)
    out = (xq.double() @ int_weight.double().t()).float() * (sx * scale)
    if bias is not None:
        out = out + bias
    return out.to(x.dtype)


class QuantizedLinear(nn.Module):
    """y = x @ W^T + b with W stored as int8 or group-scaled int4 (see the module docstring)."""

    def __init__(self, packed: torch.Tensor, gparams: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                 in_features: int, bits: int):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, scale.shape[0], bits
        self.group = GROUP if bits == 4 else 0
        self.register_buffer("packed", packed)
        self.register_buffer("gparams", gparams)
        self.register_buffer("scale", scale)
        # fp32: the epilogue's precision whatever the model's dtype.
        self.register_buffer("bias", None if bias is None else bias.detach().float())

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], bits: int,
                    dtype: Optional[torch.dtype] = None) -> "QuantizedLinear":
        t = quantize_weight(weight, bits, dtype)
        device = weight.device
        return cls(t["packed"].to(device), t["gparams"].to(device), t["scale"].to(device), bias, weight.shape[1], bits)

    def int_weight(self) -> torch.Tensor:
        return unpack_int_weight(self.packed, self.gparams, self.out_features, self.in_features, self.bits)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.int_weight().float() * self.scale[:, None]).to(dtype)

    def extra_repr(self) -> str:
        group = f", group={self.group}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)

    def _linear(self, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        # The decode step calls this ~50 times per token: the common case goes straight to the kernel.
        kernel = kernels.op("qlinear")
        if kernel is not None and x.is_cpu and x.dtype in kernels.INPUT_DTYPES:
            return kernel(x, self.packed, self.gparams, self.scale, bias, self.out_features, self.bits, self.group)
        if not x.is_cpu:
            return F.linear(x, self.dequantized(x.dtype), None if bias is None else bias.to(x.dtype))
        if x.dtype not in kernels.INPUT_DTYPES:  # fp16: through fp32
            return self._linear(x.float(), bias).to(x.dtype)
        rows = x.reshape(-1, self.in_features)
        out = reference_linear(rows, self.int_weight(), self.scale, bias)
        return out.view(*x.shape[:-1], self.out_features)


class QuantizedRowParallelLinear(QuantizedLinear):
    """RowParallelLinear on quantized shards: y = all_reduce(x_r @ W_r^T) + b."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._linear(x, None)  # each rank's partial sum, scaled by its own scales
        dist.all_reduce(out)
        return out + self.bias.to(out.dtype)


class QuantizedOutput(nn.Module):
    """The tied output layer on a quantized copy of the word-embedding table (which the input
    lookup still needs as it is)."""

    def __init__(self, linear: QuantizedLinear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def block_linears(model: CPMModel):
    """(parent module, attribute name, dotted name) of the four linears of every block."""
    for i, block in enumerate(model.transformer.layers):
        for parent_name, parent in (("attention", block.attention), ("mlp", block.mlp)):
            for name, _ in list(parent.named_children()):
                yield parent, name, f"transformer.layers.{i}.{parent_name}.{name}"


def set_lm_head(model: CPMModel, linear: QuantizedLinear) -> None:
    """The output layer on `linear` (under tensor parallel: this rank's part of the gathered head)."""
    if isinstance(model.lm_head, GatheredOutput):
        model.lm_head.local = QuantizedOutput(linear)
    else:
        model.lm_head = QuantizedOutput(linear)


def quantize_model(model: CPMModel, kind: str, replaced: Callable[[torch.Tensor], None] = lambda weight: None) -> CPMModel:
    """Replace, in place, the four linears of every block and the output layer by quantized ones
    (`kind` "int8" or "int4"; the output layer is int8 for both).

    Call it on a loaded model (after load_state_dict) and before anything else rewrites its
    layers: a layer that is neither nn.Linear nor parallel.RowParallelLinear is an error. The
    model holds no reference to the float weights of the block linears afterwards (only their
    quantized copies and the biases); `replaced(weight)` is called with each as soon as its copy
    exists, so a loader can release its memory-mapped pages before the next one is read (as
    prepack.prepack_linears does). The output layer is tied to the word embedding, whose float
    table the input lookup still needs: it gets a quantized copy and keeps the table."""
    head = model.lm_head.local if isinstance(model.lm_head, GatheredOutput) else model.lm_head
    if type(head) is not TiedOutput:
        raise ValueError("the output layer was already replaced (prepacked or quantized); quantize a freshly loaded model")
    bits, dtype = BITS[kind], model.word_embeddings.weight.dtype
    for parent, name, dotted in block_linears(model):
        child = getattr(parent, name)
        if type(child) is nn.Linear:
            cls = QuantizedLinear
        elif type(child) is RowParallelLinear:
            cls = QuantizedRowParallelLinear
        else:
            raise ValueError(f"cannot quantize {dotted}: {type(child).__name__} is not a plain or row-parallel linear")
        bits_here = bits if child.weight.shape[1] <= MAX_INT4_INPUTS else 8
        # the float weight's last reference; it may still be in the checkpoint's stored dtype (loading.py)
        setattr(parent, name, cls.from_weight(child.weight, child.bias, bits_here, dtype))
        replaced(child.weight)
    set_lm_head(model, QuantizedLinear.from_weight(model.word_embeddings.weight, None, 8))
    replaced(model.word_embeddings.weight)  # from now on only looked up: a few rows a step
    return model
