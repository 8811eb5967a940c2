"""How many CPU threads a process uses, and how they wait between parallel regions.

A decode step is hundreds of short parallel regions (one or more per linear), a few tens of
microseconds apart. A worker that sleeps as soon as a region ends (passive waiting) must be
woken for the next one, which on an idle machine cost a third to a half of the decode speed;
one that spins until the next region keeps it, but when the cores are shared with other busy
processes a spinning worker burns the time slice that the thread holding the work needs, and
two threads fell below the speed of one. No wait policy is best in both conditions
(benchmarks/bench_threads.py measures them), so:

- workers spin a bounded while (SPIN_COUNT) before they sleep: long enough to bridge the gap
  between the regions of a step, short enough to yield the core soon after it;
- while decoding, `ThreadTuner` times the steps and moves between one thread and all of them,
  keeping whichever is faster now: all of them on an idle machine, one on a busy one.

Imports no torch at module level: the wait policy must be in the environment before torch
loads OpenMP.
"""

from __future__ import annotations

import collections
import os
import statistics
import time
from typing import Callable

# GOMP_SPINCOUNT: GNU OpenMP's default is 300000; 10000 kept the idle speed of spinning.
SPIN_COUNT = "10000"


def configure_wait_policy() -> None:
    """Bounded spinning (SPIN_COUNT), unless the user chose a policy or a spin count."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


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


class ThreadTuner:
    """Decodes with one thread or with `most`, whichever takes less time per step now.

    Every step is timed. After `period` steps at the current count the other one is tried for
    PROBE steps (and one more that is not counted: the first step after a change also starts
    or parks the workers); the faster of the two medians is kept. A try that loses makes the
    period four times longer, up to MAX_PERIOD, so a settled choice costs few slow steps; one
    that wins starts again from FIRST_PERIOD, as the load on the machine has just changed. The
    count changes no value: every kernel of a step splits its work by output rows, not within
    a sum (the tests check that the logits are the same)."""

    PROBE = 4
    FIRST_PERIOD = 8
    MAX_PERIOD = 128  # steps: how soon a change in the machine's load is noticed at the latest
    MARGIN = 0.95  # the other count must be this much faster to be taken

    def __init__(self, most: int, start: int, clock: Callable[[], float] = time.perf_counter):
        import torch

        self.clock = clock
        self.current, self.other = (most, 1) if start == most else (1, most)
        torch.set_num_threads(self.current)
        self.period = self.until_try = self.FIRST_PERIOD
        self.recent: collections.deque[float] = collections.deque(maxlen=self.PROBE)
        self.trial: list[float] | None = None  # step times of the other count while it is tried

    def wrap(self, decode: Callable) -> Callable:
        """`decode`, timed and tuned."""
        def tuned(*args, **kwargs):
            start = self.clock()
            logits = decode(*args, **kwargs)
            self.record(self.clock() - start)
            return logits
        return tuned

    def record(self, seconds: float) -> None:
        import torch

        if self.trial is None:
            self.recent.append(seconds)
            self.until_try -= 1
            if self.until_try <= 0 and len(self.recent) == self.PROBE:
                self.trial = []
                torch.set_num_threads(self.other)
            return
        self.trial.append(seconds)
        if len(self.trial) <= self.PROBE:
            return
        tried = self.trial[1:]
        if statistics.median(tried) < self.MARGIN * statistics.median(self.recent):
            self.current, self.other = self.other, self.current
            self.recent = collections.deque(tried, maxlen=self.PROBE)
            self.period = self.FIRST_PERIOD
        else:
            torch.set_num_threads(self.current)
            self.period = min(4 * self.period, self.MAX_PERIOD)
        self.until_try, self.trial = self.period, None


def others_running() -> int:
    """Processes running or ready to run on the machine now, besides this one (Linux's
    /proc/stat; 0 where it cannot be read)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                if line.startswith("procs_running "):
                    return max(0, int(line.split()[1]) - 1)
    except (OSError, ValueError):
        pass
    return 0


def tuned_decode(decode: Callable, requested: int, threads: int, device_type: str, world: int) -> Callable:
    """`decode` under a ThreadTuner where cpmgen chose the thread count (no --threads) of a
    single CPU process with more than one; else `decode` itself. It starts with every thread
    where the cores they need are free now, else with one."""
    if requested > 0 or threads < 2 or device_type != "cpu" or world > 1:
        return decode
    start = threads if others_running() + threads <= available_cores() else 1
    return ThreadTuner(threads, start).wrap(decode)
