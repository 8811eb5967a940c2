"""Memory: what a run will take, checked against what the machine has before the work, and
handing back what loading and resharding no longer need."""

from __future__ import annotations

import ctypes
import mmap

import torch

from cpmgen.config import ModelArgs
from cpmgen.errors import UserError
from cpmgen.libc import LIBC

# Sampling holds a handful of [samples, vocab] temporaries at once (logits, probabilities,
# a sort and its order, the cumulative sum, the random race): bytes per vocab entry, generously.
SAMPLING_BYTES_PER_ENTRY = 64


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can take without swapping: MemAvailable on Linux, the free
    memory of a CUDA device."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def generation_bytes(args: ModelArgs, samples: int, window: int, dtype: torch.dtype, world: int = 1) -> int:
    """The KV cache (of `dtype`) of `samples` rows of `window` slots (this rank's heads), plus sampling temporaries."""
    element = torch.empty((), dtype=dtype).element_size()
    kv_cache = 2 * args.num_layers * samples * window * (args.hidden_size // world) * element
    return kv_cache + samples * args.vocab_size * SAMPLING_BYTES_PER_ENTRY


def check_generation_memory(args: ModelArgs, samples: int, window: int, dtype: torch.dtype,
                            device: torch.device, world: int = 1) -> None:
    need = generation_bytes(args, samples, window, dtype, world)
    free = available_bytes(device)
    if need > free:
        most = max(1, samples * free // need)
        raise UserError(f"--num-samples {samples}: needs about {need / 1e9:.1f} GB for the KV cache and sampling, "
                        f"but {free / 1e9:.1f} GB are available; ask for at most {most} samples")


_malloc_trim = getattr(LIBC, "malloc_trim", None)  # glibc only
_MADV_DONTNEED = 4


def release_pages(tensor: torch.Tensor) -> None:
    """Drop the pages of a memory-mapped tensor from this process's memory.

    torch.load(mmap=True) maps rank files privately and read-only in practice, so the pages
    are re-read from the file if touched again; without this, every tensor a reshard or a
    dtype-converting load has read stays resident and peak memory reaches twice the
    checkpoint. Only for tensors of a file mapping: on anonymous memory it would zero them."""
    if LIBC is None:
        return
    storage = tensor.untyped_storage()
    page = mmap.PAGESIZE
    start = (storage.data_ptr() + page - 1) // page * page
    end = (storage.data_ptr() + storage.nbytes()) // page * page
    if end > start:
        LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def trim_heap() -> None:
    """Give the free memory of the C heap back to the system.

    glibc serves allocations below its mmap threshold (which raises itself up to 32 MB as
    large blocks are freed) from the heap, and keeps what is freed there unless it is at the
    top: without this, a loop that makes and frees one merged tensor after another grows the
    resident set by most of what it made."""
    if _malloc_trim is not None:
        _malloc_trim(0)
