"""Open a checkpoint of either format, check it, infer its architecture, merge its ranks.

A `Checkpoint` holds each rank's `module` tensors (memory-mapped) under the Megatron names;
an HF folder is one rank whose tensors were renamed and transposed on reading.
"""

from __future__ import annotations

import math
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from cpmgen.checkpoint import hf, megatron, splits
from cpmgen.config import HEADS_BY_HIDDEN, ModelArgs, ModelSection
from cpmgen.errors import UserError
from cpmgen.memory import release_pages
from cpmgen.model import state_shapes

LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")


@dataclass
class Checkpoint:
    format: str  # "megatron" or "hf"
    path: Path
    iteration: Optional[str]
    mp: int
    files: list[Path]
    shards: list[dict[str, torch.Tensor]]  # per rank, Megatron names
    extra: list[dict]  # per rank, the non-module keys of a Megatron file
    problems: list[str] = field(default_factory=list)
    hf_config: Optional[dict] = None
    ranks: Optional[list[int]] = None  # the stored ranks of `shards`, when not all of them are open
    mapped: bool = False  # the tensors are memory-mapped from the files (rank files, a quantized folder)
    quantization: Optional[dict] = None  # a `cpmgen quantize` folder's quantized.json

    def release(self, name: str) -> None:
        """Done with tensor `name` (and any copy made of it): let its mapped pages go."""
        if self.mapped:
            for shard in self.shards:
                release_pages(shard[name])

    def full_shape(self, name: str) -> tuple[int, ...]:
        dim = splits.split_dim(name)
        shape = list(self.shards[0][name].shape)
        if dim is not None and self.ranks is not None:
            shape[dim] *= self.mp  # Megatron splits evenly
        elif dim is not None:
            shape[dim] = sum(s[name].shape[dim] for s in self.shards if name in s)
        return tuple(shape)

    def nbytes(self) -> int:
        """The size of all tensors at model-parallel size 1."""
        return sum(math.prod(self.full_shape(name)) * self.shards[0][name].element_size() for name in self.names())

    def names(self) -> list[str]:
        return list(self.shards[0])

    def dtype(self) -> torch.dtype:
        return self.shards[0]["word_embeddings.weight"].dtype

    def full_tensor(self, name: str) -> torch.Tensor:
        if self.ranks is not None:
            raise RuntimeError(f"only the files of stored ranks {self.ranks} of {self.path} are open")
        return splits.merge(name, [s[name] for s in self.shards])

    def full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The mp=1 tensors one at a time, so a caller never needs all merged copies at once."""
        for name in self.names():
            yield name, self.full_tensor(name)

    def rank_tensors(self, mp: int, rank: int) -> Iterator[tuple[str, torch.Tensor]]:
        """Rank `rank`'s tensors at model-parallel size `mp`, whatever size the checkpoint has:
        read from the stored ranks that hold its slices (needed_ranks), merging or splitting."""
        stored = needed_ranks(self.mp, mp, rank)
        shards = [self.shards[r if self.ranks is None else self.ranks.index(r)] for r in stored]
        for name in self.names():
            if mp == self.mp:
                yield name, shards[0][name]
            elif self.mp % mp == 0:
                yield name, splits.merge(name, [s[name] for s in shards])
            elif mp % self.mp == 0:
                yield name, splits.shard(name, shards[0][name], mp // self.mp, rank % (mp // self.mp))
            else:
                yield name, splits.shard(name, self.full_tensor(name), mp, rank)


def needed_ranks(stored_mp: int, mp: int, rank: int) -> list[int]:
    """The stored ranks whose files hold rank `rank`'s slices at model-parallel size `mp`.

    Megatron splits every split dimension into equal contiguous parts (QKV per q, k and v),
    so when one size divides the other a rank's slices are whole stored shards or one part
    of a single stored shard; otherwise they straddle shards and need all of them."""
    if stored_mp % mp == 0:
        k = stored_mp // mp
        return list(range(rank * k, (rank + 1) * k))
    if mp % stored_mp == 0:
        return [rank // (mp // stored_mp)]
    return list(range(stored_mp))


def open_checkpoint(path: str | Path, strict: bool = True, rank: Optional[int] = None,
                    world: Optional[int] = None, trust: bool = False) -> Checkpoint:
    """Detect the format and open every rank file (memory-mapped). With strict, structural
    problems are UserErrors; otherwise they are collected in `problems` (inspect-ckpt).

    For rank `rank` of a model-parallel run of size `world`, only the files that hold its
    slices are opened (needed_ranks), and only they need to be on this machine. `trust`
    unpickles rank files without the safe allow-list."""
    from cpmgen import quantized_checkpoint  # here: it imports this module

    path = Path(path)
    if path.is_dir() and quantized_checkpoint.is_quantized_folder(path):
        config, file, tensors = quantized_checkpoint.read_quantized(path)
        # safetensors maps the file: each tensor's pages can be let go (release) once copied
        return Checkpoint("quantized", path, None, 1, [file], [tensors], [{}], quantization=config, mapped=True)
    if path.is_dir() and hf.is_hf_folder(path) and not (path / megatron.LATEST_FILE).exists():
        config = hf.read_hf_config(path)
        weights = hf.read_hf_state_dict(path)
        files = [p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.is_file()][:1]
        ckpt = Checkpoint("hf", path, None, 1, files, [weights], [{}], hf_config=config)
    else:
        folder = megatron.scan(path, trust)
        needed = needed_ranks(folder.mp, world, rank) if rank is not None and world and world > 1 else None
        if needed is not None and len(needed) == folder.mp:
            needed = None  # this rank reads every stored rank
        absent = [r for r in needed or () if r not in folder.rank_files]
        if absent:
            raise UserError(f"{folder.folder}: rank {rank} of this {world}-rank run reads "
                            f"{', '.join(megatron.rank_file_name(r) for r in absent)}, "
                            f"{'which is' if len(absent) == 1 else 'which are'} not on this machine "
                            f"({socket.gethostname()}); copy it there, or start this machine's ranks "
                            "as the ranks whose files it holds (static rendezvous: torchrun --node-rank)")
        problems = folder.problems(needed)
        if strict and problems:
            raise UserError(f"{folder.folder}: {problems[0]}; run cpmgen inspect-ckpt {path}")
        present = needed if needed is not None else [r for r in range(folder.mp) if r in folder.rank_files]
        states = [megatron.load_rank_file(folder.rank_files[r], trust) for r in present]
        ckpt = Checkpoint("megatron", path, folder.iteration, folder.mp, [folder.rank_files[r] for r in present],
                          [s["module"] for s in states], [{k: v for k, v in s.items() if k != "module"} for s in states],
                          problems=problems, ranks=needed,
                          mapped=all(megatron.is_mappable(f) for f in folder.rank_files.values()))
        if problems:  # shapes cannot be merged over missing ranks
            return ckpt
    ckpt.problems += _structure_problems(ckpt)
    if strict and ckpt.problems:
        raise UserError(f"{path}: {ckpt.problems[0]}; run cpmgen inspect-ckpt {path}")
    return ckpt


def _structure_problems(ckpt: Checkpoint) -> list[str]:
    problems = []
    first = ckpt.shards[0]
    for rank, shard in enumerate(ckpt.shards[1:], start=1):
        for name in sorted(set(first) ^ set(shard)):
            where = "rank 0" if name in first else f"rank {rank}"
            problems.append(f"tensor {name} is only in {where}")
        for name in sorted(set(first) & set(shard)):
            if first[name].shape != shard[name].shape:
                problems.append(f"tensor {name} has shape {list(first[name].shape)} on rank 0 "
                                f"but {list(shard[name].shape)} on rank {rank}")
    if problems:
        return problems
    if "word_embeddings.weight" not in first or "position_embeddings.weight" not in first:
        return ["missing tensor word_embeddings.weight or position_embeddings.weight: not a CPM-1 (GPT-2) checkpoint"]
    args = architecture(ckpt, num_heads=1)
    expected = state_shapes(args)
    names = set(ckpt.names())
    for name in sorted(set(expected) - names, key=_name_order):
        problems.append(f"missing tensor {name}")
    for name in sorted(names - set(expected), key=_name_order):
        problems.append(f"unexpected tensor {name}")
    for name in sorted(set(expected) & names, key=_name_order):
        if ckpt.full_shape(name) != expected[name]:
            problems.append(f"tensor {name} has shape {list(ckpt.full_shape(name))}, expected {list(expected[name])}")
    return problems


def _name_order(name: str):
    m = LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)


def stored_heads(ckpt: Checkpoint):
    """`num_attention_heads` as stored in the training arguments Megatron keeps in a rank file
    under `args` (an argparse Namespace; a plain dict is accepted too), unchecked; None if absent."""
    args = ckpt.extra[0].get("args") if ckpt.extra else None
    return args.get("num_attention_heads") if isinstance(args, dict) else getattr(args, "num_attention_heads", None)


def _megatron_heads(ckpt: Checkpoint) -> Optional[int]:
    value = stored_heads(ckpt)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def architecture(ckpt: Checkpoint, num_heads: Optional[int] = None) -> ModelArgs:
    """Layers, hidden size, vocab and positions from the shapes; heads from the given value,
    the HF config, the Megatron training args stored in the rank file, or the preset of a
    known hidden size."""
    vocab, hidden = ckpt.full_shape("word_embeddings.weight")
    positions = ckpt.full_shape("position_embeddings.weight")[0]
    layers = {int(m.group(1)) for name in ckpt.names() if (m := LAYER.match(name))}
    num_layers = max(layers) + 1 if layers else 0
    eps = 1e-5
    if ckpt.hf_config:
        num_heads = num_heads or ckpt.hf_config["num_heads"]
        eps = ckpt.hf_config.get("layernorm_eps", eps)
    if ckpt.quantization:
        num_heads = num_heads or ckpt.quantization["num_heads"]
        eps = ckpt.quantization["layernorm_eps"]
    if num_heads is None:
        num_heads = _megatron_heads(ckpt)
    if num_heads is None:
        num_heads = HEADS_BY_HIDDEN.get(hidden)
    if num_heads is None:
        raise UserError(f"{ckpt.path}: cannot infer the number of attention heads for hidden size {hidden} "
                        "(not a public CPM-1 size); pass --set model.num_heads=N")
    return ModelArgs(num_layers=num_layers, hidden_size=hidden, num_heads=num_heads, vocab_size=vocab,
                     max_positions=positions, layernorm_eps=eps)


def resolve_args(ckpt: Checkpoint, section: ModelSection) -> ModelArgs:
    """The checkpoint's architecture, checked against what the config says."""
    args = architecture(ckpt, section.num_heads)
    wanted = {}
    if section.preset:
        preset = ModelArgs.from_name(section.preset)
        wanted.update({k: (getattr(preset, k), f"model.preset={section.preset}")
                       for k in ("num_layers", "hidden_size", "num_heads", "vocab_size", "max_positions")})
    for key in ("num_layers", "hidden_size", "num_heads", "vocab_size", "max_positions"):
        value = getattr(section, key)
        if value is not None:
            wanted[key] = (value, f"model.{key}={value}")
    for key, (value, source) in wanted.items():
        if getattr(args, key) != value:
            raise UserError(f"config {source} disagrees with the checkpoint {ckpt.path}, "
                            f"which has {key} {getattr(args, key)}; fix the config or the --model path")
    if args.hidden_size % args.num_heads:
        raise UserError(f"model.num_heads={args.num_heads} does not divide the checkpoint's hidden size "
                        f"{args.hidden_size}; fix --set model.num_heads")
    return args


def value_problems(ckpt: Checkpoint) -> list[str]:
    problems = []
    for rank, shard in enumerate(ckpt.shards):
        for name, tensor in shard.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                problems.append(f"tensor {name} on rank {rank} holds NaN or Inf values")
    return problems
