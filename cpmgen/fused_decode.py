"""The decode step on the CPU with fewer, larger operations (C++ ops of cpmgen/kernels).

At one new token per sequence the arithmetic of a layer is small, and on a CPU the fixed cost
of each PyTorch operation and module call adds up to a large share of the step. `fuse_decode(model)`
swaps modules after loading, as prepack.py and quantize.py do:

- Attention -> DecodeAttention: the attention of a one-token step (split, views, cache writes, two
  matmuls, scaling, softmax) as one op that writes the token's key and value into cache slot
  `position` and attends to slots 0..position (what the model's mask lets a one-token step see).
  Its values differ from the plain form's by rounding only.
- Block -> QuantizedDecodeBlock, where the block's four linears hold int8/int4 weights: the whole
  one-token step of the block as one op running the same operations as its modules in the same
  order (layer norms, quantized linears, the fused attention, GELU, residual adds): bitwise the
  same values, one Python call instead of some twenty.

Every other call (a window's prefill, the slow recompute without a cache, a compiled step) runs
the modules' own code. The ops split their work by sequence and head or by output rows, so their
values do not depend on the thread count.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cpmgen.kernels import decode_attention, decode_block
from cpmgen.model import Attention, Block, CPMModel, attention_dtype
from cpmgen.quantize import KERNEL_DTYPES, QuantizedLinear


def one_token_step(x: torch.Tensor, kv_cache) -> bool:
    return x.shape[1] == 1 and kv_cache is not None and not torch.compiler.is_compiling()


def step_positions(input_pos: torch.Tensor, batch: int) -> torch.Tensor:
    """Each sequence's position [batch] from a one-token step's input_pos ([1] or [batch, 1])."""
    return input_pos.expand(batch) if input_pos.dim() == 1 else input_pos[:, 0]


class DecodeAttention(Attention):
    """An Attention (the same projections) whose one-token steps with a cache run as one op."""

    def __init__(self, attention: Attention):
        nn.Module.__init__(self)
        self.num_heads, self.head_dim = attention.num_heads, attention.head_dim
        self.query_key_value, self.dense = attention.query_key_value, attention.dense

    def forward(self, x, input_pos, mask, kv_cache, layer, kv_len):
        if not one_token_step(x, kv_cache):
            return super().forward(x, input_pos, mask, kv_cache, layer, kv_len)
        out = decode_attention()(self.query_key_value(x), kv_cache.k[layer], kv_cache.v[layer],
                                 step_positions(input_pos, x.shape[0]), self.num_heads)
        return self.dense(out)


class QuantizedDecodeBlock(Block):
    """A Block (the same modules) whose one-token steps with a cache run as one op."""

    LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")

    def __init__(self, block: Block):
        nn.Module.__init__(self)
        self.input_layernorm, self.attention = block.input_layernorm, block.attention
        self.post_attention_layernorm, self.mlp = block.post_attention_layernorm, block.mlp
        linears = [self.get_submodule(name) for name in self.LINEARS]
        self.bits, self.group, self.eps = linears[0].bits, linears[0].group, self.input_layernorm.eps
        # The op's tensor lists, built once: they share the modules' tensors.
        self.norms = [self.input_layernorm.weight, self.input_layernorm.bias,
                      self.post_attention_layernorm.weight, self.post_attention_layernorm.bias]
        self.packed = [linear.packed for linear in linears]
        self.gparams = [linear.gparams for linear in linears]
        self.scales = [linear.scale for linear in linears]
        self.biases = [linear.bias for linear in linears]
        self.out_features = [linear.out_features for linear in linears]

    @classmethod
    def fits(cls, block: Block) -> bool:
        linears = [block.get_submodule(name) for name in cls.LINEARS]
        norms = (block.input_layernorm, block.post_attention_layernorm)
        return (all(type(linear) is QuantizedLinear and (linear.bits, linear.group) == (linears[0].bits, linears[0].group)
                    for linear in linears)
                and all(type(norm) is nn.LayerNorm and norm.eps == norms[0].eps and norm.bias is not None
                        for norm in norms))

    def forward(self, x, input_pos, mask, kv_cache, layer, kv_len):
        if not one_token_step(x, kv_cache):
            return super().forward(x, input_pos, mask, kv_cache, layer, kv_len)
        return decode_block()(x, self.norms, self.packed, self.gparams, self.scales, self.biases, self.out_features,
                              self.bits, self.group, self.eps, kv_cache.k[layer], kv_cache.v[layer],
                              step_positions(input_pos, x.shape[0]), self.attention.num_heads)


def fuse_decode(model: CPMModel) -> int:
    """Swap in DecodeAttention for every layer, and QuantizedDecodeBlock for every block whose
    linears are int8/int4, where the ops run (a CPU model with an fp32 cache, the kernel library
    built); returns the number of layers changed."""
    weight = model.word_embeddings.weight
    if weight.device.type != "cpu" or attention_dtype(weight) != torch.float32 or decode_attention() is None:
        return 0
    layers = model.transformer.layers
    for i, block in enumerate(layers):
        if type(block.attention) is Attention:
            block.attention = DecodeAttention(block.attention)
        if type(block) is Block and weight.dtype in KERNEL_DTYPES and QuantizedDecodeBlock.fits(block):
            layers[i] = QuantizedDecodeBlock(block)
    return len(layers)
