"""How each Megatron tensor is split across model-parallel ranks, and merging/splitting by it.

One table (the reference's): word embedding rows (vocab ranges), QKV rows per rank as
[q_r; k_r; v_r], h_to_4h rows, dense and 4h_to_h columns; everything else replicated.
"""

from __future__ import annotations

import re

import torch

from cpmgen.config import ModelArgs
from cpmgen.errors import UserError

REPLICATED, ROWS, COLUMNS, QKV_ROWS = "replicated", "rows", "columns", "qkv_rows"

_RULES = [
    (re.compile(r"word_embeddings\.weight$"), ROWS),
    (re.compile(r"attention\.query_key_value\.(weight|bias)$"), QKV_ROWS),
    (re.compile(r"attention\.dense\.weight$"), COLUMNS),
    (re.compile(r"mlp\.dense_h_to_4h\.(weight|bias)$"), ROWS),
    (re.compile(r"mlp\.dense_4h_to_h\.weight$"), COLUMNS),
]


def split_kind(name: str) -> str:
    for pattern, kind in _RULES:
        if pattern.search(name):
            return kind
    return REPLICATED


def split_dim(name: str) -> int | None:
    kind = split_kind(name)
    return None if kind == REPLICATED else (1 if kind == COLUMNS else 0)


def merge(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The mp=1 tensor from the shards of every rank, in rank order."""
    kind = split_kind(name)
    if kind == REPLICATED or len(shards) == 1:
        return shards[0]
    if kind == QKV_ROWS:
        parts = [shard.chunk(3, dim=0) for shard in shards]
        return torch.cat([torch.cat([p[i] for p in parts], dim=0) for i in range(3)], dim=0)
    return torch.cat(shards, dim=split_dim(name))


def shard(name: str, full: torch.Tensor, mp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s piece of an mp=1 tensor at model-parallel size `mp` (a view where possible)."""
    kind = split_kind(name)
    if kind == REPLICATED or mp == 1:
        return full
    if kind == QKV_ROWS:
        return torch.cat([part.chunk(mp, dim=0)[rank] for part in full.chunk(3, dim=0)], dim=0)
    return full.chunk(mp, dim=split_dim(name))[rank]


def check_split(args: ModelArgs, mp: int, where: str = "the model", option: str = "--mp") -> None:
    """The one check that `mp` ranks can split a model: each takes whole heads, an equal part
    of the vocab and of the MLP width (the split dimensions above)."""
    if mp < 1:
        raise UserError(f"{option} {mp}: the model-parallel size must be at least 1")
    for size, what in ((args.num_heads, "attention heads"), (args.vocab_size, "vocab entries"),
                       (args.ffn_size, "MLP units")):
        if size % mp:
            raise UserError(f"{option} {mp} does not divide the {size} {what} of {where}; choose a divisor of {size}")
