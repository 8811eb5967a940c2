"""CPM-1: the Megatron GPT-2 of the public releases, in plain PyTorch.

Pre-LayerNorm blocks, fused QKV, tanh GELU, masked scores set to -10000 (not -inf), learned
absolute positions, output layer tied to the word embedding. Module names follow the
Megatron checkpoints, so an mp=1 `module` state dict loads as it is.

Positions are explicit: every forward takes the position id of each input token. With a
`KVCache`, a token at position p writes its keys/values into cache slot p and attends to
slots 0..p, so the cache always holds the window's tokens at the positions they were
encoded with; a window slide is a re-encode of the kept tokens at new positions
(see window.py), never a shift of cached entries.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpmgen.config import ModelArgs

MASKED_SCORE = -10000.0  # Megatron's value for masked attention scores


class KVCache:
    """Keys and values in preallocated buffers, one [batch, heads, slots, head_dim] pair per layer.

    Allocated once and written in place; `rows` gives a view of some batch rows (sharing
    the buffers) so one sample can be re-encoded without touching the others. A buffer per
    layer, not one tensor for all: under torch.compile a write into a slice of one big input
    became a copy of the whole cache on every step (see also `update`)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v

    @classmethod
    def allocate(cls, num_layers: int, batch_size: int, num_heads: int, slots: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, zeros: Callable = torch.zeros) -> "KVCache":
        """`zeros(shape, dtype=, device=)` makes each buffer (torch.zeros or hugepages.zeros)."""
        shape = (batch_size, num_heads, slots, head_dim)
        return cls(*([zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)] for _ in "kv"))

    @property
    def slots(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def rows(self, index: slice) -> "KVCache":
        return KVCache([t[index] for t in self.k], [t[index] for t in self.v])

    def share_first_row(self, length: int) -> None:
        """Every other batch row gets row 0's keys and values in slots 0..length-1 (samples that
        share a prompt of `length` tokens). Only the written slots: copying whole buffers cost more
        than the prompt's prefill, even for one sample, and touched every page of the cache at once."""
        for t in self.k + self.v:
            t[1:, :, :length] = t[:1, :, :length]

    def update(self, layer: int, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int):
        """Write k, v [batch, heads, T, head_dim] at slots input_pos ([T] for every row, or
        [batch, T]), in the cache's dtype; return slots 0..length-1."""
        k_cache, v_cache = self.k[layer], self.v[layer]
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
        if input_pos.dim() == 1:
            k_cache.index_copy_(2, input_pos, k)
            v_cache.index_copy_(2, input_pos, v)
        else:
            # Indexed assignment, not scatter_: torch.compile writes it into the cache in place,
            # where a scatter_ became a copy of the layer's whole cache on every step.
            rows = torch.arange(k.shape[0], device=k.device)[:, None]
            k_cache[rows, :, input_pos] = k.transpose(1, 2)
            v_cache[rows, :, input_pos] = v.transpose(1, 2)
        return k_cache[:, :, :length], v_cache[:, :, :length]


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """Attention runs in fp32 on the CPU whatever the weights' dtype: CPU bf16 matmuls copy the
    cache's strided slices on every step, which made them slower than fp32, and oneDNN kept a
    kernel for every new context length, so memory grew with the text."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


class Attention(nn.Module):
    kv_dtype: Optional[torch.dtype] = None
    """The dtype keys and values are kept in (CPMModel.keep_kv_in), None: the projection's. They
    are rounded to it in every forward, with a cache or without, so the slow path's recompute sees
    the values a cache holds."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = args.num_heads
        self.head_dim = args.head_dim
        self.query_key_value = nn.Linear(args.hidden_size, 3 * args.hidden_size)
        self.dense = nn.Linear(args.hidden_size, args.hidden_size)

    def forward(self, x, input_pos, mask, kv_cache: Optional[KVCache], layer: int, kv_len: int,
                last_only: bool = False):
        """With `last_only`, every token's keys and values but only the last token's output
        [batch, 1, hidden] (a window's last layer, when only the next token's logits are wanted)."""
        batch, seq, _ = x.shape
        # Fused rows are [q; k; v], each num_heads * head_dim wide (per rank under tensor parallel).
        q, k, v = self.query_key_value(x).split(self.num_heads * self.head_dim, dim=-1)
        q, k, v = (t.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.kv_dtype is not None:
            k, v = k.to(self.kv_dtype), v.to(self.kv_dtype)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, input_pos, k, v, kv_len)
        if last_only:
            q, mask = q[:, :, -1:], None if mask is None else mask[:, :, -1:]
        dtype = attention_dtype(x)
        out = self.attend(q.to(dtype), k.to(dtype), v.to(dtype), mask)
        return self.dense(out.transpose(1, 2).reshape(batch, q.shape[2], self.num_heads * self.head_dim).to(x.dtype))

    def attend(self, q, k, v, mask):
        """softmax(q k^T / sqrt(head_dim)) v for each head: q [batch, heads, T, head_dim], k and v
        [batch, heads, keys, head_dim]; `mask` [batch, 1, T, keys] (True: seen), or None where
        every query sees every key (one new token) or the keys before it and itself (a window
        encoded at 0..T-1)."""
        if q.shape[2] > 1:
            # Fused attention: a window's prefill runs several times faster than plain matmuls.
            # Masked scores are -inf here instead of -10000; every query sees at least its own
            # key, so masked keys get weight exactly 0 either way.
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        # One query (decode): plain matmuls. SDPA's CPU kernel splits one query's keys among
        # the threads, so its values would depend on the thread count (threads.ThreadTuner
        # changes it mid-text); the matmuls split by heads and give the same bits.
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores.masked_fill(~mask, MASKED_SCORE)
        return torch.matmul(torch.softmax(scores, dim=-1), v)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(args.hidden_size, args.ffn_size)
        self.dense_4h_to_h = nn.Linear(args.ffn_size, args.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layernorm_eps)
        self.attention = Attention(args)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layernorm_eps)
        self.mlp = MLP(args)

    def forward(self, x, input_pos, mask, kv_cache, layer, kv_len, last_only: bool = False):
        """With `last_only`, the last token's output only (its keys and values for every token)."""
        attended = self.attention(self.input_layernorm(x), input_pos, mask, kv_cache, layer, kv_len, last_only)
        h = (x[:, -1:] if last_only else x) + attended
        return h + self.mlp(self.post_attention_layernorm(h))


class TiedOutput(nn.Module):
    """The output layer: logits from the word-embedding table it is tied to (stored once, in
    `word_embeddings`, and passed in). Faster forms of it replace this module: prepack.py,
    quantize.py, and parallel.py's gathered head."""

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return F.linear(x, table)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.layers = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.final_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layernorm_eps)

    def forward(self, x, input_pos, mask, kv_cache: Optional[KVCache], kv_len: int,
                last_only: bool = False) -> torch.Tensor:
        """The blocks in turn (the final layer norm is CPMModel.forward's, after it keeps the
        positions it returns). With `last_only` the last block computes the last token's output
        alone: the others' outputs would only feed their own logits, and the next block's keys
        and values, of which there is none."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, input_pos, mask, kv_cache, i, kv_len, last_only and i == last)
        return x


def one_token_step(x: torch.Tensor, kv_cache) -> bool:
    """A step of one new token per sequence with a cache, not while compiling: what the fused
    forms (fused_decode.py) run as one call; a compiled step runs the modules' own code."""
    return x.shape[1] == 1 and kv_cache is not None and not torch.compiler.is_compiling()


class CPMModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # Tables given, so nn.Embedding skips its normal_() initialisation: the weights always
        # come from a checkpoint, and on the meta device (how models are built for loading)
        # normal_ imports hundreds of Python modules that stay resident for the life of the process.
        self.word_embeddings = nn.Embedding(args.vocab_size, args.hidden_size,
                                            _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.position_embeddings = nn.Embedding(args.max_positions, args.hidden_size,
                                                _weight=torch.empty(args.max_positions, args.hidden_size))
        self.transformer = Transformer(args)
        self.lm_head = TiedOutput()
        # A faster form of the whole one-token step with a cache (fused_decode.FusedStep, which
        # fuse_decode sets on the CPU): (ids, input_pos, kv_cache) -> the modules' logits. None:
        # the modules run it.
        self.fused_step: Optional[nn.Module] = None

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """What the KV cache holds: the attention's kv_dtype where set, else the weights' dtype (the
        dtype the projection computes keys and values in: on the CPU attention widens them to fp32
        exactly, so a wider cache would only be more bytes to read at every step)."""
        return self.transformer.layers[0].attention.kv_dtype or self.word_embeddings.weight.dtype

    def keep_kv_in(self, dtype: Optional[torch.dtype]) -> None:
        """Keep every layer's keys and values in `dtype` (None: the projection's dtype)."""
        for layer in self.transformer.layers:
            layer.attention.kv_dtype = dtype

    def new_kv_cache(self, batch_size: int, slots: Optional[int] = None, zeros: Callable = torch.zeros) -> KVCache:
        attention = self.transformer.layers[0].attention
        weight = self.word_embeddings.weight
        return KVCache.allocate(len(self.transformer.layers), batch_size, attention.num_heads,
                                slots or self.args.max_positions, attention.head_dim, self.kv_cache_dtype,
                                weight.device, zeros)

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor, kv_cache: Optional[KVCache] = None,
                last_only: bool = False) -> torch.Tensor:
        """ids [batch, T]; input_pos [T] or [batch, T]: the position id of each token.

        Without a cache the tokens attend to each other causally by position. With a cache
        they are written at slots input_pos and attend to the cached slots 0..position.
        Returns logits [batch, T, vocab] (or [batch, 1, vocab] with last_only)."""
        input_pos, mask, kv_len = self.attention_plan(ids, input_pos, kv_cache)
        if self.fused_step is not None and one_token_step(ids, kv_cache):
            return self.fused_step(ids, input_pos, kv_cache)
        x = self.transformer(self.word_embeddings(ids) + self.position_embeddings(input_pos), input_pos, mask, kv_cache,
                             kv_len, last_only)
        return self.lm_head(self.transformer.final_layernorm(x), self.word_embeddings.weight)

    def attention_plan(self, ids: torch.Tensor, input_pos: torch.Tensor, kv_cache: Optional[KVCache]):
        """(input_pos, mask, kv_len) for a forward: the positions checked against the model and
        the cache, the mask (None where plain causal or none is needed), how many cache slots
        to attend to. Eager and compiled runs differ only here."""
        batch, seq = ids.shape
        if torch.compiler.is_compiling():
            # Reading positions back would break a compiled graph, and a compiled step needs shapes
            # that do not depend on them: it attends to every slot and the mask hides the rest.
            kv_len = kv_cache.slots if kv_cache is not None else seq
        else:
            # Checked as Python ints, read back once: at one token a step, each tensor operation
            # (comparisons, reductions, reading them back) costs more than these few ints.
            rows = input_pos.tolist() if input_pos.dim() == 2 else [input_pos.tolist()]
            if input_pos.dim() == 2 and all(row == rows[0] for row in rows[1:]):
                input_pos = input_pos[0]  # every row at the same positions: one index for all of them
            top, low = max(map(max, rows)), min(map(min, rows))
            if top >= self.args.max_positions or low < 0:
                raise ValueError(f"position {top if low >= 0 else low} outside the model's "
                                 f"0..{self.args.max_positions - 1}")
            if kv_cache is not None and top >= kv_cache.slots:
                raise ValueError(f"position {top} does not fit a KV cache of {kv_cache.slots} slots")
            kv_len = top + 1 if kv_cache is not None else seq  # eager attends to the written slots only
            if input_pos.dim() == 1 and (seq == 1 or rows[0] == list(range(seq))):
                # No mask in the two usual cases: one new token per row (it sees every attended slot)
                # and a window encoded at 0..T-1 (plain causal, which SDPA runs faster).
                return input_pos, None, kv_len
        positions = input_pos.expand(batch, seq) if input_pos.dim() == 1 else input_pos
        key_pos = torch.arange(kv_len, device=ids.device).expand(batch, kv_len) if kv_cache is not None else positions
        mask = (key_pos[:, None, :] <= positions[:, :, None]).unsqueeze(1)  # [batch, 1, T, keys]
        return input_pos, mask, kv_len


def state_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """The mp=1 state dict's names and shapes for `args`, read off CPMModel itself."""
    with torch.device("meta"):
        return {name: tensor.shape for name, tensor in CPMModel(args).state_dict().items()}


def decode_step(model: CPMModel, tokens: torch.Tensor, input_pos: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
    """tokens [batch], input_pos [batch]: each sample's new token at its own next position ->
    logits [batch, vocab]. The unit that `--compile` compiles (loading.compile_decode)."""
    return model(tokens[:, None], input_pos[:, None], kv_cache)[:, -1]
