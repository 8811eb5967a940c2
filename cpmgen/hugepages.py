"""A CPU model's weights and KV cache on 2 MB pages.

A decode step streams every weight (and, at a long context, the KV cache) from memory once. On
4 KB pages the CPU's hardware prefetchers stop at every page boundary and each 4 KB costs a TLB
entry, so a streaming kernel reads well below the memory's rate; on 2 MB pages (transparent huge
pages) it reads close to it. PyTorch's CPU allocator asks for huge pages only when
THP_MEM_ALLOC_ENABLE is set before its first allocation, so cpmgen places these long-lived
tensors itself: in private anonymous mappings (a shared one is shmem, which THP mostly leaves
out) that start on a 2 MB boundary, with their whole 2 MB pages advised MADV_HUGEPAGE. The
partial page at the end is not advised, so nothing is rounded up; where the kernel's THP mode is
`never` nothing is moved.

`use_huge_pages` moves a loaded model's large tensors (`streamed_tensors`: those a step reads
whole) one at a time, each old copy freed as it goes (the peak is the weights plus one tensor).
Each tensor keeps its identity (its storage is swapped under it with `tensor.data = ...`), so
tied weights and modules holding the same tensor objects see the moved ones, and the values are
bitwise unchanged.
"""

from __future__ import annotations

import itertools
import mmap
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from cpmgen.model import CPMModel

HUGE_PAGE = 2 << 20
ALIGN = 64  # each moved tensor starts on a cache line
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Huge pages can be advised here: Linux, with transparent huge pages not switched off."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in THP_MODE.read_text()
    except OSError:
        return False


def region(nbytes: int) -> torch.Tensor:
    """`nbytes` zeroed bytes (uint8) on huge pages as far as whole ones go; freed with the last
    tensor that uses them."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
    whole = nbytes // HUGE_PAGE * HUGE_PAGE
    if whole:
        mapping.madvise(mmap.MADV_HUGEPAGE, start, whole)
    # a storage of its own that starts at the boundary, and holds the mapping
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes, offset=start)


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.zeros, on huge pages for a CPU tensor where they are available."""
    if torch.device(device).type != "cpu" or not available():
        return torch.zeros(shape, dtype=dtype, device=device)
    return region(torch.Size(shape).numel() * dtype.itemsize).view(dtype).view(shape)


def movable(tensor: torch.Tensor, min_bytes: int) -> bool:
    """A plain CPU tensor of at least `min_bytes` that owns its whole storage (a view into a
    larger storage stays where it is: moving it would copy the bytes it shares)."""
    nbytes = tensor.numel() * tensor.element_size()
    return (tensor.device.type == "cpu" and tensor.layout == torch.strided and not tensor.is_mkldnn
            and tensor.is_contiguous() and tensor.storage_offset() == 0
            and tensor.untyped_storage().nbytes() == nbytes and nbytes >= min_bytes)


def use_huge_pages(tensors: Iterable[torch.Tensor], replaced: Callable[[torch.Tensor], None] = lambda tensor: None,
                   min_bytes: int = 256 << 10) -> int:
    """Move the CPU tensors of at least `min_bytes` among `tensors` into one mapping on huge pages,
    calling `replaced(tensor)` with each before its storage is swapped (the loader lets go of
    mapped checkpoint pages there). Returns the bytes moved (0 where huge pages are not available)."""
    if not available():
        return 0
    moving, seen = [], set()
    for tensor in tensors:
        if movable(tensor, min_bytes) and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            moving.append(tensor)
    if not moving:
        return 0
    sizes = [-(-tensor.numel() * tensor.element_size() // ALIGN) * ALIGN for tensor in moving]
    memory, offset = region(sum(sizes)), 0
    with torch.no_grad():
        for tensor, size in zip(moving, sizes):
            moved = memory[offset:offset + tensor.numel() * tensor.element_size()]
            moved = moved.view(tensor.dtype).view(tensor.shape).copy_(tensor)
            offset += size
            replaced(tensor)
            tensor.data = moved  # the old storage is freed here unless something else holds it
    return sum(sizes)


def streamed_tensors(model: CPMModel) -> list[torch.Tensor]:
    """The tensors a decode step reads whole: all of the model's parameters and buffers except the
    embedding tables (a step looks up one row of each), unless the output layer multiplies by the
    word-embedding table itself (it holds no tensor of its own: the tied output layer and cpmgen's
    GEMV; a quantized or oneDNN-packed output layer has its own copy)."""
    tables = {id(model.word_embeddings.weight), id(model.position_embeddings.weight)}
    own = next(itertools.chain(model.lm_head.parameters(), model.lm_head.buffers()), None)
    if own is None:
        tables.discard(id(model.word_embeddings.weight))
    return [t for t in itertools.chain(model.parameters(), model.buffers()) if id(t) not in tables]
