"""CPU linears on oneDNN prepacked weights: batch-1 decode at memory bandwidth.

Decoding one token is a matrix-vector product per linear layer, and time goes into reading
the weights. For that shape, `F.linear` calls MKL's GEMV, which runs on one core; oneDNN's
linear on a weight reordered once into its blocked layout splits the rows over all cores, so
it reads the weights faster. The same packed weights also speed up the prefill of a window,
so the re-encode after a window slide gets cheaper too (README, Performance).

The model code is untouched: `prepack_linears(model)` swaps modules after loading, as
parallel.py does for tensor parallelism. Results differ from `F.linear` by rounding only
(summation order); every path (decode, prefill, the slow recompute) goes through the same
packed layers, so fast and slow generation still see the same computation.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from cpmgen.model import CPMModel, TiedOutput


def supported(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN linear kernels exist for this device and dtype (CPU fp32 always; bf16 needs AVX-512)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


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


def prepack_linears(model: CPMModel, replaced: Callable[[torch.Tensor], None] = lambda weight: None) -> int:
    """Replace every plain nn.Linear of the blocks, and the output layer, by packed ones.

    The output layer is tied to the word embedding, which the input lookup still needs in
    its plain layout, so it costs a packed copy of that matrix (vocab x hidden); it is the
    largest single weight, read on every step, so the copy pays for itself in speed.
    `replaced(weight)` is called with each plain weight once its packed copy exists (the word
    embedding too, which is only looked up from then on), so a loader can let the weight's
    mapped pages go before the next one is packed: peak memory stays at the model's size,
    not twice it. Returns the number of layers packed (0 where oneDNN
    cannot run this model)."""
    weight = model.word_embeddings.weight
    if not supported(weight.device, weight.dtype) or weight.requires_grad:
        return 0
    count = 0
    for block in model.transformer.layers:
        for parent in (block.attention, block.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:  # tensor-parallel row layers keep their own forward
                    setattr(parent, name, PackedLinear(child))
                    replaced(child.weight)
                    count += 1
    if type(model.lm_head) is TiedOutput:  # not quantized, not gathered over ranks
        model.lm_head = PackedOutput(weight)
        replaced(weight)  # from now on only looked up: a few rows a step
        count += 1
    return count

