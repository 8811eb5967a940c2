"""The generation loop: a window of tokens per sample, one token per step, forever if asked.

Slow path: every step recomputes each sample's whole window (the older scripts' exact rule).
Fast path: a KV cache. Each sample's window is encoded once (prefill); then each step feeds
only the new token at the next position. When a window slides (window.py), the kept tokens
get new positions, so that sample is re-encoded into its cache rows in one prefill and
decoding continues. Both paths compute the next-token logits from the same window contents
at the same positions and sample through the same generator, so they emit the same tokens.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

from cpmgen import hugepages
from cpmgen.model import CPMModel, KVCache, decode_step
from cpmgen.sampling import SamplingParams, sample
from cpmgen.window import Window


@dataclass
class Stats:
    """What a generation did so far: tokens, elapsed time, slides, and the prefills (the
    prompt's encoding and each re-encode after a slide) with their tokens and time, so a
    caller can tell the cost of slides from the cost of decoding."""

    new_tokens: int = 0
    seconds: float = 0.0
    slides: int = 0
    prefill_tokens: int = 0
    prefills: int = 0
    prefill_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"new_tokens": self.new_tokens, "seconds": round(self.seconds, 4),
                "tokens_per_s": round(self.tokens_per_s, 3), "slides": self.slides,
                "prefill_tokens": self.prefill_tokens}


def prefill(model: CPMModel, window_ids: list[int], kv_cache: KVCache, row: int) -> torch.Tensor:
    """Encode one sample's window at positions 0..n-1 into its cache row; return next-token logits [vocab]."""
    device = kv_cache.k[0].device
    tokens = torch.tensor([window_ids], device=device)
    logits = model(tokens, torch.arange(len(window_ids), device=device), kv_cache.rows(slice(row, row + 1)),
                   last_only=True)
    return logits[0, -1]


def timed_prefill(model: CPMModel, window_ids: list[int], kv_cache: KVCache, row: int, stats: Stats) -> torch.Tensor:
    """prefill, counted in `stats`. On a GPU the time waits for the work queued (one
    synchronize per prefill, not per token), so it is the prefill's and not its launch's."""
    start = time.perf_counter()
    logits = prefill(model, window_ids, kv_cache, row)
    if logits.device.type == "cuda":
        torch.cuda.synchronize(logits.device)
    stats.prefills += 1
    stats.prefill_tokens += len(window_ids)
    stats.prefill_seconds += time.perf_counter() - start
    return logits


def recompute(model: CPMModel, window_ids: list[int]) -> torch.Tensor:
    """The slow path: the whole window at positions 0..n-1, no cache; next-token logits [vocab]."""
    device = model.word_embeddings.weight.device
    tokens = torch.tensor([window_ids], device=device)
    return model(tokens, torch.arange(len(window_ids), device=device), last_only=True)[0, -1]


def fit_prompt(prompt: list[int], window: Window) -> list[int]:
    """A prompt longer than the window keeps its first `keep` tokens and its last part."""
    if len(prompt) <= window.size:
        return list(prompt)
    return prompt[:window.keep] + prompt[len(prompt) - (window.size - window.keep):]


def draw(logits: torch.Tensor, params: SamplingParams,
         generator: Union[None, torch.Generator, Sequence[torch.Generator]], windows: list[list[int]]) -> torch.Tensor:
    """The next token of every sample: one draw for the batch from one generator, or, given a
    generator per sample, each sample's token from its own (so a sample does not depend on how
    many were generated beside it)."""
    if generator is None or isinstance(generator, torch.Generator):
        return sample(logits, params, generator, windows)
    return torch.cat([sample(logits[row:row + 1], params, g, windows[row:row + 1]) for row, g in enumerate(generator)])


@torch.inference_mode()
def generate(model: CPMModel, prompt: list[int], window: Window, params: SamplingParams,
             max_new_tokens: Optional[int], num_samples: int = 1, fast: bool = True,
             generator: Union[None, torch.Generator, Sequence[torch.Generator]] = None,
             stats: Optional[Stats] = None, decode: Callable = decode_step) -> Iterator[list[int]]:
    """Yield the next token of every sample, step after step (max_new_tokens None: without end).

    The caller decides when a sample is finished (end of text, stop strings) and stops
    iterating when all are; `stats` is updated in place so it is right at any interruption.
    `generator`: one for the batch, or one per sample (see `draw`). `decode`: the one-token
    step (decode_step, or its compiled form: loading.compile_decode)."""
    stats = stats if stats is not None else Stats()
    if window.size > model.args.max_positions:
        raise ValueError(f"window of {window.size} tokens exceeds the model's {model.args.max_positions} positions")
    device = model.word_embeddings.weight.device
    windows = [fit_prompt(prompt, window) for _ in range(num_samples)]
    start = time.perf_counter()
    kv_cache = None
    if fast:
        kv_cache = model.new_kv_cache(num_samples, window.size, hugepages.zeros)
        first = timed_prefill(model, windows[0], kv_cache, 0, stats)  # all samples share the prompt: encode once
        kv_cache.share_first_row(len(windows[0]))
        logits = first.expand(num_samples, -1)
    step = 0
    while max_new_tokens is None or step < max_new_tokens:
        if not fast:
            logits = torch.stack([recompute(model, w) for w in windows])
        tokens = draw(logits, params, generator, windows)
        new = tokens.tolist()
        step += 1
        stats.new_tokens = step
        stats.seconds = time.perf_counter() - start
        yield new
        if max_new_tokens is not None and step >= max_new_tokens:
            return  # no forward for a token nobody will take
        slid = []
        for row, token in enumerate(new):
            windows[row].append(token)
            if window.overflows(len(windows[row])):
                windows[row] = window.slide(windows[row])
                slid.append(row)
        stats.slides += len(slid)
        if fast:
            if len(slid) < num_samples:
                # A slid sample's token goes in at some free slot here; its re-encode below overwrites it.
                positions = torch.tensor([len(w) - 1 for w in windows], device=device)
                logits = decode(model, tokens, positions, kv_cache)
            if slid:
                logits = logits.clone() if len(slid) < num_samples else torch.empty_like(logits)
                for row in slid:
                    logits[row] = timed_prefill(model, windows[row], kv_cache, row, stats)
