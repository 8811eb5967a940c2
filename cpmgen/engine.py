"""The engine: one loaded model, tokenizer and window rule that runs jobs for any front end.

It takes validated settings, opens the checkpoint once, and then generates and scores as
many texts as asked, from Python or from the server (cpmgen/serve/):

    from cpmgen.engine import Engine
    engine = Engine.load("models/cpm-tiny")
    for prompt in ["今天天气很好", "从前有座山"]:
        print(engine.generate(prompt, max_new_tokens=40, seed=1).texts[0])
    print(engine.score("今天天气很好，我们一起去公园散步。")["perplexity"])

`generate` runs the same loop as `cpmgen novel` / `cpmgen lyric` (runner.run), so the same
prompt, settings and seed give the same tokens.
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

from cpmgen.config import Settings, load_settings
from cpmgen.display import Silent
from cpmgen.errors import UserError
from cpmgen.runner import Job, Result, run
from cpmgen.tasks import TASKS
from cpmgen.tokenizer import CPMTokenizer, find_vocab
from cpmgen.window import Window

# The per-job options of `generate` and `job`, each with the settings section it overrides.
JOB_OPTIONS = {
    "max_new_tokens": "generate", "min_new_tokens": "generate", "ignore_eos": "generate", "stop": "generate",
    "lines": "generate", "fast": "generate", "num_samples": "generate",
    "temperature": "sampling", "top_k": "sampling", "top_p": "sampling", "repetition_penalty": "sampling",
    "frequency_penalty": "sampling", "presence_penalty": "sampling", "greedy": "sampling", "seed": "sampling",
    "stride": "window", "keep": "window",
}


def open_tokenizer(settings: Settings, vocab_size: Optional[int] = None) -> CPMTokenizer:
    """The tokenizer the settings name (or the one in or beside the model folder), checked
    against the model's vocab size."""
    path = find_vocab(None, settings.tokenizer.vocab, settings.model.path)
    tokenizer = CPMTokenizer(path)
    if vocab_size is not None and tokenizer.vocab_size != vocab_size:
        raise UserError(f"{path}: vocab has {tokenizer.vocab_size} pieces but the model {settings.model.path} "
                        f"has vocab size {vocab_size}; pass the --vocab the model was trained with")
    return tokenizer


def check_generation(task_name: str, settings: Settings) -> None:
    """The generation settings of a job, checked in one place for the CLI and the engine
    (values may have come from YAML, --set, options or a request)."""
    gen, samp = settings.generate, settings.sampling
    for option_name, value in (("--max-new-tokens", gen.max_new_tokens), ("--out-seq-length", gen.out_seq_length),
                               ("--min-new-tokens", gen.min_new_tokens)):
        if value is not None and value < 0:
            raise UserError(f"{option_name} {value}: must not be negative")
    if gen.num_samples < 1:
        raise UserError(f"--num-samples {gen.num_samples}: must be at least 1")
    if samp.temperature == 0:  # the usual spelling of greedy decoding
        samp.greedy, samp.temperature = True, 1.0
    samp.validate()
    if gen.lines is not None and (task_name != "lyric" or gen.lines < 1):
        raise UserError(f"--lines {gen.lines}: give at least 1" if task_name == "lyric"
                        else "--lines: only lyric counts lines; use --max-new-tokens or --stop for novel")
    if task_name == "lyric" and (gen.ignore_eos or gen.min_new_tokens):
        raise UserError("--ignore-eos / --min-new-tokens: only novel ends at end of text (in lyric, <eod> is a line break)")
    if gen.min_new_tokens and gen.max_new_tokens and gen.out_seq_length is None and gen.min_new_tokens > gen.max_new_tokens:
        raise UserError(f"--min-new-tokens {gen.min_new_tokens}: more than --max-new-tokens {gen.max_new_tokens}")
    if any(not s for s in gen.stop):
        raise UserError("--stop '': a stop text must not be empty")



class Engine:
    def __init__(self, settings: Settings, advance: Optional[Callable[[int], None]] = None):
        from cpmgen.loading import load_model
        from cpmgen.threads import apply_threads

        apply_threads(settings.runtime.threads)
        self.settings = settings
        self.loaded = load_model(settings, advance=advance)
        self.model = self.loaded.model
        self.args = self.loaded.args
        self.tokenizer = open_tokenizer(settings, self.args.vocab_size)

    @classmethod
    def load(cls, model: Optional[str] = None, config: Optional[str] = None, sets: Optional[list[str]] = None,
             **runtime) -> "Engine":
        """Load a model folder; `runtime` sets keys of the runtime section (dtype="bf16", quantize="int8", ...)."""
        settings = load_settings(config, sets)
        if model is not None:
            settings.model.path = model
        for key, value in runtime.items():
            if not hasattr(settings.runtime, key):
                raise UserError(f"{key}: not a runtime setting (choose from {', '.join(vars(settings.runtime))})")
            setattr(settings.runtime, key, value)
        return cls(settings)

    @property
    def device(self):
        return self.loaded.device

    def job(self, task: str = "novel", **options) -> Job:
        """A validated job: the engine's settings with `options` (JOB_OPTIONS) on top."""
        if task not in TASKS:
            raise UserError(f"task {task!r}: choose {' or '.join(TASKS)}")
        settings = copy.deepcopy(self.settings)
        for key, value in options.items():
            if key not in JOB_OPTIONS:
                raise UserError(f"{key}: not a generation option (choose from {', '.join(JOB_OPTIONS)})")
            if value is not None:
                setattr(getattr(settings, JOB_OPTIONS[key]), key, value)
        check_generation(task, settings)
        gen, samp = settings.generate, settings.sampling
        tsk = TASKS[task]
        window = Window.from_settings(settings.window, self.args.max_positions,
                                      self.tokenizer.eod_id if tsk.lines else None)
        return Job(tsk, window, samp, gen.max_new_tokens or None, gen.num_samples, gen.fast, samp.seed,
                   tuple(gen.stop), gen.lines, gen.ignore_eos, gen.min_new_tokens)

    def prompt_ids(self, text: str, job: Job) -> list[int]:
        ids = job.task.prompt_ids(text, self.tokenizer)
        if not ids:
            raise UserError("the prompt is empty; write the opening text (lyric: lines ending with <eod>)")
        if job.window.keep > len(ids):
            raise UserError(f"--keep {job.window.keep}: the prompt has only {len(ids)} tokens; keep at most that many")
        return ids

    def generate(self, prompt: str, task: str = "novel", view=None, **options) -> Result:
        """Continue `prompt`; options as JOB_OPTIONS (max_new_tokens=0: until the end of text)."""
        job = self.job(task, **options)
        return run(job, self.model, self.tokenizer, self.prompt_ids(prompt, job), view or Silent())

    def score(self, text: str, fast: bool = True, **window) -> dict:
        """Log-likelihood and perplexity of `text` with the generation window (stride, keep)."""
        from cpmgen.score import score_ids, summary

        settings = copy.deepcopy(self.settings.window)
        for key, value in window.items():
            setattr(settings, key, value)
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise UserError(f"the text has {len(ids)} token(s); scoring needs at least 2")
        return summary(ids, score_ids(self.model, ids, Window.from_settings(settings, self.args.max_positions), fast))
