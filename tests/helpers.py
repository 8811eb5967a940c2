"""Shared by the test files, imported directly (conftest's fixtures cover the rest)."""

from pathlib import Path

import torch

from cpmgen.config import ModelArgs

CPM_TINY = Path(__file__).resolve().parent.parent / "models" / "cpm-tiny"  # the trained model shipped

# The one tiny model of the tests: 2 layers, hidden 64 (not a public CPM-1 size, so the head
# count comes from the Megatron args a synthetic checkpoint stores), 4 heads, a vocab of 1000
# (the test vocab of tests/corpus.py is trained to that size), 64 positions. Every
# model-parallel split dimension is divisible by 4.
TINY = ModelArgs(num_layers=2, hidden_size=64, num_heads=4, vocab_size=1000, max_positions=64)


def ops_run(call) -> set[str]:
    """The names of the operators `call()` ran (torch's profiler records every dispatched op)."""
    with torch.profiler.profile() as profile:
        call()
    return {event.name for event in profile.events()}


def at_thread_counts(call, counts=(1, 2, 3)) -> list:
    """call()'s result with torch at each thread count in turn (the count restored after)."""
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in counts:
            torch.set_num_threads(threads)
            outputs.append(call())
        return outputs
    finally:
        torch.set_num_threads(before)
