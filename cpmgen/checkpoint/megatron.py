"""Megatron / DeepSpeed checkpoint folders of the CPM-1 releases.

    MODEL_DIR/latest_checkpointed_iteration.txt      "80000" or "release"
    MODEL_DIR/<iteration>/mp_rank_XX_model_states.pt  one torch.save'd dict per rank, weights under "module"

Rank files are opened with mmap so that reading a checkpoint never holds two copies.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import pickle
import re
import sys
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.serialization import DEFAULT_PROTOCOL, location_tag

from cpmgen import signals
from cpmgen.errors import UserError
from cpmgen.fileio import check_plain_name

LATEST_FILE = "latest_checkpointed_iteration.txt"
RANK_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")


def rank_file_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


@dataclass
class MegatronFolder:
    root: Path
    iteration: str
    folder: Path  # the iteration folder holding the rank files
    rank_files: dict[int, Path]  # rank -> file, as found on disk
    mp: int  # the model-parallel size the checkpoint says it has

    def problems(self, ranks: Optional[list[int]] = None) -> list[str]:
        """Missing rank files (of `ranks` only, when given: a node of a multi-node run holds only
        the files of its own ranks) and rank files beyond the model-parallel size."""
        wanted = range(self.mp) if ranks is None else ranks
        problems = []
        missing = [r for r in wanted if r not in self.rank_files]
        if missing:
            problems.append(f"missing rank file(s) {', '.join(rank_file_name(r) for r in missing)} "
                            f"(checkpoint has model-parallel size {self.mp})")
        extra = [r for r in self.rank_files if r >= self.mp]
        if extra:
            problems.append(f"unexpected rank file(s) {', '.join(rank_file_name(r) for r in extra)} "
                            f"(mp_world_size is {self.mp})")
        return problems


def is_mappable(path: Path) -> bool:
    return zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be memory-mapped


def _release_globals() -> list:
    """What the released Megatron rank files pickle besides tensors, and nothing broader:
    training `args` (an argparse Namespace) and NumPy's RNG state (an ndarray of uint32 with
    its dtype). Python's and torch's RNG states are tuples, ints and tensors, which the safe
    unpickler takes anyway. A file pickled under NumPy 1.x names `numpy.core.multiarray`."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # NumPy 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct  # NumPy 1
    allowed = [argparse.Namespace, np.ndarray, np.dtype, _reconstruct,
               (_reconstruct, "numpy.core.multiarray._reconstruct"),
               (_reconstruct, "numpy._core.multiarray._reconstruct")]
    # NumPy 2 pickles a dtype through its class in numpy.dtypes (e.g. numpy.dtypes.UInt32DType)
    allowed += [cls for cls in vars(getattr(np, "dtypes", object)).values()
                if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return allowed


def _allowing(allowed: list):
    """A context in which torch.load(weights_only=True) also unpickles `allowed`:
    torch.serialization.safe_globals from torch 2.5 on. torch 2.4 (the oldest cpmgen supports)
    has only add_safe_globals, process-wide and without the renamed (object, name) entries, which
    only a file pickled under the other NumPy major version needs; and its unpickler does not yet
    take `_codecs.encode`, which NumPy's pickles use for their bytes (it only builds a bytes
    object; later torch allows it by default)."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(allowed)
    plain = [entry for entry in allowed if not isinstance(entry, tuple)]
    torch.serialization.add_safe_globals(plain + [codecs.encode])
    return contextlib.nullcontext()


_GLOBAL_NAME = re.compile(r"GLOBAL ([\w.]+)")
# (path, inode, size, mtime, trust) -> state: a file is unpickled once, although scan() and the
# loader both read it; bounded, so that a long-lived process does not pin old files' mappings.
_loaded: OrderedDict[tuple, dict] = OrderedDict()
_LOADED_MAX = 64


def load_rank_file(path: Path, trust: bool = False) -> dict:
    """torch.load a rank file memory-mapped, without running code from it.

    Only tensors, plain Python values and the globals of `_release_globals` are unpickled;
    anything else is refused with the global it names, unless `trust` (--trust-checkpoint)
    says the user wrote the file. Any failure is a one-line UserError."""
    try:
        info = path.stat()
    except OSError as e:
        raise UserError(f"{path}: cannot open the rank file ({e.strerror}); re-copy it") from None
    key = (str(path.resolve()), info.st_ino, info.st_size, info.st_mtime_ns, trust)
    if key in _loaded:
        _loaded.move_to_end(key)
        return _loaded[key]
    if info.st_size == 0:
        raise UserError(f"{path}: empty file, not a PyTorch checkpoint; re-copy this rank file")
    try:
        with signals.held():
            if trust:
                state = torch.load(path, map_location="cpu", mmap=is_mappable(path), weights_only=False)
            else:
                with _allowing(_release_globals()):
                    state = torch.load(path, map_location="cpu", mmap=is_mappable(path), weights_only=True)
    except pickle.UnpicklingError as e:
        found = _GLOBAL_NAME.search(str(e))
        if found is None and "Weights only load failed" not in str(e):
            raise UserError(f"{path}: cannot read as a PyTorch checkpoint (truncated or not a .pt file: "
                            f"{_first_line(e)}); re-copy this rank file") from None
        what = f"the Python object {found.group(1)}" if found else "Python objects"
        raise UserError(f"{path}: holds {what}, which a checkpoint does not need and which could run code; "
                        "not loaded (pass --trust-checkpoint only if you wrote this file yourself)") from None
    except (ImportError, MemoryError):
        raise  # this Python or this machine, not the file: calling the file damaged would mislead
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a damaged file
        # chained, so that --debug shows what torch raised
        raise UserError(f"{path}: cannot read as a PyTorch checkpoint (truncated or not a .pt file: "
                        f"{_first_line(e)}); re-copy this rank file") from e
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        keys = ", ".join(map(str, list(state)[:6])) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"{path}: not a Megatron model checkpoint (no 'module' state dict; found {keys})")
    module = state["module"]
    bad = [k for k, v in module.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: 'module' holds non-tensor entries ({bad[0]}); not a Megatron model checkpoint")
    _loaded[key] = state
    if len(_loaded) > _LOADED_MAX:
        _loaded.popitem(last=False)
    return state


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(e).__name__


def scan(root: Path, trust: bool = False) -> MegatronFolder:
    """Find the iteration folder and rank files. Unusable input raises UserError; missing or
    extra rank files are problems() (inspect-ckpt reports them, loading refuses those it needs)."""
    if not root.exists():
        raise UserError(f"{root}: model folder not found; check --model, model.path or $CPMGEN_MODEL")
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; --model takes the checkpoint folder")
    latest = root / LATEST_FILE
    if latest.is_file():
        iteration = latest.read_text(encoding="utf-8", errors="replace").strip()
        if not iteration:
            raise UserError(f"{latest}: empty; it should hold the iteration number or the word release")
        check_plain_name(iteration, str(latest))
        folder = root / iteration
        if not folder.is_dir():
            raise UserError(f"{root}: iteration folder {iteration}/ named by {LATEST_FILE} is missing")
    elif any(RANK_FILE.match(p.name) for p in root.iterdir()):
        iteration, folder = root.name, root  # pointed at the iteration folder itself
    else:
        raise UserError(f"{root}: no {LATEST_FILE}; expected a Megatron checkpoint folder (or an HF folder with config.json)")
    rank_files = {int(m.group(1)): p for p in sorted(folder.iterdir()) if (m := RANK_FILE.match(p.name))}
    if not rank_files:
        raise UserError(f"{folder}: no mp_rank_XX_model_states.pt files in the iteration folder")
    recorded = load_rank_file(rank_files[min(rank_files)], trust).get("mp_world_size")
    mp = recorded if isinstance(recorded, int) and recorded > 0 else max(rank_files) + 1
    return MegatronFolder(root, iteration, folder, rank_files, mp)


def save_rank_file(path: Path, state: dict) -> None:
    """torch.save(state, path), holding one module tensor in memory at a time.

    state["module"] is a dict of tensors or an iterable of (name, tensor) pairs, such as a
    generator that merges or splits each tensor only when it is asked for the next. Each
    tensor's bytes are written into the archive as soon as it arrives, and it is dropped
    before the next is asked for; the pickle, which ties the names to those records, goes in
    last. torch.load (with or without weights_only and mmap) reads the file into the dict that
    torch.save(state) gives, except that every module tensor has a storage of its own, as
    after clone() (a Megatron module holds no views of one another)."""
    module = state["module"]
    pairs = module.items() if isinstance(module, dict) else module
    with torch.serialization._open_zipfile_writer(str(path)) as writer:
        archive = _Archive(writer)
        written = {}
        for name, tensor in pairs:
            written[name] = archive.add_tensor(tensor)
            del tensor  # in the file: free it before the next one is made
        archive.add_pickle({key: (written if key == "module" else value) for key, value in state.items()})


@dataclass(frozen=True)
class _Record:
    """A storage record of the archive, pickled as torch.save references a storage."""
    key: str
    storage_type: type
    location: str
    numel: int


class _WrittenTensor:
    """Stands for a tensor already written as its own record: pickles as torch.save pickles a
    plain tensor (so torch.load, weights_only included, rebuilds it the same way)."""

    def __init__(self, record: _Record, tensor: torch.Tensor):
        self.record = record
        self.size, self.stride, self.requires_grad = tuple(tensor.shape), tensor.stride(), tensor.requires_grad

    def __reduce_ex__(self, protocol):
        return torch._utils._rebuild_tensor_v2, (self.record, 0, self.size, self.stride, self.requires_grad,
                                                 OrderedDict())


class _Archive:
    """The records of a torch.save zip archive (see torch.serialization._save), written one by one.

    Newer torch versions also write a `.format_version` record, which lets torch.load compute
    storage offsets on the assumption that the records follow data.pkl in pickle order. Here
    data.pkl comes last, so it is left out: torch.load then looks each record up, as it does
    for the files of the torch versions before that record."""

    def __init__(self, writer: torch._C.PyTorchFileWriter):
        self.writer = writer
        self.records = 0
        self.shared: dict[int, str] = {}  # storage -> key, for tensors outside the module (as torch.save)

    def _write(self, storage: torch.UntypedStorage) -> str:
        key = str(self.records)
        self.records += 1
        self.writer.write_record(f"data/{key}", storage, storage.nbytes())
        return key

    def add_tensor(self, tensor: torch.Tensor) -> _WrittenTensor:
        """Write the tensor's own bytes (not the rest of a storage it views) as a new record."""
        tensor = tensor.contiguous()
        start, nbytes = tensor.storage_offset() * tensor.element_size(), tensor.numel() * tensor.element_size()
        storage = tensor.untyped_storage()
        key = self._write(storage[start:start + nbytes])
        storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[tensor.dtype])
        return _WrittenTensor(_Record(key, storage_type, location_tag(storage), tensor.numel()), tensor)

    def add_pickle(self, state: dict) -> None:
        data = io.BytesIO()
        _Pickler(data, self).dump(state)
        self.writer.write_record("data.pkl", data.getvalue(), len(data.getvalue()))
        self.writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))

    def persistent_id(self, obj) -> tuple | None:
        """torch.save's reference to a storage; any other tensor in the state (an RNG state) is
        written whole here, as torch.save writes it."""
        if isinstance(obj, _Record):
            return "storage", obj.storage_type, obj.key, obj.location, obj.numel
        if isinstance(obj, torch.storage.TypedStorage):
            storage = obj._untyped_storage
            if storage._cdata not in self.shared:
                self.shared[storage._cdata] = self._write(storage)
            return ("storage", getattr(torch, obj._pickle_storage_type()), self.shared[storage._cdata],
                    location_tag(storage), obj._size())
        return None


class _Pickler(pickle.Pickler):
    def __init__(self, file, archive: _Archive):
        super().__init__(file, protocol=DEFAULT_PROTOCOL)
        self.archive = archive

    def persistent_id(self, obj):
        return self.archive.persistent_id(obj)
