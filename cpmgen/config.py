"""Configuration as dataclasses.

`ModelArgs` is the architecture (named presets for the public CPM-1 sizes). `Settings` is
everything a command can be told: one dataclass per YAML section, so `configs/*.yaml` and
`--set section.key=value` map onto fields one to one, and an unknown key is an error that
lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from cpmgen.errors import UserError
from cpmgen.tasks import TASKS

# Logits of a trained model stay within a few hundred: divided by less than this they can overflow fp32.
MIN_TEMPERATURE = 1e-3
# Penalties beyond the logits' own range only produce -inf rows (no token left to sample).
MAX_PENALTY = 100.0
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}  # torch's spelling is accepted too
DTYPES = ("auto", "fp32", "bf16", "fp16")  # --dtype and --kv-cache-dtype
QUANTIZE = ("none", "int8", "int4")


def check_dtype(option: str, value: str) -> None:
    if DTYPE_ALIASES.get(value, value) not in DTYPES:
        raise UserError(f"{option} {value}: choose auto, fp32, bf16 or fp16 (or float32, bfloat16, float16)")


@dataclass(frozen=True)
class ModelArgs:
    num_layers: int
    hidden_size: int
    num_heads: int
    vocab_size: int = 30000
    max_positions: int = 1024
    layernorm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        return 4 * self.hidden_size

    @property
    def num_params(self) -> int:
        h, v, p, n = self.hidden_size, self.vocab_size, self.max_positions, self.num_layers
        per_layer = 4 * h + (3 * h * h + 3 * h) + (h * h + h) + (4 * h * h + 4 * h) + (4 * h * h + h)
        return v * h + p * h + n * per_layer + 2 * h

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name]

    def preset_name(self) -> Optional[str]:
        for name, args in PRESETS.items():
            if args == self:
                return name
        return None


PRESETS: dict[str, ModelArgs] = {
    "cpm-small": ModelArgs(num_layers=12, hidden_size=768, num_heads=12),
    "cpm-medium": ModelArgs(num_layers=24, hidden_size=1024, num_heads=16),
    "cpm-large": ModelArgs(num_layers=32, hidden_size=2560, num_heads=32),
}

# The head count is not visible in the weights; the public releases fix it per hidden size.
HEADS_BY_HIDDEN = {args.hidden_size: args.num_heads for args in PRESETS.values()}


# ----------------------------------------------------------------------------- settings


@dataclass
class ModelSection:
    path: Optional[str] = None
    """Model folder (Megatron or HF format); also --model or $CPMGEN_MODEL."""
    preset: Optional[str] = None
    """Expected preset (cpm-small, cpm-medium, cpm-large); checked against the weights."""
    num_layers: Optional[int] = None
    hidden_size: Optional[int] = None
    num_heads: Optional[int] = None
    vocab_size: Optional[int] = None
    max_positions: Optional[int] = None
    trust_checkpoint: bool = False
    """Unpickle rank files without the safe allow-list (can run code from the file): only for
    a file you wrote yourself."""

    def validate(self) -> None:
        for key in ("num_layers", "hidden_size", "num_heads", "vocab_size", "max_positions"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise UserError(f"model.{key}={value}: must be a positive number")


@dataclass
class TokenizerSection:
    vocab: Optional[str] = None
    """Path of chinese_vocab.model; default: in or beside the model folder."""


@dataclass
class RuntimeSection:
    device: str = "auto"
    dtype: str = "auto"
    mp: Optional[int] = None
    """Model-parallel ranks (tensor parallel through torchrun); default 1, or torchrun's WORLD_SIZE."""
    quantize: str = "none"
    """none, int8 or int4: int8 (per-row scales) or 4-bit (per-group scales) linear weights, for
    memory-bound decode; their inputs are quantized to int8 per row on the fly (cpmgen/quantize.py)."""
    kv_cache_dtype: str = "auto"
    """auto, fp32, bf16 or fp16 (GPU): the dtype the keys and values are kept in, with a cache or
    without (so fast == slow still holds); auto: the weights' dtype, and bf16 where the linears are
    int8 or int4 (half the bytes each step reads from a long context)."""
    prepack: bool = True
    """CPU: run linears in a faster form than plain F.linear (cpmgen/prepack.py): cpmgen's fp32/bf16
    GEMV for decode, or oneDNN-prepacked weights on Intel's AVX-512, where they were measured."""
    threads: int = 0
    """CPU threads per process; 0: automatic (cpmgen/threads.py)."""
    compile: bool = False
    """torch.compile the one-token decode step (with CUDA graphs on GPU); on the CPU the
    prepacked eager linears are faster (README, Performance)."""

    def validate(self) -> None:
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            raise UserError(f"--device {self.device}: choose auto, cpu or cuda")
        check_dtype("--dtype", self.dtype)
        if self.quantize not in QUANTIZE:
            raise UserError(f"--quantize {self.quantize}: choose {', '.join(QUANTIZE[:-1])} or {QUANTIZE[-1]}")
        check_dtype("--kv-cache-dtype", self.kv_cache_dtype)
        if self.threads < 0:
            raise UserError(f"--threads {self.threads}: must be 0 (automatic) or a positive number")
        if self.mp is not None and self.mp < 1:
            raise UserError(f"--mp {self.mp}: the model-parallel size must be at least 1")


@dataclass
class WindowSection:
    size: Optional[int] = None
    """Most tokens the model sees; default max_positions - 1 (1023), as the older scripts."""
    stride: Optional[int] = None
    """Tokens dropped per slide (lyric: whole lines freeing at least this many); default a
    quarter of the window (255 of 1023): the window keeps 768+ tokens and re-encoding stays a
    small part of the time (README "Choosing the stride")."""
    keep: int = 0
    """First prompt tokens that stay at the start of the window through every slide."""

    def validate(self, max_positions: Optional[int] = None) -> None:
        """The checks that need the model's positions run once they are known."""
        size = self.size or (max_positions - 1 if max_positions else None)
        if self.size is not None and self.size < 2:
            raise UserError(f"window.size {self.size}: the window must hold at least 2 tokens")
        if max_positions and size > max_positions:
            raise UserError(f"window.size {size}: the model has only {max_positions} positions")
        if self.keep < 0 or size is not None and self.keep >= size - 1:
            below = f" and below window.size - 1 ({size - 1})" if size is not None else ""
            raise UserError(f"--keep {self.keep}: must be at least 0{below}")
        if self.stride is not None and (self.stride < 1 or size is not None and self.stride > size - self.keep):
            between = f"between 1 and window.size - keep ({size - self.keep})" if size is not None else "at least 1"
            raise UserError(f"--stride {self.stride}: must be {between}")


@dataclass
class SamplingParams:
    """How to pick the next token (also the `sampling:` config section, which adds the seed)."""

    temperature: float = 0.9
    top_k: int = 0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    greedy: bool = False

    def __post_init__(self):
        self.validate()

    @property
    def is_greedy(self) -> bool:
        """--greedy, or its usual spelling --temperature 0."""
        return self.greedy or self.temperature == 0

    def validate(self) -> None:
        """Refuse values that make the distribution degenerate (NaN, all -inf, overflow)."""
        for option, value in (("--temperature", self.temperature), ("--top-p", self.top_p),
                              ("--repetition-penalty", self.repetition_penalty),
                              ("--frequency-penalty", self.frequency_penalty),
                              ("--presence-penalty", self.presence_penalty)):
            if not math.isfinite(value):
                raise UserError(f"{option} {value}: must be a finite number")
        if self.temperature < 0:
            raise UserError(f"--temperature {self.temperature}: must be 0 (greedy) or more")
        if 0 < self.temperature < MIN_TEMPERATURE and not self.greedy:
            raise UserError(f"--temperature {self.temperature}: below {MIN_TEMPERATURE} the logits overflow; "
                            "use --greedy for the most likely token")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k}: must be 0 (off) or a positive number of tokens")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p {self.top_p}: must be in (0, 1]; 1 turns nucleus sampling off")
        if not self.repetition_penalty > 0:
            raise UserError(f"--repetition-penalty {self.repetition_penalty}: must be greater than 0 (1 is off)")
        for option, value in (("--frequency-penalty", self.frequency_penalty),
                              ("--presence-penalty", self.presence_penalty)):
            if abs(value) > MAX_PENALTY:
                raise UserError(f"{option} {value}: must be between -{MAX_PENALTY} and {MAX_PENALTY}")


@dataclass
class SamplingSection(SamplingParams):
    seed: Optional[int] = None

    def validate(self) -> None:
        super().validate()
        if self.seed is not None and not 0 <= self.seed < 2 ** 64:
            raise UserError(f"--seed {self.seed}: must be between 0 and 2**64 - 1")


@dataclass
class GenerateSection:
    fast: bool = True
    max_new_tokens: int = 256
    """New tokens per sample; 0: no limit (until end of text or Ctrl-C)."""
    min_new_tokens: int = 0
    """novel: an end of text among the first N new tokens does not end the sample."""
    ignore_eos: bool = False
    """novel: an end of text never ends the sample; it stays in the window (the model starts a
    new text, as after the <eod> between two training articles) and shows as a line break."""
    out_seq_length: Optional[int] = None
    """Older scripts' meaning: total length, prompt plus new tokens (overrides max_new_tokens)."""
    num_samples: int = 1
    stop: list[str] = field(default_factory=list)
    """A sample ends once its text contains one of these strings."""
    lines: Optional[int] = None
    """lyric: a sample ends once its text shows this many line breaks."""
    output: Optional[str] = None
    """Also write the text (prompt and continuation) to this file; checked before the work,
    it holds the text so far if the run is stopped."""
    force: bool = False
    """Replace an existing output file."""
    json: bool = False

    def validate(self, task: Optional[str]) -> None:
        """`task` None: the checks that hold for any task."""
        for option_name, value in (("--max-new-tokens", self.max_new_tokens), ("--out-seq-length", self.out_seq_length),
                                   ("--min-new-tokens", self.min_new_tokens)):
            if value is not None and value < 0:
                raise UserError(f"{option_name} {value}: must not be negative")
        if self.num_samples < 1:
            raise UserError(f"--num-samples {self.num_samples}: must be at least 1")
        if task == "lyric":
            if self.lines is not None and self.lines < 1:
                raise UserError(f"--lines {self.lines}: give at least 1")
            if self.ignore_eos or self.min_new_tokens:
                raise UserError("--ignore-eos / --min-new-tokens: only novel ends at end of text (in lyric, <eod> is a line break)")
        elif task == "novel" and self.lines is not None:
            raise UserError("--lines: only lyric counts lines; use --max-new-tokens or --stop for novel")
        if (self.min_new_tokens and self.max_new_tokens and self.out_seq_length is None
                and self.min_new_tokens > self.max_new_tokens):
            raise UserError(f"--min-new-tokens {self.min_new_tokens}: more than --max-new-tokens {self.max_new_tokens}")
        if any(not s for s in self.stop):
            raise UserError("--stop '': a stop text must not be empty")


@dataclass
class Settings:
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    runtime: RuntimeSection = field(default_factory=RuntimeSection)
    window: WindowSection = field(default_factory=WindowSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    generate: GenerateSection = field(default_factory=GenerateSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, task: Optional[str] = None, max_positions: Optional[int] = None) -> None:
        """Every check of the values, wherever they came from (defaults, YAML, --set, options, a
        request); the window's checks against the model's positions once `max_positions` is known."""
        if task is not None and task not in TASKS:
            raise UserError(f"task {task!r}: choose {' or '.join(TASKS)}")
        self.model.validate()
        self.runtime.validate()
        self.window.validate(max_positions)
        self.sampling.validate()
        self.generate.validate(task)


# Each command-line option (by its parameter name in cli.py) and the settings key it sets: the
# one path from options to Settings, for the commands and for Engine jobs and requests.
OPTION_KEYS: dict[str, str] = {
    "model": "model.path", "trust": "model.trust_checkpoint", "vocab": "tokenizer.vocab",
    "device": "runtime.device", "dtype": "runtime.dtype", "quantize": "runtime.quantize",
    "kv_cache_dtype": "runtime.kv_cache_dtype",
    "compiled": "runtime.compile", "threads": "runtime.threads", "mp": "runtime.mp",
    "stride": "window.stride", "keep": "window.keep",
    "temperature": "sampling.temperature", "top_k": "sampling.top_k", "top_p": "sampling.top_p",
    "repetition_penalty": "sampling.repetition_penalty", "frequency_penalty": "sampling.frequency_penalty",
    "presence_penalty": "sampling.presence_penalty", "greedy": "sampling.greedy", "seed": "sampling.seed",
    "max_new_tokens": "generate.max_new_tokens", "min_new_tokens": "generate.min_new_tokens",
    "ignore_eos": "generate.ignore_eos", "out_seq_length": "generate.out_seq_length",
    "lines": "generate.lines", "stop": "generate.stop", "num_samples": "generate.num_samples",
    "fast": "generate.fast", "output": "generate.output", "force": "generate.force", "as_json": "generate.json",
}
# The options one job may set on a loaded engine: how to write, not what to load or where to print.
JOB_OPTIONS = tuple(name for name, key in OPTION_KEYS.items()
                    if key.split(".")[0] in ("window", "sampling", "generate") and name not in ("output", "force", "as_json"))


def apply_options(settings: Settings, options: dict[str, Any], allowed: Iterable[str] = OPTION_KEYS) -> None:
    """Set the keys of the given options (None: not given, the settings keep theirs)."""
    allowed = set(allowed)
    for name, value in options.items():
        if name not in allowed:
            raise UserError(f"{name}: not an option here (choose from {', '.join(sorted(allowed))})")
        if value is not None:
            section, key = OPTION_KEYS[name].split(".")
            setattr(getattr(settings, section), key, value)
    if options.get("out_seq_length") is not None:
        if options.get("max_new_tokens") is not None:
            raise UserError("--out-seq-length and --max-new-tokens both set the length; give one of them")
        settings.generate.max_new_tokens = 0  # the total length alone decides (Engine.prepare)


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in dataclasses.fields(Settings)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML/--set value against a field's type, converting int -> float where natural."""
    origin = typing.get_origin(annotation)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(item, typing.get_args(annotation)[0], where) for item in items]
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        annotation = args[0]
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    name = getattr(annotation, "__name__", str(annotation))
    raise UserError(f"{where}: expected {name}, got {value!r}")


def apply_values(settings: Settings, values: dict, source: str) -> None:
    """Apply a nested {section: {key: value}} mapping; unknown sections or keys are errors."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: expected a mapping of sections (model:, window:, ...), got {type(values).__name__}")
    sections = _sections()
    for section, entries in values.items():
        if section not in sections:
            raise UserError(f"{source}: unknown section {section!r}; valid sections: {', '.join(sections)}")
        if entries is None:
            continue
        if not isinstance(entries, dict):
            raise UserError(f"{source}: section {section!r} must be a mapping of keys")
        target = getattr(settings, section)
        hints = typing.get_type_hints(type(target))
        for key, value in entries.items():
            if key not in hints:
                valid = ", ".join(f"{section}.{k}" for k in hints)
                raise UserError(f"{source}: unknown key {section}.{key}; valid keys: {valid}")
            setattr(target, key, _coerce(value, hints[key], f"{source}: {section}.{key}"))


def parse_set(assignment: str) -> dict:
    """'window.stride=8' -> {'window': {'stride': 8}} (the value is read as YAML)."""
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise UserError(f"--set {assignment!r}: expected section.key=value, e.g. --set window.stride=8")
    key, raw = assignment.split("=", 1)
    section, name = key.strip().split(".", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return {section: {name: value}}


def user_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "cpmgen" / "config.yaml"


def load_yaml(path: Path, option: str = "--config") -> dict:
    if not path.exists() or path.is_dir():
        raise UserError(f"{path}: config file not found; check {option}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: not a valid YAML config ({first})") from None
    return values or {}


def default_settings(task: Optional[str] = None) -> Settings:
    """The built-in defaults, with the task's own (configs/<task>.yaml spells the result out)."""
    settings = Settings()
    if task is not None:
        apply_values(settings, TASKS[task].defaults, f"{task} defaults")
    return settings


def load_settings(config: Optional[str] = None, sets: Optional[list[str]] = None, task: Optional[str] = None) -> Settings:
    """One rule, later wins: built-in defaults < config files, each over the one before
    (~/.config/cpmgen/config.yaml, then $CPMGEN_CONFIG, then --config) < environment
    ($CPMGEN_MODEL) < --set < the command's own options (apply_options). Checked as a whole
    by Settings.validate once the options are on top.

    The user config or $CPMGEN_MODEL is where a model folder is configured once so that
    commands need no --model."""
    settings = default_settings(task)
    user = user_config_path()
    if user.is_file():
        apply_values(settings, load_yaml(user, "~/.config/cpmgen/config.yaml"), str(user))
    env_config = os.environ.get("CPMGEN_CONFIG")
    if env_config:
        apply_values(settings, load_yaml(Path(env_config), "$CPMGEN_CONFIG"), env_config)
    if config:
        apply_values(settings, load_yaml(Path(config)), config)
    if os.environ.get("CPMGEN_MODEL"):
        settings.model.path = os.environ["CPMGEN_MODEL"]
    for assignment in sets or []:
        apply_values(settings, parse_set(assignment), f"--set {assignment}")
    return settings

