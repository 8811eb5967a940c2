"""Configuration as dataclasses.

`ModelArgs` is the architecture (named presets for the public CPM-1 sizes). `Settings` is
everything a command can be told: one dataclass per YAML section, so `configs/*.yaml` and
`--set section.key=value` map onto fields one to one, and an unknown key is an error that
lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from cpmgen.errors import UserError
from cpmgen.sampling import SamplingParams


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
    prepack: bool = True
    """CPU: run linears on oneDNN-prepacked weights (about 2x faster decode and prefill)."""
    threads: int = 0
    """CPU threads per process; 0: automatic (cpmgen/threads.py)."""
    compile: bool = False
    """torch.compile the one-token decode step (with CUDA graphs on GPU); on the CPU the
    prepacked eager linears measured twice as fast (README, Performance)."""


@dataclass
class WindowSection:
    size: Optional[int] = None
    """Most tokens the model sees; default max_positions - 1 (1023), as the older scripts."""
    stride: Optional[int] = None
    """Tokens dropped per slide (lyric: whole lines freeing at least this many); default a
    quarter of the window (255 of 1023): the window keeps 768+ tokens and re-encoding takes
    about a fifth of the time (benchmarks/, README "Choosing the stride")."""
    keep: int = 0
    """First prompt tokens that stay at the start of the window through every slide."""


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
    """The built-in defaults, with the task's (configs/<task>.yaml semantics) when given."""
    settings = Settings()
    if task is not None:
        apply_values(settings, TASK_DEFAULTS[task], f"{task} defaults")
    return settings


def load_settings(config: Optional[str] = None, sets: Optional[list[str]] = None, task: Optional[str] = None) -> Settings:
    """One rule, later wins: built-in defaults < config files, each over the one before
    (~/.config/cpmgen/config.yaml, then $CPMGEN_CONFIG, then --config) < environment
    ($CPMGEN_MODEL) < --set < the command's own options (applied by the CLI).

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
    settings.model.validate()
    return settings


# What differs per task from the dataclass defaults; configs/<task>.yaml spells the full
# result out (a test keeps the two in step).
TASK_DEFAULTS: dict[str, dict] = {
    "lyric": {"generate": {"max_new_tokens": 128}, "sampling": {"temperature": 0.9, "top_p": 0.9}},
    "novel": {"generate": {"max_new_tokens": 512}, "sampling": {"temperature": 0.9, "top_p": 0.9}},
}
