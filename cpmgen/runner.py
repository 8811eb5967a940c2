"""One generation job: prompt ids in, samples out, shown live as they come, stopped cleanly.

Between the CLI (options, files, display choice) and the loop (generate.py): it owns end of
text, streaming decode per sample and Ctrl-C, so that an interrupted run still returns
everything generated so far.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

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


@dataclass
class Result:
    prompt_ids: list[int]
    samples: list[list[int]]
    stop_reasons: list[str]
    stats: Stats
    seed: int
    texts: list[str] = field(default_factory=list)
    prompt_text: str = ""

    @property
    def interrupted(self) -> bool:
        return "interrupt" in self.stop_reasons

    def as_json(self, task: str) -> list[dict]:
        return [{"task": task, "prompt_ids": self.prompt_ids, "ids": ids, "text": text, "stop_reason": reason,
                 "seed": self.seed, "stats": self.stats.as_dict()}
                for ids, text, reason in zip(self.samples, self.texts, self.stop_reasons)]


def run(job: Job, model: CPMModel, tokenizer: CPMTokenizer, prompt_ids: list[int], view) -> Result:
    seed = job.seed if job.seed is not None else int.from_bytes(os.urandom(4), "little")
    generator = torch.Generator(model.word_embeddings.weight.device).manual_seed(seed)
    eod = tokenizer.eod_id
    samples: list[list[int]] = [[] for _ in range(job.num_samples)]
    reasons: list[Optional[str]] = [None] * job.num_samples
    decoders = [StreamDecoder(tokenizer) for _ in range(job.num_samples)]
    stats = Stats()
    steps = generate(model, prompt_ids, job.window, job.params, job.max_new_tokens, job.num_samples, job.fast,
                     generator, stats)
    try:
        for tokens in steps:
            for row, token in enumerate(tokens):
                if reasons[row] is not None:
                    continue
                if token == eod and job.task.ends_at_eod():
                    reasons[row] = "eod"
                    continue
                samples[row].append(token)
                view.update(row, decoders[row].push(job.task.display_ids([token], eod)), stats)
            if all(r is not None for r in reasons):
                break
    except KeyboardInterrupt:
        reasons = [r or "interrupt" for r in reasons]
    finally:
        steps.close()
    reasons = [r or "length" for r in reasons]
    for row, decoder in enumerate(decoders):
        tail = decoder.flush()
        if tail:
            view.update(row, tail, stats)
    texts = [tokenizer.decode(job.task.display_ids(s, eod)) for s in samples]
    prompt_text = tokenizer.decode(job.task.display_ids(prompt_ids, eod))
    return Result(prompt_ids, samples, reasons, stats, seed, texts, prompt_text)
