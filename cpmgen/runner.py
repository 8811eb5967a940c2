"""One generation job: prompt ids in, samples out, shown live as they come, stopped cleanly.

Between the CLI (options, files, display choice) and the loop (generate.py): it owns end of
text, streaming decode per sample and Ctrl-C, so that an interrupted run still returns
everything generated so far.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from cpmgen.generate import Stats, generate
from cpmgen.model import CPMModel
from cpmgen.sampling import SamplingParams
from cpmgen.tasks import Task
from cpmgen.tokenizer import CPMTokenizer, StreamDecoder
from cpmgen.window import Window


@dataclass
class Job:
    task: Task
    window: Window
    params: SamplingParams
    max_new_tokens: Optional[int]
    num_samples: int = 1
    fast: bool = True
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()  # a sample ends once its text contains one of these (kept in the text)
    max_lines: Optional[int] = None  # a sample ends once its text shows this many line breaks
    ignore_eos: bool = False  # novel: an end of text does not end the sample (it stays in the window)
    min_new_tokens: int = 0  # novel: an end of text among the first N new tokens does not end the sample either


def sample_seed(seed: int, index: int) -> int:
    """Sample `index` of a run with --seed S draws from seed S + index, so sample 0 is the
    single run with --seed S and sample i is the single run with --seed S + i."""
    return seed + index


@dataclass
class Result:
    prompt_ids: list[int]
    samples: list[list[int]]
    stop_reasons: list[str]
    stats: Stats
    seed: int
    texts: list[str] = field(default_factory=list)

    @property
    def interrupted(self) -> bool:
        return "interrupt" in self.stop_reasons

    def as_json(self, task: str) -> list[dict]:
        return [{"task": task, "prompt_ids": self.prompt_ids, "ids": ids, "text": text, "stop_reason": reason,
                 "seed": sample_seed(self.seed, i), "stats": self.stats.as_dict()}
                for i, (ids, text, reason) in enumerate(zip(self.samples, self.texts, self.stop_reasons))]


@contextlib.contextmanager
def stop_on_ctrl_c():
    """The first Ctrl-C asks the loop to stop after the current token (so the step finishes and
    everything so far is kept); a second one interrupts at once."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    # SIGTERM too: torchrun answers a Ctrl-C by terminating its ranks, with a grace period.
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run(job: Job, model: CPMModel, tokenizer: CPMTokenizer, prompt_ids: list[int], view,
        agree: Callable[[bool], bool] = bool) -> Result:
    """`agree(flag)` makes model-parallel ranks stop at the same step: true on all when true on any."""
    seed = job.seed if job.seed is not None else int.from_bytes(os.urandom(4), "little")
    device = model.word_embeddings.weight.device
    generators = [torch.Generator(device).manual_seed(sample_seed(seed, i)) for i in range(job.num_samples)]
    eod = tokenizer.eod_id
    samples: list[list[int]] = [[] for _ in range(job.num_samples)]
    reasons: list[Optional[str]] = [None] * job.num_samples
    decoders = [StreamDecoder(tokenizer) for _ in range(job.num_samples)]
    shown = [0] * job.num_samples
    stats = Stats()

    shown_text = [""] * job.num_samples
    lines = [0] * job.num_samples
    longest_stop = max(map(len, job.stop), default=0)

    def show(row: int) -> str:
        # Catches up from `shown`, so a Ctrl-C between append and display loses nothing.
        new_ids, shown[row] = samples[row][shown[row]:], len(samples[row])
        chunk = decoders[row].push(job.task.display_ids(new_ids, eod))
        view.update(row, chunk, stats)
        # only the end of the text can hold a stop string that this chunk completed
        shown_text[row] = (shown_text[row] + chunk)[-(longest_stop + len(chunk)):]
        return chunk

    def ends_text(row: int, token: int) -> bool:
        return (token == eod and job.task.ends_at_eod() and not job.ignore_eos
                and len(samples[row]) >= job.min_new_tokens)

    steps = generate(model, prompt_ids, job.window, job.params, job.max_new_tokens, job.num_samples, job.fast,
                     generators, stats)
    with stop_on_ctrl_c() as interrupted:
        for tokens in steps:
            for row, token in enumerate(tokens):
                if reasons[row] is not None:
                    continue
                if ends_text(row, token):
                    reasons[row] = "eod"
                    continue
                samples[row].append(token)
                lines[row] += show(row).count("\n")  # every line break the user sees
                if any(s in shown_text[row] for s in job.stop):
                    reasons[row] = "stop"
                elif job.max_lines is not None and lines[row] >= job.max_lines:
                    reasons[row] = "lines"
            if agree(interrupted.is_set()):
                reasons = [r or "interrupt" for r in reasons]
            if all(r is not None for r in reasons):
                break
        steps.close()
    reasons = [r or "length" for r in reasons]
    for row, decoder in enumerate(decoders):
        show(row)
        view.update(row, decoder.flush(), stats)
    texts = [tokenizer.decode(job.task.display_ids(s, eod)) for s in samples]
    return Result(prompt_ids, samples, reasons, stats, seed, texts)
