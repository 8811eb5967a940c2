"""The decode step's attention on the CPU in one C++ op (cpmgen/kernels/attention.cpp).

At one new token per sequence, model.Attention's plain PyTorch form runs some twenty small
operations a layer (split, views, the cache writes, two matmuls, scaling, softmax) whose fixed
cost on a CPU exceeds their arithmetic. `fuse_decode_attention(model)` swaps each layer's
Attention for a DecodeAttention that runs those as one op: it writes the token's key and value
into cache slot `position` and attends to slots 0..position (what the model's mask allows a
one-token step to see). Every other call (a window's prefill, the slow recompute without a
cache, a compiled step) runs the model's own code. The op splits its work by sequence and head,
so, like the plain form, its values do not depend on the thread count; they differ from it by
rounding only.
"""

from __future__ import annotations

import torch

from cpmgen.kernels import decode_attention
from cpmgen.model import Attention, CPMModel, attention_dtype


class DecodeAttention(Attention):
    """An Attention (the same projections) whose one-token steps with a CPU cache run fused."""

    def __init__(self, attention: Attention):
        torch.nn.Module.__init__(self)
        self.num_heads, self.head_dim = attention.num_heads, attention.head_dim
        self.query_key_value, self.dense = attention.query_key_value, attention.dense

    def forward(self, x, input_pos, mask, kv_cache, layer, kv_len):
        batch, seq, _ = x.shape
        if seq != 1 or kv_cache is None or torch.compiler.is_compiling():
            return super().forward(x, input_pos, mask, kv_cache, layer, kv_len)
        positions = input_pos.expand(batch) if input_pos.dim() == 1 else input_pos[:, 0]
        out = decode_attention()(self.query_key_value(x), kv_cache.k[layer], kv_cache.v[layer], positions,
                                 self.num_heads)
        return self.dense(out)


def fuse_decode_attention(model: CPMModel) -> int:
    """Swap every layer's attention for DecodeAttention where the op runs (a CPU model with an fp32
    cache and the kernel library built); returns the number of layers swapped."""
    weight = model.word_embeddings.weight
    if weight.device.type != "cpu" or attention_dtype(weight) != torch.float32 or decode_attention() is None:
        return 0
    for block in model.transformer.layers:
        if type(block.attention) is Attention:
            block.attention = DecodeAttention(block.attention)
    return len(model.transformer.layers)
