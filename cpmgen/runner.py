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
from cpmgen.model import CPMModel, decode_step
from cpmgen.sampling import SamplingParams
from cpmgen.signals import handlers_replaced
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

    # SIGTERM too: torchrun answers a Ctrl-C by terminating its ranks, with a grace period;
    # and SIGHUP: a closed terminal keeps the text so far as a Ctrl-C does.
    with handlers_replaced((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), handler):
        yield requested


class Follow:
    """One sample's text as its tokens come: the live text chunks, and when it ends (end of
    text, a stop string in its text, its last lyric line). Shared by `run` and the server's
    batch scheduler, so a sample ends at the same token whichever runs it."""

    def __init__(self, job: Job, tokenizer: CPMTokenizer):
        self.job, self.eod = job, tokenizer.eod_id
        self.ids: list[int] = []
        self.reason: Optional[str] = None
        self.decoder = StreamDecoder(tokenizer)
        self.shown = 0
        self.tail = ""  # the end of the text shown, long enough to hold any stop string
        self.lines = 0
        self.longest_stop = max(map(len, job.stop), default=0)

    def push(self, token: int) -> str:
        """Take the next token; return the text it makes printable (end of text: nothing)."""
        if self.ends_text(token):
            self.reason = "eod"
            return ""
        self.ids.append(token)
        chunk = self.catch_up()
        self.lines += chunk.count("\n")  # every line break the user sees
        if any(s in self.tail for s in self.job.stop):
            self.reason = "stop"
        elif self.job.max_lines is not None and self.lines >= self.job.max_lines:
            self.reason = "lines"
        return chunk

    def ends_text(self, token: int) -> bool:
        """A novel ends at an end of text, unless --ignore-eos or before --min-new-tokens."""
        return (token == self.eod and self.job.task.ends_at_eod() and not self.job.ignore_eos
                and len(self.ids) >= self.job.min_new_tokens)

    def catch_up(self) -> str:
        """The text of the ids not shown yet (after an interruption between push and show)."""
        new_ids, self.shown = self.ids[self.shown:], len(self.ids)
        chunk = self.decoder.push(self.job.task.display_ids(new_ids, self.eod))
        # only the end of the text can hold a stop string that this chunk completed
        self.tail = (self.tail + chunk)[-(self.longest_stop + len(chunk)):]
        return chunk

    def text(self, tokenizer: CPMTokenizer) -> str:
        return tokenizer.decode(self.job.task.display_ids(self.ids, self.eod))


def run(job: Job, model: CPMModel, tokenizer: CPMTokenizer, prompt_ids: list[int], view,
        agree: Callable[[bool], bool] = bool, decode: Callable = decode_step) -> Result:
    """`agree(flag)` makes model-parallel ranks stop at the same step: true on all when true on
    any; `decode`: the one-token step (decode_step or its compiled form)."""
    seed = job.seed if job.seed is not None else new_seed()
    device = model.word_embeddings.weight.device
    generators = [torch.Generator(device).manual_seed(sample_seed(seed, i)) for i in range(job.num_samples)]
    follows = [Follow(job, tokenizer) for _ in range(job.num_samples)]
    stats = Stats()
    steps = generate(model, prompt_ids, job.window, job.params, job.max_new_tokens, job.num_samples, job.fast,
                     generators, stats, decode=decode)
    with stop_on_ctrl_c() as interrupted:
        for tokens in steps:
            for row, token in enumerate(tokens):
                if follows[row].reason is None:
                    view.update(row, follows[row].push(token), stats)
            if agree(interrupted.is_set()):
                for follow in follows:
                    follow.reason = follow.reason or "interrupt"
            if all(f.reason is not None for f in follows):
                break
        steps.close()
    for row, follow in enumerate(follows):
        follow.reason = follow.reason or "length"
        view.update(row, follow.catch_up(), stats)
        view.update(row, follow.decoder.flush(), stats)
    return Result(prompt_ids, [f.ids for f in follows], [f.reason for f in follows], stats, seed,
                  [f.text(tokenizer) for f in follows])


def new_seed() -> int:
    return int.from_bytes(os.urandom(4), "little")
