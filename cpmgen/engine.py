"""The engine: one loaded model, tokenizer and window rule that runs jobs for any front end.

It takes settings, checks them, opens the checkpoint once, and then generates and scores as
many texts as asked: for the `cpmgen` commands, for the server (cpmgen/serve/) and from Python:

    from cpmgen.engine import Engine
    engine = Engine.load("models/cpm-tiny")
    for prompt in ["今天天气很好", "从前有座山"]:
        print(engine.generate(prompt, max_new_tokens=40, seed=1).texts[0])
    print(engine.score("今天天气很好，我们一起去公园散步。")["perplexity"])

`generate` runs the loop of `cpmgen novel` / `cpmgen lyric` (runner.run), so the same prompt,
settings and seed give the same tokens.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Optional

from cpmgen.config import JOB_OPTIONS, OPTION_KEYS, Settings, apply_options, load_settings
from cpmgen.display import Silent
from cpmgen.errors import UserError
from cpmgen.runner import Job, Result, run
from cpmgen.tasks import TASKS
from cpmgen.tokenizer import CPMTokenizer, find_vocab
from cpmgen.window import Window


class TextError(UserError):
    """What is wrong with the text itself (an empty prompt, a text too short to score): a front
    end names where the text came from, and the prompt loop asks again."""


def open_tokenizer(settings: Settings, vocab_size: Optional[int] = None) -> CPMTokenizer:
    """The tokenizer the settings name (or the one in or beside the model folder), checked
    against the model's vocab size."""
    path = find_vocab(None, settings.tokenizer.vocab, settings.model.path)
    tokenizer = CPMTokenizer(path)
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise UserError(f"{path}: vocab has {tokenizer.vocab_size} pieces but the model {settings.model.path} "
                        f"has vocab size {vocab_size}; pass the --vocab the model was trained with")
    return tokenizer


@contextlib.contextmanager
def no_progress(description: str, total: int):
    yield lambda n=1: None


class Engine:
    """`rank`/`world`: this process's shard of a model-parallel run (every rank builds its own
    engine and runs the same jobs). `progress(description, total)` is a context manager giving
    `advance(n)`, through which long work (loading, scoring) reports how far it is."""

    def __init__(self, settings: Settings, rank: int = 0, world: int = 1, progress=no_progress):
        from cpmgen.loading import load_model, open_model
        from cpmgen.threads import apply_threads, tuned_decode

        settings.validate()
        threads = apply_threads(settings.runtime.threads)
        self.settings, self.world = settings, world
        checkpoint = open_model(settings, rank=rank, world=world)
        with progress(f"loading {checkpoint.path.name}", len(checkpoint.names()) + 1) as advance:
            self.loaded = load_model(settings, advance, checkpoint, rank, world)
            self.model, self.args = self.loaded.model, self.loaded.args
            self.decode = tuned_decode(self.loaded.decode, settings.runtime.threads, threads, self.loaded.device.type,
                                       world)
            self.tokenizer = open_tokenizer(settings, self.args.vocab_size)
            advance(1)

    @classmethod
    def load(cls, model: Optional[str] = None, config: Optional[str] = None, sets: Optional[list[str]] = None,
             **options) -> "Engine":
        """Load a model folder; `options` as the command-line options (dtype="bf16", quantize="int8",
        threads=2, and any job option as the default of every job)."""
        settings = load_settings(config, sets)
        apply_options(settings, dict(options, model=model), OPTION_KEYS)
        return cls(settings)

    @property
    def device(self):
        return self.loaded.device

    def job_settings(self, task: Optional[str], options: dict) -> Settings:
        """The engine's settings with a job's options (JOB_OPTIONS) on top, checked."""
        settings = copy.deepcopy(self.settings)
        apply_options(settings, options, JOB_OPTIONS)
        settings.validate(task, self.args.max_positions)
        return settings

    def prepare(self, text: str, task: str = "novel", **options) -> tuple[Job, list[int]]:
        """The validated job and the prompt's ids for continuing `text`; options as JOB_OPTIONS
        (max_new_tokens=0: until the end of text)."""
        from cpmgen.memory import check_generation_memory

        settings = self.job_settings(task, options)
        gen, samp = settings.generate, settings.sampling
        job_task = TASKS[task]
        ids = job_task.prompt_ids(text, self.tokenizer)
        if not ids:
            raise TextError("the prompt is empty; write the opening text (lyric: lines ending with <eod>)")
        window = Window.from_settings(settings.window, self.args.max_positions,
                                      self.tokenizer.eod_id if job_task.lines else None)
        if window.keep > len(ids):
            raise UserError(f"--keep {window.keep}: the prompt has only {len(ids)} tokens; keep at most that many")
        if gen.out_seq_length is not None and gen.out_seq_length - len(ids) < 1:
            raise UserError(f"--out-seq-length {gen.out_seq_length}: not longer than the prompt "
                            f"({len(ids)} tokens); ask for more, or use --max-new-tokens")
        max_new_tokens = gen.out_seq_length - len(ids) if gen.out_seq_length is not None else gen.max_new_tokens
        check_generation_memory(self.args, gen.num_samples, window.size + 1, self.loaded.model.kv_cache_dtype,
                                self.device, self.world)
        job = Job(job_task, window, samp, max_new_tokens or None, gen.num_samples, gen.fast, samp.seed,
                  tuple(gen.stop), gen.lines, gen.ignore_eos, gen.min_new_tokens)
        return job, ids

    def run(self, job: Job, prompt_ids: list[int], view=None, agree: Callable[[bool], bool] = bool) -> Result:
        """Run a prepared job; `view` shows tokens as they come, `agree` makes model-parallel
        ranks stop at the same step (runner.run)."""
        return run(job, self.model, self.tokenizer, prompt_ids, view or Silent(), agree, self.decode)

    def generate(self, prompt: str, task: str = "novel", view=None, **options) -> Result:
        """Continue `prompt`; options as JOB_OPTIONS."""
        return self.run(*self.prepare(prompt, task, **options), view)

    def score(self, text: str, progress=no_progress, window_report: bool = False, **options) -> dict:
        """Log-likelihood and perplexity of `text` with the generation window (options: stride,
        keep, fast); `window_report` adds perplexity by position."""
        from cpmgen import score

        settings = self.job_settings(None, options)
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise TextError(f"the text has {len(ids)} token(s); scoring needs at least 2")
        window = Window.from_settings(settings.window, self.args.max_positions)
        with progress("scoring", len(ids) - 1) as advance:
            logprobs = score.score_ids(self.model, ids, window, settings.generate.fast, advance)
        result = score.summary(ids, logprobs)
        if window_report:
            result["window_report"] = score.window_report(logprobs, window.size)
        return result

