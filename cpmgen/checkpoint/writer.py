"""Write a checkpoint as a Megatron folder at any model-parallel size (reshard, convert --to megatron).

Tensor by tensor, one rank file at a time: the source stays memory-mapped, and each output
tensor is made, written into its rank file and freed before the next is made.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from cpmgen.checkpoint import megatron, splits
from cpmgen.checkpoint.reader import Checkpoint
from cpmgen.config import ModelArgs
from cpmgen.fileio import check_plain_name
from cpmgen.memory import trim_heap

VOCAB_FILES = ("chinese_vocab.model", "vocab.json")


def megatron_args(args: ModelArgs, mp: int) -> dict:
    """The architecture under Megatron's argument names (what its training `args` hold)."""
    return {"num_layers": args.num_layers, "hidden_size": args.hidden_size, "num_attention_heads": args.num_heads,
            "max_position_embeddings": args.max_positions, "padded_vocab_size": args.vocab_size,
            "layernorm_epsilon": args.layernorm_eps, "model_parallel_size": mp}


def rank_metadata(ckpt: Checkpoint, args: ModelArgs, mp: int, rank: int) -> dict:
    """change_mp.py's rule: keep iteration and RNG states, set mp_world_size, other keys None.

    One addition: Megatron's training `args` are kept too (with their model_parallel_size
    updated), since they hold the head count that a non-preset hidden size cannot give."""
    if not ckpt.extra or not ckpt.extra[0]:  # e.g. from an HF folder: the architecture, so the heads are known
        return {"mp_world_size": mp, "args": megatron_args(args, mp)}
    source = ckpt.extra[min(rank * ckpt.mp // mp, len(ckpt.extra) - 1)]
    meta = {k: (v if k == "iteration" or "rng" in k else None) for k, v in source.items()}
    if source.get("args") is not None:
        meta["args"] = _with_mp(source["args"], mp)
    meta["mp_world_size"] = mp
    return meta


def _with_mp(args, mp: int):
    if isinstance(args, dict):
        return {**args, "model_parallel_size": mp} if "model_parallel_size" in args else dict(args)
    args = copy.copy(args)  # an argparse Namespace
    if hasattr(args, "model_parallel_size"):
        args.model_parallel_size = mp
    return args


def write_megatron(out: Path, ckpt: Checkpoint, args: ModelArgs, mp: int,
                   advance: Optional[Callable[[int], None]] = None) -> list[Path]:
    """Write `ckpt` into the (empty, existing) folder `out` at model-parallel size `mp`."""
    splits.check_split(args, mp, ckpt.path)
    iteration = check_plain_name(ckpt.iteration or "release", f"{ckpt.path}: iteration")
    (out / megatron.LATEST_FILE).write_text(f"{iteration}\n")
    folder = out / iteration
    folder.mkdir()
    files = []
    for rank in range(mp):
        path = folder / megatron.rank_file_name(rank)
        module = _rank_module(ckpt, mp, rank, advance)
        megatron.save_rank_file(path, {**rank_metadata(ckpt, args, mp, rank), "module": module})
        files.append(path)
    copy_vocab(ckpt.path, out)
    return files


def _rank_module(ckpt: Checkpoint, mp: int, rank: int,
                 advance: Optional[Callable[[int], None]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Rank `rank`'s tensors for save_rank_file, each merged or split only when it asks for it.

    save_rank_file asks for the next tensor once the last is in the file, so that is when
    the last one's mapped source pages can go."""
    for name, tensor in ckpt.rank_tensors(mp, rank):
        yield name, tensor
        del tensor  # free it before rank_tensors makes the next one
        trim_heap()
        ckpt.release(name)
        if advance:
            advance(1)


def copy_vocab(source: Path, out: Path) -> None:
    for name in VOCAB_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if (source / "spiece.model").is_file() and not (out / "chinese_vocab.model").exists():
        shutil.copyfile(source / "spiece.model", out / "chinese_vocab.model")
