# ----------------------------------------------------------------------------- checkpoint fixtures
# Used by tests/test_checkpoint.py and tests/test_cli_checkpoint.py: random-weight Megatron
# checkpoints at any model-parallel size, the reference split rules written out independently
# of cpmgen.checkpoint.splits, and ways to run the `cpmgen` command (in process and as a
# subprocess) with a clean environment.

import dataclasses as _dataclasses
import hashlib as _hashlib
import os as _os
import re as _re
import subprocess as _subprocess
import sys as _sys
from pathlib import Path as _Path

import pytest as _pytest
import torch as _torch

from cpmgen.config import ModelArgs as _ModelArgs
from helpers import TINY as _TINY


@_pytest.fixture
def write_ckpt(tmp_path):
    """Factory: write_ckpt(name="ckpt", mp=1, args=TINY, iteration="release", seed=0,
    dtype=float32, state=None, with_args=True) -> tmp_path/name, a Megatron folder written by
    cpmgen.synthetic (with_args=False: no stored head count)."""
    from cpmgen.synthetic import write_megatron_checkpoint

    def make(name: str = "ckpt", mp: int = 1, args: _ModelArgs | None = None, iteration="release",
             seed: int = 0, dtype: _torch.dtype = _torch.float32, state=None, with_args: bool = True) -> _Path:
        return write_megatron_checkpoint(tmp_path / name, args or _TINY, mp, iteration, seed, dtype, state,
                                         with_args=with_args)

    return make


def _reference_shard(name: str, full: _torch.Tensor, mp: int, rank: int) -> _torch.Tensor:
    """Rank `rank`'s piece of an mp=1 tensor, as Megatron's mpu layers split it."""
    if mp == 1:
        return full
    if name == "word_embeddings.weight" or _re.search(r"\.mlp\.dense_h_to_4h\.(weight|bias)$", name):
        n = full.shape[0] // mp  # rows
        return full[rank * n:(rank + 1) * n]
    if _re.search(r"\.attention\.query_key_value\.(weight|bias)$", name):
        h = full.shape[0] // 3  # [q; k; v], rank r holds [q_r; k_r; v_r]
        n = h // mp
        q, k, v = full[:h], full[h:2 * h], full[2 * h:]
        return _torch.cat([q[rank * n:(rank + 1) * n], k[rank * n:(rank + 1) * n], v[rank * n:(rank + 1) * n]])
    if _re.search(r"\.(attention\.dense|mlp\.dense_4h_to_h)\.weight$", name):
        n = full.shape[1] // mp  # columns
        return full[:, rank * n:(rank + 1) * n]
    return full  # replicated: embeddings of positions, LayerNorms, the row-parallel biases


@_pytest.fixture
def reference_shard():
    """reference_shard(name, full, mp, rank): the split rule of the reference, independent of cpmgen."""
    return _reference_shard


def _load_rank_files(folder: _Path) -> list[dict]:
    files = sorted(_Path(folder).glob("mp_rank_*_model_states.pt"))
    return [_torch.load(f, map_location="cpu", weights_only=False) for f in files]


@_pytest.fixture
def load_rank_files():
    """load_rank_files(iteration_folder) -> the torch.load'ed dict of every rank file, in rank order."""
    return _load_rank_files


def _tree_snapshot(root: _Path) -> dict:
    """Every file and folder under root (hidden ones too): size, mtime and content hash."""
    root = _Path(root)
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.stat()
        if p.is_dir():
            out[str(p.relative_to(root)) + "/"] = st.st_mtime_ns
        else:
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, _hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@_pytest.fixture
def tree_snapshot():
    """tree_snapshot(folder) -> {relative path: (size, mtime_ns, sha256)}; compare before/after."""
    return _tree_snapshot


@_pytest.fixture
def cpmgen_env(monkeypatch, tmp_path_factory):
    """No user config, no $CPMGEN_MODEL, no forced colours: commands see only their arguments."""
    for name in ("CPMGEN_MODEL", "CPMGEN_CONFIG", "CPMGEN_DEBUG", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path_factory.mktemp("xdg-config")))


@_dataclasses.dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    def __iter__(self):  # code, out, err = cpmgen_cli(...)
        return iter((self.code, self.stdout, self.stderr))


@_pytest.fixture
def cpmgen_cli(cpmgen_env, monkeypatch, capsys):
    """cpmgen_cli(*args) runs cpmgen.cli.main in process (the console script's entry point,
    including its UserError -> `error: ...`, exit 2 handling) and returns code, stdout, stderr."""
    from cpmgen.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        monkeypatch.setattr(_sys, "argv", ["cpmgen", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


@_pytest.fixture
def cpmgen_subprocess(cpmgen_env, tmp_path):
    """cpmgen_subprocess(*args) runs `python -m cpmgen ARGS` in tmp_path (about 1.5 s each)."""
    def run(*args) -> CliResult:
        proc = _subprocess.run([_sys.executable, "-m", "cpmgen", *map(str, args)], cwd=tmp_path,
                               capture_output=True, text=True, env=dict(_os.environ), timeout=120)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


# ----------------------------------------------------------------------------- model folders with a vocab


@_pytest.fixture(scope="session")
def model_dir_factory(tmp_path_factory):
    """model_dir_factory(name, args=TINY, mp=1, seed=0, state=None, iteration="release") -> a
    Megatron folder with a small trained sentencepiece vocab (CPM special pieces at the CPM ids)
    inside, so that `--model DIR` alone finds it."""
    from corpus import train_test_vocab
    from cpmgen.synthetic import write_megatron_checkpoint

    def make(name: str, args: _ModelArgs = _TINY, mp: int = 1, seed: int = 0, state=None,
             iteration="release") -> _Path:
        folder = write_megatron_checkpoint(tmp_path_factory.mktemp(name) / name, args, mp, iteration, seed,
                                           state=state)
        train_test_vocab(folder / "chinese_vocab.model", vocab_size=args.vocab_size)
        return folder

    return make


@_pytest.fixture
def prompt_file(tmp_path):
    """tmp_path/in.txt: two lines of a lyric in the older scripts' format (pieces ending with <eod>)."""
    path = tmp_path / "in.txt"
    path.write_text("春天的风吹过山岗<eod>我们一起唱歌<eod>", encoding="utf-8")
    return path
