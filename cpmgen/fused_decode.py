"""The decode step on the CPU with fewer, larger operations (C++ ops of cpmgen/kernels).

At one new token per sequence the arithmetic of a layer is small, and on a CPU the fixed cost
of each PyTorch operation and module call adds up to a large share of the step. `fuse_decode(model)`
swaps modules after loading, as prepack.py and quantize.py do:

- Attention -> DecodeAttention: the attention of a one-token step (split, views, cache writes, two
  matmuls, scaling, softmax) as one op that writes the token's key and value into cache slot
  `position` and attends to slots 0..position (what the model's mask lets a one-token step see);
  and a window's causal attention (a prefill, the slow path's recompute) as cpmgen's
  causal_attention instead of SDPA's fused kernel, which ran it at about half the speed. Their
  values differ from the plain form's by rounding only.
- MLP -> KernelGeluMLP: the tanh GELU as cpmgen's gelu_tanh_ (kernels/gelu.cpp), which the fused
  block runs too; ATen's ran at about a nanosecond an element on one core. Its values are the
  same function's within rounding (closer to the exact one than F.gelu's tanh form).
- LayerNorm -> KernelLayerNorm (the blocks' and the final one): cpmgen's layer_norm
  (kernels/layernorm.cpp), which the fused block runs too; ATen's took a few microseconds a call
  at one token, more than its arithmetic. The same function within rounding.
- Block -> DecodeBlock: the whole one-token step of a block as one call (kernels/block.cpp's
  BlockStep, which holds the block's tensors) that runs the same operations as its modules in
  the same order (layer norms, the linears: plain, oneDNN-prepacked, cpmgen's GEMV or int8/int4,
  the fused attention, GELU, residual adds): bitwise the same values, one Python call instead of
  some twenty, and with cpmgen's own linears one parallel region instead of one per operation.
- Transformer -> DecodeTransformer, where every block is a DecodeBlock: the blocks' one-token
  steps in one call (block.cpp's StackStep runs their BlockSteps in turn, with cpmgen's own
  linears in one parallel region for all of them): the same values, one Python call a step
  instead of one a block.
- CPMModel.fused_step = FusedStep, where the transformer is a DecodeTransformer: the whole
  one-token step (the embeddings' rows added, the blocks, the final layer norm, the output layer)
  in one call (block.cpp's ModelStep; the output layer in the blocks' parallel region where it is
  cpmgen's int8 or GEMV): the same values, without the Python calls, tensors and second region
  around the blocks that cost a small model's step about as much as its output layer's arithmetic.

Every other call (a window's prefill, the slow recompute without a cache, a compiled step) runs
the modules' own code, with the attention, the layer norms and the GELU above (not while compiling). The ops split
their work by sequence and head or by output rows, so their values do not depend on the thread
count.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from cpmgen import kernels
from cpmgen.model import MLP, Attention, Block, CPMModel, TiedOutput, Transformer, one_token_step
from cpmgen.prepack import GemvLinear, GemvOutput, PackedLinear, PackedOutput
from cpmgen.quantize import QuantizedLinear, QuantizedOutput


class DecodeAttention(Attention):
    """An Attention (the same projections) whose one-token steps with a cache run as one op, and
    whose causal windows run cpmgen's causal_attention."""

    def __init__(self, attention: Attention):
        nn.Module.__init__(self)
        self.num_heads, self.head_dim, self.kv_dtype = attention.num_heads, attention.head_dim, attention.kv_dtype
        self.query_key_value, self.dense = attention.query_key_value, attention.dense

    def forward(self, x, input_pos, mask, kv_cache, layer, kv_len, last_only=False):
        if not one_token_step(x, kv_cache):
            return super().forward(x, input_pos, mask, kv_cache, layer, kv_len, last_only)
        attend = kernels.op("decode_attention")
        # input_pos of a one-token step: [1] (one position for all rows) or [batch, 1], as the op takes it
        out = attend(self.query_key_value(x), kv_cache.k[layer], kv_cache.v[layer], input_pos, self.num_heads)
        return self.dense(out)

    def attend(self, q, k, v, mask):
        if mask is None and q.shape[2] > 1 and q.dtype == torch.float32:  # a window encoded at 0..T-1
            return kernels.op("causal_attention")(q, k, v)
        return super().attend(q, k, v, mask)


class KernelGeluMLP(MLP):
    """An MLP (the same linears) whose tanh GELU is cpmgen's gelu_tanh_ (in place)."""

    def __init__(self, mlp: MLP):
        nn.Module.__init__(self)
        self.dense_h_to_4h, self.dense_4h_to_h = mlp.dense_h_to_4h, mlp.dense_4h_to_h

    def forward(self, x):
        if torch.compiler.is_compiling():  # a compiled step runs the modules' own code (inductor fuses it)
            return super().forward(x)
        return self.dense_4h_to_h(kernels.op("gelu_tanh_")(self.dense_h_to_4h(x)))  # in place: a new tensor


class KernelLayerNorm(nn.LayerNorm):
    """A LayerNorm (the same weight, bias and eps) run by cpmgen's layer_norm (kernels/layernorm.cpp),
    the one the fused block runs on its one-token steps."""

    def __init__(self, norm: nn.LayerNorm):
        nn.Module.__init__(self)
        self.normalized_shape, self.eps, self.elementwise_affine = norm.normalized_shape, norm.eps, True
        self.weight, self.bias = norm.weight, norm.bias

    @classmethod
    def fits(cls, norm: nn.Module) -> bool:
        """A plain LayerNorm over one dimension, with a weight and a bias."""
        return (type(norm) is nn.LayerNorm and len(norm.normalized_shape) == 1 and norm.weight is not None
                and norm.bias is not None)

    def forward(self, x):
        if torch.compiler.is_compiling():  # a compiled step runs the module's own code (inductor fuses it)
            return super().forward(x)
        return kernels.op("layer_norm")(x, self.weight, self.bias, self.eps)


class DecodeBlock(Block):
    """A Block (the same modules) whose one-token steps with a cache run as one call. Made after
    loading: its BlockStep holds the modules' tensors as they are then (the same tensor objects,
    so a later change of their storage, as hugepages makes, is seen)."""

    LINEARS = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
    # each linear type: its kind in kernels/block.cpp, and the attribute holding its weight
    KINDS = {nn.Linear: ("plain", "weight"), PackedLinear: ("packed", "packed_weight"),
             QuantizedLinear: ("quantized", "packed"), GemvLinear: ("gemv", "weight")}

    def __init__(self, block: Block):
        nn.Module.__init__(self)
        self.input_layernorm, self.attention = block.input_layernorm, block.attention
        self.post_attention_layernorm, self.mlp = block.post_attention_layernorm, block.mlp
        linears = [self.get_submodule(name) for name in self.LINEARS]
        kind, weight = self.KINDS[type(linears[0])]
        quantized = type(linears[0]) is QuantizedLinear
        self.step = kernels.block_step(
            kind,
            norms=[self.input_layernorm.weight, self.input_layernorm.bias,
                   self.post_attention_layernorm.weight, self.post_attention_layernorm.bias],
            weights=[getattr(linear, weight) for linear in linears],
            gparams=[linear.gparams for linear in linears] if quantized else [],
            scales=[linear.scale for linear in linears] if quantized else [],
            biases=[linear.bias for linear in linears],
            out_features=[linear.out_features for linear in linears],
            bits=linears[0].bits if quantized else 0, group=linears[0].group if quantized else 0,
            eps=self.input_layernorm.eps, heads=self.attention.num_heads)
        self.step_forward = self.step.forward  # looked up once: each lookup makes a new method object

    def __deepcopy__(self, memo: dict) -> "DecodeBlock":
        """A copy of the modules with a BlockStep of its own over the copied tensors (copy.deepcopy
        cannot follow the C++ object's references)."""
        block = Block.__new__(Block)
        nn.Module.__init__(block)
        for name in ("input_layernorm", "attention", "post_attention_layernorm", "mlp"):
            setattr(block, name, copy.deepcopy(getattr(self, name), memo))
        memo[id(self)] = copied = DecodeBlock(block)
        return copied

    @classmethod
    def fits(cls, block: Block) -> bool:
        """The block's linears are all of one kind the op runs (and, quantized, of one bits and
        group), its norms KernelLayerNorms of one eps."""
        linears = [block.get_submodule(name) for name in cls.LINEARS]
        kinds = {(type(linear), getattr(linear, "bits", 0), getattr(linear, "group", 0)) for linear in linears}
        norms = (block.input_layernorm, block.post_attention_layernorm)
        return (len(kinds) == 1 and type(linears[0]) in cls.KINDS
                and all(type(norm) is KernelLayerNorm and norm.eps == norms[0].eps
                        for norm in norms))

    def forward(self, x, input_pos, mask, kv_cache, layer, kv_len, last_only=False):
        if not one_token_step(x, kv_cache):
            return super().forward(x, input_pos, mask, kv_cache, layer, kv_len, last_only)
        return self.step_forward(x, kv_cache.k[layer], kv_cache.v[layer], input_pos)


class DecodeTransformer(Transformer):
    """A Transformer (the same blocks and final norm) whose one-token steps with a cache run all
    its DecodeBlocks in one call. Made after fuse_decode has swapped every block: its StackStep
    holds those blocks' BlockSteps."""

    def __init__(self, transformer: Transformer):
        nn.Module.__init__(self)
        self.layers, self.final_layernorm = transformer.layers, transformer.final_layernorm
        self.step = kernels.stack_step([layer.step for layer in self.layers])
        self.step_forward = self.step.forward

    def __deepcopy__(self, memo: dict) -> "DecodeTransformer":
        """A copy of the blocks (each DecodeBlock with a BlockStep of its own) under a StackStep of its own."""
        transformer = Transformer.__new__(Transformer)
        nn.Module.__init__(transformer)
        transformer.layers = copy.deepcopy(self.layers, memo)
        transformer.final_layernorm = copy.deepcopy(self.final_layernorm, memo)
        memo[id(self)] = copied = DecodeTransformer(transformer)
        return copied

    def forward(self, x, input_pos, mask, kv_cache, kv_len, last_only=False):
        if not one_token_step(x, kv_cache):
            return super().forward(x, input_pos, mask, kv_cache, kv_len, last_only)
        return self.step_forward(x, kv_cache.k, kv_cache.v, input_pos)


class FusedStep(nn.Module):
    """A CPMModel's one-token step with a cache in one call (block.cpp's ModelStep over the
    DecodeTransformer's StackStep, the embedding tables, the final layer norm and the output
    layer): bitwise the logits of the modules. It holds no parameters (the state dict stays the
    model's), only the modules it was made from, in a tuple (not registered), so that a deep copy
    of the model makes one over the copied modules. Made last, after loading: a model whose
    transformer or output layer is swapped after it must set `fused_step` to None or a new one."""

    # each output layer type: its kind in kernels/block.cpp
    HEADS = {TiedOutput: "plain", PackedOutput: "packed", GemvOutput: "gemv", QuantizedOutput: "quantized"}

    def __init__(self, word_embeddings: nn.Embedding, position_embeddings: nn.Embedding,
                 transformer: "DecodeTransformer", lm_head: nn.Module):
        super().__init__()
        self.sources = (word_embeddings, position_embeddings, transformer, lm_head)
        table, norm = word_embeddings.weight, transformer.final_layernorm
        kind = self.HEADS[type(lm_head)]
        weight, gparams, scale, bits, group = table, torch.empty(0), torch.empty(0), 0, 0  # plain, gemv: the table
        if kind == "packed":
            weight = lm_head.packed_weight
        elif kind == "quantized":
            linear = lm_head.linear
            weight, gparams, scale, bits, group = linear.packed, linear.gparams, linear.scale, linear.bits, linear.group
        self.step = kernels.model_step(
            table, position_embeddings.weight, transformer.step, norm_weight=norm.weight, norm_bias=norm.bias,
            eps=norm.eps, head_kind=kind, head_weight=weight, head_gparams=gparams, head_scale=scale,
            vocab=table.shape[0], bits=bits, group=group)
        self.step_forward = self.step.forward  # looked up once: each lookup makes a new method object

    @classmethod
    def fits(cls, model: CPMModel) -> bool:
        """Every block fused into a DecodeTransformer, a KernelLayerNorm final norm, an output
        layer of a kind the op runs (not gathered over ranks; quantized: without a bias)."""
        head = model.lm_head
        return (type(model.transformer) is DecodeTransformer and type(head) in cls.HEADS
                and type(model.transformer.final_layernorm) is KernelLayerNorm
                and (type(head) is not QuantizedOutput or head.linear.bias is None))

    def __deepcopy__(self, memo: dict) -> "FusedStep":
        memo[id(self)] = copied = FusedStep(*copy.deepcopy(self.sources, memo))
        return copied

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor, kv_cache) -> torch.Tensor:
        """ids [batch, 1], input_pos as CPMModel.attention_plan gives it -> logits [batch, 1, vocab]."""
        return self.step_forward(ids, input_pos, kv_cache.k, kv_cache.v)[:, None]


def fuse_decode(model: CPMModel) -> int:
    """Swap in KernelLayerNorm for every layer norm, DecodeAttention and KernelGeluMLP for every
    layer, DecodeBlock for every block whose linears the op runs (not tensor-parallel ones, which
    all-reduce), DecodeTransformer where that was every block, and the model's FusedStep where
    that and its output layer allow, where the ops run: a CPU model in fp32 or bf16 with the
    kernel library built. Returns the number of layers changed."""
    weight = model.word_embeddings.weight
    if weight.device.type != "cpu" or weight.dtype not in kernels.INPUT_DTYPES or not kernels.loaded():
        return 0
    layers = model.transformer.layers
    if KernelLayerNorm.fits(model.transformer.final_layernorm):
        model.transformer.final_layernorm = KernelLayerNorm(model.transformer.final_layernorm)
    for i, block in enumerate(layers):
        for name in ("input_layernorm", "post_attention_layernorm"):
            if KernelLayerNorm.fits(getattr(block, name)):
                setattr(block, name, KernelLayerNorm(getattr(block, name)))
        if type(block.attention) is Attention:
            block.attention = DecodeAttention(block.attention)
        if type(block.mlp) is MLP:
            block.mlp = KernelGeluMLP(block.mlp)
        if type(block) is Block and DecodeBlock.fits(block):
            layers[i] = DecodeBlock(block)
    if type(model.transformer) is Transformer and all(type(block) is DecodeBlock for block in layers):
        model.transformer = DecodeTransformer(model.transformer)
    if FusedStep.fits(model):
        model.fused_step = FusedStep(model.word_embeddings, model.position_embeddings, model.transformer, model.lm_head)
    return len(layers)
