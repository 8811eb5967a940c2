"""How many CPU threads a process uses, and how they wait between parallel regions.

A decode step is hundreds of short parallel regions (one or more per linear). Between them
GNU OpenMP's worker threads spin by default; on an idle machine that saves a wake-up, but when
the cores are shared with other busy processes a spinning worker burns the time slice that
the thread holding the work needs, and decode with two threads fell to a tenth of the speed
of one. Passive waiting keeps two threads at the speed of the best fixed count on a busy
machine (benchmarks/bench_threads.py measures both conditions). Imports no torch: the wait
policy must be in the environment before torch loads OpenMP.
"""

from __future__ import annotations

import os


def configure_wait_policy() -> None:
    """Passive OpenMP waiting, unless the user chose a policy or a spin count."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads() -> int:
    """The available cores shared among the local ranks of a launcher (torchrun:
    LOCAL_WORLD_SIZE; the DeepSpeed launcher: LOCAL_SIZE); outside a launcher, OMP_NUM_THREADS
    when the user set it (torchrun sets it to 1 itself, so under a launcher it is not the user's)."""
    local_ranks = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE")
    if local_ranks is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, available_cores() // max(1, int(local_ranks or 1)))


def apply_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads: `requested` (--threads, runtime.threads) or the default."""
    import torch

    threads = requested if requested > 0 else default_threads()
    torch.set_num_threads(threads)
    return threads
