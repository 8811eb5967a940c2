"""Timing cpmgen's generation loop (cpmgen.generate.generate) as a user runs it: decode rates
in the window, past it (prefill time read from the loop's own Stats), full-window prefill, the
slow path; and per-token timestamps in the same form for every engine compared.

A shared module, not a script: bench_generate.py (CPU) and bench_gpu.py (GPU) both time
through it, so their figures mean the same.
"""

from __future__ import annotations

import statistics
import time

import torch

from cpmgen.generate import Stats, generate, prefill
from cpmgen.model import CPMModel, decode_step
from cpmgen.sampling import SamplingParams
from cpmgen.window import Window
from workload import GREEDY, WINDOW, random_ids, synchronize


def rate(tokens: float, seconds: float) -> float:
    return round(tokens / seconds, 3) if seconds > 0 else 0.0


def run_generate(model: CPMModel, prompt: list[int], window: Window, count: int, fast: bool = True) -> dict:
    """Take `count` tokens from generate(): its Stats, the time to the first token, the time
    after it, and the prompt's prefill time (the Stats' prefill time when the first token came;
    every later prefill is a re-encode after a slide).

    The loop stops right at the last token wanted (generate() would otherwise run one more step
    when resumed), so every timed forward pass produced a token that was used."""
    stats = Stats()
    start = time.perf_counter()
    first = end = None
    prompt_prefill_s = 0.0
    for taken, _ in enumerate(generate(model, prompt, window, GREEDY, None, fast=fast, stats=stats), 1):
        end = time.perf_counter()
        if first is None:
            first = end
            prompt_prefill_s = stats.prefill_seconds
        if taken == count:
            break
    return {"stats": stats, "first_token_s": first - start, "after_first_s": end - first,
            "prompt_prefill_s": prompt_prefill_s, "reencode_s": stats.prefill_seconds - prompt_prefill_s}


def measure_in_window(model: CPMModel, size: int, stride: int, prompt_tokens: int, new_tokens: int,
                      seed: int) -> dict:
    """Fast-path decode without a slide: the first token comes from the prompt's prefill, the
    `new_tokens` after it each cost one decode step."""
    prompt = random_ids(prompt_tokens, model.args.vocab_size, seed)
    if prompt_tokens + new_tokens + 1 > size:
        raise SystemExit(f"--new-tokens {new_tokens}: an in-window run must fit the {size}-token window")
    result = run_generate(model, prompt, Window(size, stride), new_tokens + 1)
    return {"prompt_tokens": prompt_tokens, "decode_tokens": new_tokens,
            "context_tokens": [prompt_tokens, prompt_tokens + new_tokens],
            "prompt_prefill_s": round(result["first_token_s"], 4),
            "decode_s": round(result["after_first_s"], 4),
            "tokens_per_s": rate(new_tokens, result["after_first_s"])}


def slide_figures(result: dict, size: int, stride: int, tokens: int, seconds: float) -> dict:
    stats: Stats = result["stats"]
    reencode_s = result["reencode_s"]
    return {"stride": stride, "kept_after_slide": size + 1 - stride, "new_tokens": tokens,
            "slides": stats.slides, "prefills": stats.prefills, "prefill_tokens": stats.prefill_tokens,
            "seconds": round(seconds, 3), "tokens_per_s": rate(tokens, seconds),
            "prompt_prefill_s": round(result["prompt_prefill_s"], 4),
            "reencode_s": round(reencode_s, 3), "reencode_share": round(reencode_s / seconds, 4),
            "reencode_per_slide_s": round(reencode_s / stats.slides, 3) if stats.slides else None,
            "decode_tokens_per_s": rate(tokens, seconds - reencode_s)}


def measure_unlimited(model: CPMModel, size: int, stride: int, prompt: list[int], new_tokens: int) -> dict:
    """Fast path from a short prompt over many windows; the whole run is timed, re-encodes
    (every prefill after the prompt's) measured apart."""
    result = run_generate(model, prompt, Window(size, stride), new_tokens)
    seconds = result["first_token_s"] + result["after_first_s"]
    return {"prompt_tokens": len(prompt), **slide_figures(result, size, stride, new_tokens, seconds)}


def measure_windows_side_by_side(model: CPMModel, size: int, stride: int, prompt_tokens: int, new_tokens: int,
                                 seed: int) -> tuple[dict, dict]:
    """Unlimited generation over `new_tokens` from a short prompt and whole windows (no slide)
    beside it, one token of each in turn, so that both meet the machine in the same state (its
    speed moves within seconds here): the in-window generation starts again from a new prompt
    each time its window is full, until the unlimited one is done. Returns (in_window,
    unlimited) as measure_in_window and measure_unlimited give them, each timed by its own steps
    only: the in-window side over its whole windows (a last one the unlimited side ended early is
    left out: its contexts are the short ones), from each one's first token on (its prompt's
    prefill apart); the unlimited side as a whole, its re-encodes measured apart."""
    window_tokens = size - prompt_tokens - 1  # decode steps of a whole window after its first token
    stats = Stats()
    unlimited = generate(model, random_ids(prompt_tokens, model.args.vocab_size, seed), Window(size, stride), GREEDY,
                         None, stats=stats)
    unlimited_s, prompt_prefill_s = 0.0, None
    in_window, taken, run_s = None, 0, 0.0
    whole, prefills_s = [], []  # (decode steps, seconds) of each whole window; each first token's seconds
    for _ in range(new_tokens):
        start = time.perf_counter()
        next(unlimited)
        unlimited_s += time.perf_counter() - start
        if prompt_prefill_s is None:
            prompt_prefill_s = stats.prefill_seconds
        if in_window is None or taken == window_tokens + 1:
            if in_window is not None:
                whole.append((taken - 1, run_s))
            prompt = random_ids(prompt_tokens, model.args.vocab_size, seed + 1 + len(whole))
            in_window, taken, run_s = generate(model, prompt, Window(size, stride), GREEDY, None), 0, 0.0
        start = time.perf_counter()
        next(in_window)
        seconds = time.perf_counter() - start
        taken += 1
        if taken == 1:
            prefills_s.append(seconds)
        else:
            run_s += seconds
    if taken == window_tokens + 1 or not whole:
        whole.append((taken - 1, run_s))
    decoded, in_window_s = sum(n for n, _ in whole), sum(t for _, t in whole)
    result = {"stats": stats, "reencode_s": stats.prefill_seconds - prompt_prefill_s, "prompt_prefill_s": prompt_prefill_s}
    return ({"prompt_tokens": prompt_tokens, "decode_tokens": decoded, "windows": len(whole),
             "context_tokens": [prompt_tokens, prompt_tokens + window_tokens],
             "prompt_prefill_s": round(statistics.median(prefills_s), 4), "decode_s": round(in_window_s, 4),
             "tokens_per_s": rate(decoded, in_window_s)},
            {"prompt_tokens": prompt_tokens, **slide_figures(result, size, stride, new_tokens, unlimited_s)})


def measure_steady(model: CPMModel, size: int, stride: int, new_tokens: int) -> dict:
    """Fast path in the steady state: the prompt fills the window, so the first token is followed
    by a slide, and every `stride` tokens after it by another. Timed after the first token:
    new_tokens (rounded up to whole strides) tokens, new_tokens / stride re-encodes of
    size + 1 - stride tokens each."""
    new_tokens = -(-new_tokens // stride) * stride
    prompt = random_ids(size, model.args.vocab_size, 6)
    result = run_generate(model, prompt, Window(size, stride), new_tokens + 1)
    return {"prompt_tokens": size, **slide_figures(result, size, stride, new_tokens, result["after_first_s"])}


def measure_slow(model: CPMModel, size: int, tokens: int) -> dict:
    """The slow path at a full window: stride 1 keeps the window at `size` tokens, so every
    step recomputes all of them."""
    prompt = random_ids(size, model.args.vocab_size, 2)
    result = run_generate(model, prompt, Window(size, 1), tokens, fast=False)
    seconds = result["first_token_s"] + result["after_first_s"]
    return {"window_tokens": size, "new_tokens": tokens, "seconds": round(seconds, 3),
            "tokens_per_s": rate(tokens, seconds)}


def measure_prefill(model: CPMModel, size: int, reps: int) -> dict:
    """cpmgen.generate.prefill of a full window into a KV cache (what each slide costs)."""
    ids = random_ids(size, model.args.vocab_size, 3)
    cache = model.new_kv_cache(1, size)
    times = []
    with torch.inference_mode():
        for _ in range(reps):
            start = time.perf_counter()
            prefill(model, ids, cache, 0)
            synchronize()
            times.append(time.perf_counter() - start)
    best = statistics.median(times)
    return {"tokens": size, "seconds": [round(t, 3) for t in times], "median_s": round(best, 3),
            "tokens_per_s": rate(size, best)}


class TokenClock:
    """A streamer for HF generate() (the interface of transformers' BaseStreamer, put and end,
    which generate() only calls) that timestamps each put: the first is the prompt, before the
    prefill; every later one a new token, right after it was chosen."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def rate_figures(runs: list[list[float]], prompt_tokens: int) -> dict:
    """Per-token timestamps of several runs (each [start, token 1, token 2, ...]) -> the figures
    of the run with the fastest decode, and every run's rate: other work on the machine slows
    some runs, never speeds one up."""
    def decode_s(times):
        return times[-1] - times[1]

    best = min(runs, key=decode_s)
    decode_tokens = len(best) - 2
    return {"threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
            "first_token_s": round(best[1] - best[0], 4), "decode_s": round(decode_s(best), 4),
            "tokens_per_s": round(decode_tokens / decode_s(best), 3),
            "tokens_per_s_runs": [round(decode_tokens / decode_s(times), 3) for times in runs]}


def cpmgen_timestamps(model: CPMModel, prompt_ids: list[int], new_tokens: int, decode=decode_step) -> list[float]:
    """[start, token 1, ..., token n] of cpmgen's fast path (WINDOW, greedy), each step taken by
    `decode` (decode_step, or the compiled step loading.compile_decode makes)."""
    times = [time.perf_counter()]
    for _ in generate(model, prompt_ids, WINDOW, GREEDY, new_tokens, decode=decode):
        times.append(time.perf_counter())
    return times


def engine_fields(model: CPMModel) -> dict:
    """The fields that name what ran in a rate's figures: cpmgen and its weights' dtype."""
    return {"impl": "cpmgen", "dtype": str(model.word_embeddings.weight.dtype).removeprefix("torch.")}


def cpmgen_rates_side_by_side(models: dict[str, CPMModel], prompt_ids: list[int], new_tokens: int,
                              slice_tokens: int = 16, params: dict[str, SamplingParams] | None = None) -> dict[str, dict]:
    """cpmgen's fast path (WINDOW; greedy, or a name's `params` with a generator seeded 0) with
    every model of `models` at once (a model may come under two names), `slice_tokens`
    tokens of each in turn (in the dict's order) until each has `new_tokens`, after a short
    untimed run of each: each model's steps are spread over the whole run, so that the models
    meet the machine in the same states (its speed moves within seconds here) and their rates
    compare the models rather than the moments. Per model, rate_figures' form of its one run,
    timed by its own steps only (its first token, the prompt's prefill, apart)."""
    for model in models.values():
        cpmgen_timestamps(model, prompt_ids, 4)
    params = params or {}
    runs = {name: generate(model, prompt_ids, WINDOW, params.get(name, GREEDY), new_tokens,
                           generator=torch.Generator().manual_seed(0))
            for name, model in models.items()}
    first_s, decode_s = {}, dict.fromkeys(models, 0.0)
    for name, run in runs.items():
        start = time.perf_counter()
        next(run)
        first_s[name] = time.perf_counter() - start
    for taken in range(1, new_tokens, slice_tokens):
        for name, run in runs.items():
            start = time.perf_counter()
            for _ in range(min(slice_tokens, new_tokens - taken)):
                next(run)
            decode_s[name] += time.perf_counter() - start
    decode_tokens = new_tokens - 1
    return {name: {**engine_fields(model), "threads": torch.get_num_threads(), "prompt_tokens": len(prompt_ids),
                   "greedy": params.get(name, GREEDY).is_greedy,
                   "decode_tokens": decode_tokens, "first_token_s": round(first_s[name], 4),
                   "decode_s": round(decode_s[name], 4), "tokens_per_s": rate(decode_tokens, decode_s[name]),
                   "slice_tokens": slice_tokens}
            for name, model in models.items()}


def cpmgen_generate_rate(model: CPMModel, prompt_ids: list[int], new_tokens: int, reps: int = 3,
                         decode=decode_step) -> dict:
    """rate_figures of cpmgen's fast path (WINDOW, greedy; steps by `decode`), the fastest of
    `reps` runs after a short untimed one, in the form hf_baseline.hf_generate_rate gives HF's."""
    cpmgen_timestamps(model, prompt_ids, 4, decode)
    runs = [cpmgen_timestamps(model, prompt_ids, new_tokens, decode) for _ in range(reps)]
    return {**engine_fields(model), **rate_figures(runs, len(prompt_ids))}
