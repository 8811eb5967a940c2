"""What the benchmarks run on: random-weight checkpoints in the bench cache, loaded as a
release would be, random prompts, greedy sampling.

A shared module, not a script: the benchmark scripts import it (a script's own folder is on
sys.path), so every benchmark measures the same weights through the same loading code.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from cpmgen.config import PRESETS, Settings
from cpmgen.loading import Loaded, load_model
from cpmgen.model import CPMModel
from cpmgen.sampling import SamplingParams
from cpmgen.synthetic import write_megatron_checkpoint
from cpmgen.window import Window

WINDOW = Window(1023, 256)  # the full 1023-token window, for runs that never fill it (the stride is moot)
GREEDY = SamplingParams(greedy=True)
PROMPT_TOKENS = 32


def cache_dir() -> Path:
    """$CPMGEN_BENCH_CACHE, else $XDG_CACHE_HOME/cpmgen-bench, else ~/.cache/cpmgen-bench."""
    if os.environ.get("CPMGEN_BENCH_CACHE"):
        return Path(os.environ["CPMGEN_BENCH_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cpmgen-bench"


def checkpoint_folder(preset: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Where ensure_checkpoint keeps `preset`'s random weights: {preset}-seed{seed} in fp32,
    {preset}-{fp16|bf16}-seed{seed} otherwise."""
    tag = {torch.float32: "", torch.float16: "-fp16", torch.bfloat16: "-bf16"}[dtype]
    return cache_dir() / f"{preset}{tag}-seed{seed}"


def checkpoint_bytes(preset: str, dtype: torch.dtype = torch.float32) -> int:
    """The bytes of `preset`'s weights in `dtype` (what its checkpoint file holds, near enough)."""
    with torch.device("meta"):
        model = CPMModel(PRESETS[preset])
    return sum(t.numel() for t in model.state_dict().values()) * dtype.itemsize


def ensure_checkpoint(preset: str, seed: int = 0, dtype: torch.dtype = torch.float32, log=None) -> Path:
    """A random Megatron checkpoint of `preset`'s shape in the cache, written once (to a
    temporary folder, then renamed, so an interrupted write is never taken for a checkpoint).
    Writing holds the weights twice in memory (cpmgen.synthetic)."""
    folder = checkpoint_folder(preset, seed, dtype)
    if (folder / "latest_checkpointed_iteration.txt").is_file():
        return folder
    needed = checkpoint_bytes(preset, dtype) * 11 // 10
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if free < needed:
        raise SystemExit(f"{folder.parent}: {free / 1e9:.1f} GB free; a random {preset} checkpoint needs "
                         f"{needed / 1e9:.1f} GB")
    if log:
        log(f"writing a random {preset} checkpoint ({needed / 1.1e9:.1f} GB) to {folder} ...")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_megatron_checkpoint(partial, PRESETS[preset], seed=seed, dtype=dtype)
    partial.rename(folder)
    return folder


def random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def apply_extra_settings(settings: Settings, extra: dict | None) -> None:
    """Set {"section.key": value} on `settings`; an unknown section or key is an error."""
    for key, value in (extra or {}).items():
        section_name, _, field = key.partition(".")
        section = getattr(settings, section_name, None)
        if section is None or not field or not hasattr(section, field):
            raise ValueError(f"unknown setting {key!r}: expected section.key of cpmgen.config.Settings")
        setattr(section, field, value)


def load_cpmgen(checkpoint: str | Path, preset: str | None, dtype: str, extra_settings: dict | None = None,
                device: str = "cpu") -> CPMModel:
    """The model loaded through cpmgen.loading.load_model, as the CLI loads it, in `dtype`
    (fp32, bf16, fp16), with extra settings ({"runtime.quantize": "int8"}, ...). With
    "runtime.compile" use loaded_cpmgen: the compiled step is not part of the model."""
    return loaded_cpmgen(checkpoint, preset, dtype, extra_settings, device).model


def loaded_cpmgen(checkpoint: str | Path, preset: str | None, dtype: str, extra_settings: dict | None = None,
                  device: str = "cpu") -> Loaded:
    """load_cpmgen's model with its one-token step (`decode`: decode_step, or the compiled one
    under "runtime.compile"), as the CLI's generation runs them."""
    settings = Settings()
    settings.model.path = str(checkpoint)
    if preset:
        settings.model.preset = preset
    settings.runtime.device = device
    settings.runtime.dtype = dtype
    apply_extra_settings(settings, extra_settings)
    return load_model(settings)


def synchronize() -> None:
    """Wait for queued GPU work, so a timer stopped after a call measures the call."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
