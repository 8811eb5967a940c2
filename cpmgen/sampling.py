"""Turning logits into the next token: repetition penalty, temperature, top-k then top-p
(as the older CPM scripts), greedy or seeded sampling.

Sampling draws through an explicit torch.Generator with a fixed amount of randomness per
step (one exponential variate per vocab entry), so two paths that compute the same logits
draw the same tokens. On the CPU the library's ops (cpmgen/kernels/sampling.cpp) run the slow
parts, the top-p sort and the race, to the same tokens and the same generator state as torch's.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Optional, Sequence

import torch

from cpmgen import kernels
from cpmgen.config import SamplingParams
from cpmgen.errors import UserError


NON_FINITE_LOGITS = ("the model computed NaN or Inf logits; its weights may hold NaN/Inf (run cpmgen inspect-ckpt "
                     "--check-values on the model folder), or fp16 overflowed (try --dtype bf16 or fp32)")


# The library's argmax ops also take a bf16 model's logits as they are (widened exactly as compared).
ARGMAX_DTYPES = (torch.float32, torch.bfloat16)


def library_op(name: str, *rows: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)):
    """The library's op `name` where every one of `rows` is a CPU [batch, n] tensor of `dtypes`
    it takes, else None (torch's operations then do the same)."""
    if all(r.device.type == "cpu" and r.dtype in dtypes and r.dim() == 2 and r.shape[1] > 0 for r in rows):
        return kernels.op(name)
    return None


def require_finite(logits: torch.Tensor) -> None:
    """Stop on NaN or Inf logits instead of sampling noise from them. The least and the greatest
    logit tell (a NaN anywhere makes both NaN) in one vectorized pass, where testing each logit
    makes and reduces a mask as large as the vocabulary at every step."""
    low, high = torch.aminmax(logits)
    if not (math.isfinite(low.item()) and math.isfinite(high.item())):
        raise UserError(NON_FINITE_LOGITS)


def argmax(rows: torch.Tensor) -> torch.Tensor:
    """rows [batch, n] -> the index of each row's greatest value [batch], as rows.argmax(dim=-1)
    gives it (the first of equal ones; the first NaN where there is one). CPU fp32 and bf16 rows
    go to the library's vectorized loop: ATen's CPU argmax compares one value at a time, a visible
    part of a small model's step over a 30000-token vocabulary."""
    argmax_rows = library_op("argmax_rows", rows, dtypes=ARGMAX_DTYPES)
    if argmax_rows is not None:
        return argmax_rows(rows)
    return rows.argmax(dim=-1)


def apply_repetition_penalty(logits: torch.Tensor, contexts: Sequence[Sequence[int]], penalty: float) -> torch.Tensor:
    """CTRL's penalty on every token already in the window: positive logits divided, negative multiplied."""
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for row, context in enumerate(contexts):
        seen = torch.tensor(sorted(set(context)), dtype=torch.long, device=logits.device)
        values = logits[row, seen]
        logits[row, seen] = torch.where(values > 0, values / penalty, values * penalty)
    return logits


def apply_count_penalties(logits: torch.Tensor, contexts: Sequence[Sequence[int]], frequency: float,
                          presence: float) -> torch.Tensor:
    """As in the common LLM APIs, over the tokens in the window: subtract frequency * count
    and presence * (count > 0) from each token's logit."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    counts = torch.stack([torch.bincount(torch.tensor(list(c), dtype=torch.long), minlength=logits.shape[-1])
                          for c in contexts]).to(logits.device, logits.dtype)
    return logits - torch.where(counts > 0, frequency * counts + presence, 0.0)


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf what top-k, then top-p (the smallest set whose probability exceeds p), excludes.
    Among equal logits the lower token id comes first (a stable sort), so that the set is the same
    on every device and torch version."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # The library sorts the values alone (by their bits: the permutation is what makes torch's
        # sort slow over a vocabulary) and masks without the permutation, to the same result.
        descending_values, top_p_keep = library_op("descending_values", logits), library_op("top_p_keep", logits)
        if descending_values is not None and top_p_keep is not None:
            sorted_logits = descending_values(logits)
            return top_p_keep(logits, sorted_logits, torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1), top_p)
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1, stable=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Kept: the first token, and each one after a running total still at or below p (so the
        # token that crosses p is kept); the totals only grow, so those are the first ones.
        kept = 1 + (cumulative[..., :-1] <= top_p).sum(dim=-1)
        remove = torch.arange(logits.shape[-1], device=logits.device) >= kept[..., None]
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


@functools.cache
def library_race_is_torchs() -> bool:
    """Whether the library's race_argmax draws what torch's exponential_ draws on this torch (it
    runs the CPU generator's engine itself): checked once, on a few rows and seeds, the tokens and
    the generator's state afterwards."""
    race_argmax = kernels.op("race_argmax")
    if race_argmax is None:
        return False
    data = torch.Generator().manual_seed(0)
    for seed in range(4):
        probs = torch.softmax(torch.randn(3, 997, generator=data) * 4, dim=-1)
        probs[:, ::3] = 0.0
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        expected = argmax(probs / torch.empty_like(probs).exponential_(1.0, generator=theirs))
        if not torch.equal(race_argmax(probs, ours), expected) or not torch.equal(ours.get_state(), theirs.get_state()):
            warnings.warn("this torch's exponential_ draws differently from cpmgen's sampling kernel; sampling "
                          "runs on torch's operations, more slowly", stacklevel=2)
            return False
    return True


def race_argmax(probs: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """argmax(p / E) with E ~ Exp(1) for every entry draws from p (the exponential-race form of
    sampling). The library computes E only where it can matter (a zero probability's quotient is
    0), with the generator drawing for every entry all the same, so it ends where torch's does."""
    op = library_op("race_argmax", probs)
    if op is not None and (generator is None or generator.device.type == "cpu") and library_race_is_torchs():
        return op(probs, generator)
    return argmax(probs / torch.empty_like(probs).exponential_(1.0, generator=generator))


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator],
           contexts: Sequence[Sequence[int]]) -> torch.Tensor:
    """logits [batch, vocab] -> next token ids [batch]."""
    if params.is_greedy and (params.repetition_penalty, params.frequency_penalty, params.presence_penalty) == (1, 0, 0):
        # The check and the token in one pass over the logits (a visible part of a small step),
        # a bf16 model's as they are: converting them to fp32 first cost more than the pass.
        finite_argmax_rows = library_op("finite_argmax_rows", logits, dtypes=ARGMAX_DTYPES)
        if finite_argmax_rows is not None:
            tokens = finite_argmax_rows(logits)
            if min(tokens.tolist()) < 0:
                raise UserError(NON_FINITE_LOGITS)
            return tokens
    require_finite(logits)
    logits = apply_repetition_penalty(logits.float(), contexts, params.repetition_penalty)
    logits = apply_count_penalties(logits, contexts, params.frequency_penalty, params.presence_penalty)
    if params.is_greedy:
        return argmax(logits)
    logits = top_k_top_p_filter(logits / params.temperature, params.top_k, params.top_p)
    return race_argmax(torch.softmax(logits, dim=-1), generator)
