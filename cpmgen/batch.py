"""Continuous batching: many generation requests on one model, joining and leaving between steps.

Each request is a row of one running batch with its own window, positions, slides and
sampling state (its own seeded generator). A step samples every row's next token from its
own logits, exactly as the single-job loop (generate.py) does for one sample; then all rows
that did not slide decode their new token together in one forward at their own positions,
and each row that slid is re-encoded alone into its cache row. A new request is encoded
alone into a free cache row and joins at the next step; a finished or cancelled one leaves,
and the last row's cache moves into its place, so that the running rows are always cache
rows 0..n-1 and one forward serves them all.

A row's tokens are those of `cpmgen novel`/`lyric` with the same prompt, settings and seed:
the prompt and slide encodes are the same calls on the row alone, sampling sees the row's
logits and generator only, and the batched decode differs from a one-row decode only by the
rounding of the batched kernels (README, Serving, says what was measured).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from cpmgen import hugepages
from cpmgen.errors import UserError
from cpmgen.generate import Stats, fit_prompt, prefill
from cpmgen.model import KVCache, decode_step
from cpmgen.runner import Follow, Job, new_seed
from cpmgen.sampling import sample

log = logging.getLogger("cpmgen.serve")


class QueueFull(Exception):
    pass


@dataclass
class Request:
    """One generation request. `emit(event, data)` is called from the scheduler thread:
    ("token", (id, text)) per generated token with the text it makes printable (id None: the
    last held-back text), then once ("done", reason) or ("error", message)."""

    job: Job
    prompt_ids: list[int]
    emit: Callable[[str, object], None]
    id: str = ""
    seed: int = field(default_factory=new_seed)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stats: Stats = field(default_factory=Stats)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: Optional[float] = None

    def cancel(self) -> None:
        """Free the row at the next step (a client that went away)."""
        self.cancelled.set()


class Row:
    def __init__(self, request: Request, tokenizer, device):
        self.request = request
        self.job = request.job
        self.window_ids = fit_prompt(request.prompt_ids, self.job.window)
        self.generator = torch.Generator(device).manual_seed(request.seed)
        self.follow = Follow(self.job, tokenizer)
        self.logits: Optional[torch.Tensor] = None  # [vocab], the next token's
        self.steps = 0
        self.started = time.perf_counter()


class Scheduler:
    """Runs the batch in its own thread; `submit` may be called from any thread."""

    def __init__(self, model, tokenizer, max_batch: int, max_queue: int, decode: Callable = decode_step):
        self.model, self.tokenizer, self.decode = model, tokenizer, decode
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = model.word_embeddings.weight.device
        self.slots = model.args.max_positions
        self.cache: Optional[KVCache] = None  # allocated on the first request
        self.rows: list[Row] = []  # row i lives in cache row i
        self.waiting: collections.deque[Request] = collections.deque()
        self.joining: list[Request] = []  # taken from the queue, being encoded into a row
        self.lock = threading.Condition()
        self.closed = False
        self.counters = collections.Counter()  # steps, slides, prompt_tokens, completion_tokens, requests_<reason>
        self.thread = threading.Thread(target=self._loop, name="cpmgen-batch", daemon=True)

    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join()

    def submit(self, request: Request) -> None:
        """Queue a request; QueueFull when max_batch requests run and max_queue more wait."""
        with self.lock:
            if len(self.rows) + len(self.joining) + len(self.waiting) >= self.max_batch + self.max_queue:
                self.counters["rejected"] += 1
                raise QueueFull(f"{len(self.rows)} requests running and {len(self.waiting)} queued; try again later")
            self.waiting.append(request)
            self.lock.notify()

    @property
    def running(self) -> int:
        return len(self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ the scheduler thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.lock:
                    while not self.closed and not self.rows and not self.waiting:
                        self.lock.wait()
                    if self.closed:
                        break
                    while self.waiting and len(self.rows) + len(self.joining) < self.max_batch:
                        self.joining.append(self.waiting.popleft())
                try:
                    while self.joining:
                        self._admit(self.joining[0])
                        self.joining.pop(0)
                    self._step()
                except Exception as e:  # noqa: BLE001 - fail the rows, keep serving
                    log.exception("batch step failed")
                    for row in list(self.rows):
                        self._finish(row, "error", f"{type(e).__name__}: {e}")
                    for request in self.joining:
                        request.emit("error", f"{type(e).__name__}: {e}")
                    self.joining.clear()
        for row in list(self.rows):
            self._finish(row, "error", "the server is shutting down")
        for request in self.joining + list(self.waiting):
            request.emit("error", "the server is shutting down")

    def _admit(self, request: Request) -> None:
        if request.cancelled.is_set():
            self._account(request, "cancel")
            return
        if self.cache is None:
            self.cache = self.model.new_kv_cache(self.max_batch, self.slots, hugepages.zeros)
        row = Row(request, self.tokenizer, self.device)
        row.logits = prefill(self.model, row.window_ids, self.cache, len(self.rows))
        self.rows.append(row)
        request.stats.prefill_tokens += len(row.window_ids)
        self.counters["prompt_tokens"] += len(request.prompt_ids)

    def _step(self) -> None:
        """Sample every row, let finished rows leave, decode the rest together, re-encode slides."""
        new, slid = {}, []
        for row in list(self.rows):
            request = row.request
            if request.cancelled.is_set():
                self._finish(row, "cancel")
                continue
            try:
                token = int(sample(row.logits[None], row.job.params, row.generator, [row.window_ids])[0])
            except UserError as e:  # NaN logits: this row's request fails, the others go on
                self._finish(row, "error", str(e))
                continue
            row.steps += 1
            request.stats.new_tokens = row.steps
            request.stats.seconds = time.perf_counter() - row.started
            if request.first_token is None:
                request.first_token = time.perf_counter()
            chunk = row.follow.push(token)
            if row.follow.reason != "eod":  # a novel's end of text is no part of it
                request.emit("token", (token, chunk))
            if row.follow.reason is None and row.job.max_new_tokens is not None and row.steps >= row.job.max_new_tokens:
                row.follow.reason = "length"
            if row.follow.reason is not None:
                self._finish(row, row.follow.reason)
                continue
            row.window_ids.append(token)
            if row.job.window.overflows(len(row.window_ids)):
                row.window_ids = row.job.window.slide(row.window_ids)
                request.stats.slides += 1
                self.counters["slides"] += 1
                slid.append(row)
            new[row] = token
        self.counters["steps"] += 1
        n = len(self.rows)  # finished rows have left, so these are exactly the rows in `new`
        if len(slid) < n:
            # Every running row decodes; a slid row's token lands in a slot its re-encode overwrites.
            tokens = torch.tensor([new[row] for row in self.rows], device=self.device)
            positions = torch.tensor([len(row.window_ids) - 1 for row in self.rows], device=self.device)
            logits = self.decode(self.model, tokens, positions, self.cache.rows(slice(0, n)))
            for i, row in enumerate(self.rows):
                row.logits = logits[i]
        for row in slid:
            index = self.rows.index(row)
            row.logits = prefill(self.model, row.window_ids, self.cache, index)
            row.request.stats.prefill_tokens += len(row.window_ids)

    def _finish(self, row: Row, reason: str, message: str = "") -> None:
        """The row leaves; the last row's cache moves into its place (rows stay 0..n-1)."""
        index = self.rows.index(row)
        last = len(self.rows) - 1
        if index != last:
            length = len(self.rows[last].window_ids)
            for t in self.cache.k + self.cache.v:
                t[index, :, :length].copy_(t[last, :, :length])
        self.rows[index] = self.rows[last]
        self.rows.pop()
        follow = row.follow
        tail = follow.catch_up() + follow.decoder.flush()
        if tail:
            row.request.emit("token", (None, tail))
        self._account(row.request, reason)
        if reason == "error":
            row.request.emit("error", message)
        else:
            row.request.emit("done", reason)

    def _account(self, request: Request, reason: str) -> None:
        self.counters["completion_tokens"] += request.stats.new_tokens
        self.counters[f"requests_{reason}"] += 1
