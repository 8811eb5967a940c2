"""megatron.save_rank_file writes a rank file one tensor at a time; torch.load must read it as
the torch.save output of the same state.

Every check compares against a real torch.save of the same dict, its module tensors given
storages of their own (as the writer always stored them: a view saved by torch.save drags its
whole parent storage along): same keys in the same order, tensors bitwise equal with the same
dtypes, shapes and strides, metadata equal.
"""

from __future__ import annotations

import argparse
import weakref
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cpmgen.checkpoint import megatron
from cpmgen.checkpoint.reader import open_checkpoint
from cpmgen.checkpoint.writer import rank_metadata, write_megatron

from helpers import TINY


def _module() -> dict[str, torch.Tensor]:
    """Tensors of every layout a merge or split can give, in several dtypes."""
    g = torch.Generator().manual_seed(0)
    parent = torch.randn(8, 6, generator=g)
    return {
        "fp16": torch.randn(5, 7, generator=g).half(),
        "bf16": torch.randn(3, 4, generator=g).to(torch.bfloat16),
        "rows_of_a_parent": parent[2:5],  # a view with an offset into a larger storage
        "columns": parent[:, 1:3],  # not contiguous
        "transposed": torch.randn(4, 9, generator=g).t(),
        "negative_zero": torch.tensor([0.0, -0.0, float("inf"), float("nan")]),
        "int64": torch.arange(10),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
    }


def _metadata(numpy_state: bool = True) -> dict:
    """The keys of a Megatron rank file besides the module, as Megatron and rank_metadata write them."""
    meta = {
        "iteration": 80000,
        "mp_world_size": 2,
        "optimizer": None,
        "lr_scheduler": None,
        "random_rng_state": (3, tuple(range(625)), None),
        "torch_rng_state": torch.manual_seed(5).get_state(),
        "args": argparse.Namespace(num_attention_heads=4, model_parallel_size=2, fp16=True),
    }
    if numpy_state:
        meta["np_rng_state"] = np.random.RandomState(1).get_state()
    return meta


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_same(a, b, where: str = "state") -> None:
    """Equal as loaded values: tensors bitwise, with dtype, shape and stride; containers item by item."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape, a.stride(), a.requires_grad) == (b.dtype, b.shape, b.stride(), b.requires_grad), where
        assert torch.equal(_bits(a), _bits(b)), where
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, argparse.Namespace):
        _assert_same(vars(a), vars(b), where)
    else:
        assert a == b, where


def _own_storages(module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone(memory_format=torch.contiguous_format) for name, t in module.items()}


def _load(path: Path, **kwargs):
    return torch.load(path, map_location="cpu", **kwargs)


def _save_both(tmp_path: Path, state: dict, module_as_generator: bool = True) -> tuple[Path, Path]:
    saved, streamed = tmp_path / "saved.pt", tmp_path / "streamed.pt"
    module = state["module"]
    torch.save({**state, "module": _own_storages(module)}, saved)
    megatron.save_rank_file(streamed, {**state, "module": iter(module.items()) if module_as_generator else module})
    return saved, streamed


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("module_as_generator", [True, False])
def test_streamed_file_loads_as_torch_save(tmp_path, mmap, module_as_generator):
    state = {**_metadata(), "module": _module()}
    saved, streamed = _save_both(tmp_path, state, module_as_generator)
    _assert_same(_load(saved, weights_only=False, mmap=mmap), _load(streamed, weights_only=False, mmap=mmap))


@pytest.mark.parametrize("mmap", [False, True])
def test_streamed_file_loads_weights_only(tmp_path, mmap):
    """Without numpy RNG states or an args Namespace, a rank file loads with weights_only=True."""
    meta = {k: v for k, v in _metadata(numpy_state=False).items() if k != "args"}
    saved, streamed = _save_both(tmp_path, {**meta, "module": _module()})
    _assert_same(_load(saved, weights_only=True, mmap=mmap), _load(streamed, weights_only=True, mmap=mmap))


def test_streamed_file_loads_on_the_meta_device(tmp_path):
    _, streamed = _save_both(tmp_path, {**_metadata(numpy_state=False), "module": _module()})
    loaded = torch.load(streamed, map_location="meta", weights_only=False)["module"]
    for name, tensor in _module().items():
        assert loaded[name].is_meta and (loaded[name].dtype, loaded[name].shape) == (tensor.dtype, tensor.shape), name


def test_each_module_tensor_is_stored_alone(tmp_path):
    """A view is stored as its own bytes, not with the rest of the storage it views (torch.save
    would store the whole parent), and the archive has torch.save's records."""
    module = _module()
    _, streamed = _save_both(tmp_path, {"iteration": 0, "module": module})
    with zipfile.ZipFile(streamed) as archive:
        records = {info.filename.split("/", 1)[1]: info for info in archive.infolist()}
    data = sorted((k for k in records if k.startswith("data/")), key=lambda k: int(k.split("/")[1]))
    assert data == [f"data/{i}" for i in range(len(module))]
    assert [records[k].file_size for k in data] == [t.numel() * t.element_size() for t in module.values()]
    assert all(records[k].compress_type == zipfile.ZIP_STORED for k in data)  # mmap needs them stored as is
    assert {"data.pkl", "byteorder"} <= set(records)


def test_module_tensors_are_made_and_dropped_one_at_a_time(tmp_path):
    """The writer asks for a tensor only after the previous one is in the file and it holds no
    reference to it any more."""
    module = _module()
    asked = []

    def one_at_a_time():
        previous = None
        for name, tensor in module.items():
            assert previous is None or previous() is None, f"{asked[-1]} still referenced when {name} was asked for"
            asked.append(name)
            made = tensor.clone()  # a fresh tensor, as a merge makes
            previous = weakref.ref(made)
            yield name, made
            del made

    megatron.save_rank_file(tmp_path / "streamed.pt", {"iteration": 0, "module": one_at_a_time()})
    assert asked == list(module)
    _assert_same(_load(tmp_path / "streamed.pt", weights_only=True)["module"], _own_storages(module))


@pytest.mark.parametrize(("source_mp", "mp"), [(2, 1), (1, 4), (2, 2)])
def test_reshard_rank_files_load_as_torch_save_of_the_same_state(write_ckpt, tmp_path, source_mp, mp):
    source = write_ckpt("ckpt", mp=source_mp, dtype=torch.float16)
    ckpt = open_checkpoint(source)
    out = tmp_path / "out"
    out.mkdir()
    calls = []
    released = []
    ckpt.release = released.append
    files = write_megatron(out, ckpt, TINY, mp, advance=calls.append)
    assert calls == [1] * (len(ckpt.names()) * mp)
    assert released == ckpt.names() * mp

    for rank, path in enumerate(files):
        reference = tmp_path / f"reference_{rank}.pt"
        module = _own_storages(dict(ckpt.rank_tensors(mp, rank)))
        torch.save({**rank_metadata(ckpt, TINY, mp, rank), "module": module}, reference)
        expected = _load(reference, weights_only=False)
        assert expected["mp_world_size"] == mp and "torch_rng_state" in expected and "np_rng_state" in expected
        _assert_same(expected, _load(path, weights_only=False))
        _assert_same(expected, megatron.load_rank_file(path))  # cpmgen's own (memory-mapped) reader
