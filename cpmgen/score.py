"""Log-likelihood of a text under the model, past the window with the generation window rule.

Token j is predicted from exactly the context that generation would have had after j tokens
(window.py), so a score measures what a user gets from `lyric`/`novel` with the same window.
Fast: one forward per window position, scoring every token that shares it. Slow: one
forward per token, recomputing its whole context (the exact reference).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from cpmgen.model import CPMModel
from cpmgen.sampling import require_finite
from cpmgen.window import Window


def context_runs(ids: list[int], window: Window, fast: bool):
    """Yield (context, run): `context` holds the text indices that predict token j, for the
    last j of a run of `run` consecutive tokens. Between slides each context extends the one
    before, so the longest holds every shorter one as a prefix and one forward scores the
    whole run (fast); the slow path yields every token on its own."""
    ctx, run = [0], 0
    for j in range(1, len(ids)):
        run += 1
        if not fast:
            yield list(ctx), 1
            run = 0
        ctx.append(j)
        if window.overflows(len(ctx)):
            if run:
                yield ctx[:-1], run
                run = 0
            start, end = window.drop_range([ids[k] for k in ctx])
            ctx = ctx[:start] + ctx[end:]
    if run:
        yield ctx[:-1], run


@torch.inference_mode()
def score_ids(model: CPMModel, ids: list[int], window: Window, fast: bool = True,
              advance: Optional[Callable[[int], None]] = None) -> list[float]:
    """logprobs[i] = log p(ids[i + 1] | its window context)."""
    device = model.word_embeddings.weight.device
    logprobs: list[float] = []
    for ctx, run in context_runs(ids, window, fast):
        tokens = torch.tensor([[ids[k] for k in ctx]], device=device)
        logits = model(tokens, torch.arange(len(ctx), device=device))[0, len(ctx) - run:].float()
        require_finite(logits)
        first = len(logprobs) + 1
        targets = torch.tensor(ids[first:first + run], device=device)
        logprobs += torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0].tolist()
        if advance:
            advance(run)
    return logprobs


def _nll(logprobs: list[float]) -> float:
    return -sum(logprobs) / len(logprobs) if logprobs else 0.0


def summary(ids: list[int], logprobs: list[float]) -> dict:
    nll = _nll(logprobs)
    return {"ids": ids, "logprobs": logprobs, "nll": nll, "perplexity": math.exp(nll)}


def window_report(logprobs: list[float], size: int) -> list[dict]:
    """Perplexity by position of the predicted token in the text: tokens 0..W, W..2W, ...
    (logprobs[i] predicts token i + 1), so a user sees whether quality holds past the window."""
    buckets = []
    for start in range(0, len(logprobs) + 1, size):
        part = logprobs[max(start - 1, 0):start + size - 1]
        if part:
            nll = _nll(part)
            buckets.append({"start": start, "end": start + size, "tokens": len(part), "nll": nll,
                            "perplexity": math.exp(nll)})
    return buckets
