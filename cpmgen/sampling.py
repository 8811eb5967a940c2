"""Turning logits into the next token: repetition penalty, temperature, top-k then top-p
(as the older CPM scripts), greedy or seeded sampling.

Sampling draws through an explicit torch.Generator with a fixed amount of randomness per
step (one exponential variate per vocab entry), so two paths that compute the same logits
draw the same tokens.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from cpmgen import kernels
from cpmgen.config import SamplingParams
from cpmgen.errors import UserError


def require_finite(logits: torch.Tensor) -> None:
    """Stop on NaN or Inf logits instead of sampling noise from them. The least and the greatest
    logit tell (a NaN anywhere makes both NaN) in one vectorized pass, where testing each logit
    makes and reduces a mask as large as the vocabulary at every step."""
    low, high = torch.aminmax(logits)
    if not (math.isfinite(low.item()) and math.isfinite(high.item())):
        raise UserError("the model computed NaN or Inf logits; its weights may hold NaN/Inf (run cpmgen "
                        "inspect-ckpt --check-values on the model folder), or fp16 overflowed (try --dtype bf16 or fp32)")


def argmax(rows: torch.Tensor) -> torch.Tensor:
    """rows [batch, n] -> the index of each row's greatest value [batch], as rows.argmax(dim=-1)
    gives it (the first of equal ones; the first NaN where there is one). CPU fp32 rows go to the
    library's vectorized loop: ATen's CPU argmax compares one value at a time, a visible part of
    a small model's step over a 30000-token vocabulary."""
    if rows.device.type == "cpu" and rows.dtype == torch.float32 and rows.dim() == 2 and rows.shape[1] > 0:
        argmax_rows = kernels.op("argmax_rows")
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
    """Set to -inf what top-k, then top-p (the smallest set whose probability exceeds p), excludes."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses p
        remove[..., 0] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator],
           contexts: Sequence[Sequence[int]]) -> torch.Tensor:
    """logits [batch, vocab] -> next token ids [batch]."""
    require_finite(logits)
    logits = apply_repetition_penalty(logits.float(), contexts, params.repetition_penalty)
    logits = apply_count_penalties(logits, contexts, params.frequency_penalty, params.presence_penalty)
    if params.is_greedy:
        return argmax(logits)
    logits = top_k_top_p_filter(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    # argmax(p / E) with E ~ Exp(1) draws from p (the exponential-race form of sampling).
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return argmax(probs / race)
