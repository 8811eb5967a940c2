"""Files cpmgen did not write: no code from checkpoints, nothing deleted or overwritten that the
user did not name, outputs checked before the work, one-line errors for every failure."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cpmgen.checkpoint import megatron
from cpmgen.synthetic import random_state_dict

from helpers import TINY


def one_line_error(result, message: str | None = None, contains: str | None = None, code: int = 2) -> None:
    assert result.code == code, (result.code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    if message is not None:
        assert lines[0] == f"error: {message}"
    if contains is not None:
        assert contains in lines[0], lines[0]


class Payload:
    """Unpickling this appends a line to `marker`: what a malicious rank file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"echo ran >> {self.marker}",)


@pytest.fixture(scope="module")
def model_dir(model_dir_factory):
    return model_dir_factory("safety", seed=5)


def _poison(folder: Path, marker: Path, legacy: bool) -> None:
    """Rewrite the folder's rank file with the payload among its metadata."""
    rank_file = folder / "release" / megatron.rank_file_name(0)
    state = torch.load(rank_file, weights_only=False)
    state["lr_scheduler"] = Payload(marker)
    torch.save(state, rank_file, _use_new_zipfile_serialization=not legacy)


# ----------------------------------------------------------------------------- no code from checkpoints


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_pickle_payload_never_runs(cpmgen_cli, model_dir_factory, prompt_file, tmp_path, legacy):
    folder = model_dir_factory(f"poisoned{int(legacy)}", seed=5)
    marker = tmp_path / "marker"
    _poison(folder, marker, legacy)
    rank_file = folder / "release" / megatron.rank_file_name(0)
    expected = (f"{rank_file}: holds the Python object posix.system, which a checkpoint does not need and which "
                "could run code; not loaded (pass --trust-checkpoint only if you wrote this file yourself)")
    for command in (["inspect-ckpt", folder], ["reshard", folder, "--mp", 2, "-o", tmp_path / "r"],
                    ["convert", folder, "--to", "hf", "-o", tmp_path / "hf"],
                    ["convert", folder, "--to", "megatron", "-o", tmp_path / "m"],
                    ["novel", prompt_file, "-m", folder], ["lyric", prompt_file, "-m", folder],
                    ["score", prompt_file, "-m", folder]):
        one_line_error(cpmgen_cli(*command), expected)
        assert not marker.exists(), command
    assert not any((tmp_path / name).exists() for name in ("r", "hf", "m"))


def test_trust_checkpoint_is_the_explicit_opt_in_and_unpickles_once(cpmgen_cli, model_dir_factory, tmp_path):
    folder = model_dir_factory("trusted", seed=5)
    marker = tmp_path / "marker"
    _poison(folder, marker, legacy=False)
    result = cpmgen_cli("inspect-ckpt", folder, "--trust-checkpoint")
    assert result.code == 0, result.stderr
    assert marker.read_text().splitlines() == ["ran"]  # scanned and loaded: unpickled once


def test_release_metadata_loads_without_the_opt_in(cpmgen_cli, write_ckpt):
    """What the released files pickle: args (a Namespace), Python, NumPy and torch RNG states."""
    folder = write_ckpt("release-like")
    rank_file = folder / "release" / megatron.rank_file_name(0)
    state = torch.load(rank_file, weights_only=False)
    state["args"] = argparse.Namespace(num_attention_heads=4, model_parallel_size=1, fp16=True,
                                       params_dtype=torch.float16)
    state["np_rng_state"] = np.random.RandomState(3).get_state()
    state["cuda_rng_state"] = torch.zeros(16, dtype=torch.uint8)
    for legacy in (False, True):
        torch.save(state, rank_file, _use_new_zipfile_serialization=not legacy)
        result = cpmgen_cli("inspect-ckpt", folder)
        assert result.code == 0, result.stderr
        assert "no problems found" in result.stdout


def test_hf_bin_with_a_payload_is_called_that(cpmgen_cli, tmp_path):
    from cpmgen.checkpoint.hf import hf_config, megatron_to_hf

    import json

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf_config(TINY, torch.float32)))
    state = megatron_to_hf(random_state_dict(TINY))
    state["extra"] = Payload(tmp_path / "marker")
    torch.save(state, folder / "pytorch_model.bin")
    result = cpmgen_cli("inspect-ckpt", folder)
    one_line_error(result, f"{folder / 'pytorch_model.bin'}: holds pickled Python objects besides tensors, which "
                           "could run code and are not loaded; re-save the model with save_pretrained (safetensors)")
    assert not (tmp_path / "marker").exists()


# ----------------------------------------------------------------------------- nothing deleted that was not named


def test_force_never_replaces_the_folder_holding_the_source(cpmgen_cli, write_ckpt, tmp_path, tree_snapshot):
    source = write_ckpt("models/ckpt")
    (tmp_path / "models" / "notes.txt").write_text("mine")
    before = tree_snapshot(tmp_path / "models")
    for target in (tmp_path / "models", source, tmp_path):
        result = cpmgen_cli("reshard", source, "--mp", 2, "-o", target, "--force")
        one_line_error(result, f"{target}: holds the source checkpoint {source}; choose another --output")
    result = cpmgen_cli("convert", source, "--to", "megatron", "-o", source / "release", "--force")
    one_line_error(result, f"{source / 'release'}: holds the source checkpoint {source}; choose another --output")
    result = cpmgen_cli("reshard", source, "--mp", 2, "-o", source / "release" / "x", "--force")
    one_line_error(result, f"{source / 'release' / 'x'}: is inside the source checkpoint {source}; "
                           "choose another --output")
    assert tree_snapshot(tmp_path / "models") == before


def test_force_never_replaces_a_folder_with_other_files(cpmgen_cli, write_ckpt, tmp_path, tree_snapshot):
    source = write_ckpt("ckpt")
    target = tmp_path / "photos"
    target.mkdir()
    (target / "a.jpg").write_bytes(b"x")
    (target / "b.jpg").write_bytes(b"y")
    before = tree_snapshot(target)
    result = cpmgen_cli("reshard", source, "--mp", 2, "-o", target, "--force")
    one_line_error(result, f"{target}: --force replaces only a checkpoint folder, and this one also holds a.jpg "
                           "and 1 more; choose another --output")
    assert tree_snapshot(target) == before
    assert not list(tmp_path.glob(".*partial"))


def test_force_replaces_an_empty_folder(cpmgen_cli, write_ckpt, tmp_path):
    source = write_ckpt("ckpt")
    (tmp_path / "empty").mkdir()
    assert cpmgen_cli("reshard", source, "--mp", 2, "-o", tmp_path / "empty", "--force").code == 0
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == [megatron.LATEST_FILE, "release"]


def test_a_target_that_appears_meanwhile_is_not_replaced(cpmgen_cli, write_ckpt, tmp_path, monkeypatch):
    from cpmgen.checkpoint import writer

    source = write_ckpt("ckpt")
    target = tmp_path / "out"
    real = writer.write_megatron

    def racing(out, *args, **kwargs):
        target.mkdir()
        (target / "theirs.txt").write_text("made by someone else meanwhile")
        return real(out, *args, **kwargs)

    monkeypatch.setattr(writer, "write_megatron", racing)
    result = cpmgen_cli("reshard", source, "--mp", 2, "-o", target)
    one_line_error(result, f"{target}: appeared while this output was written; nothing was replaced (pass --force "
                           "to replace it, or choose another --output)")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]  # no temporary folder, no lock left


@pytest.mark.slow
def test_two_writers_to_one_output_exactly_one_wins(write_ckpt, tmp_path, cpmgen_env):
    # large enough that the two writers overlap
    source = write_ckpt("ckpt", args=dataclasses.replace(TINY, num_layers=4, hidden_size=256, vocab_size=4000,
                                                         max_positions=256))
    target = tmp_path / "out"
    command = [sys.executable, "-m", "cpmgen", "reshard", str(source), "--mp", "2", "-o", str(target)]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert sorted(code for code, _, _ in results) == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert loser.strip() in (f"error: {target}: another cpmgen is writing this output now; wait for it or choose "
                             "another --output",
                             f"error: {target}: output folder already exists; pass --force to replace it or "
                             "choose another --output")
    assert sorted(p.name for p in target.iterdir()) == [megatron.LATEST_FILE, "release"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_iteration_name_cannot_lead_out_of_the_folder(cpmgen_cli, write_ckpt, tmp_path):
    source = write_ckpt("ckpt")
    (tmp_path / "it").mkdir()
    (source / "release").rename(tmp_path / "it" / "x")
    (source / megatron.LATEST_FILE).write_text("../it/x\n")
    result = cpmgen_cli("reshard", source, "--mp", 2, "-o", tmp_path / "out")
    one_line_error(result, f"{source / megatron.LATEST_FILE}: '../it/x' is not a plain folder name (no '/', no "
                           "'..'); fix the file to name the iteration folder")
    assert not (tmp_path / "out").exists()


def test_leftovers_of_a_killed_reshard_are_removed_by_the_next(cpmgen_cli, write_ckpt, tmp_path):
    source = write_ckpt("ckpt")
    stale = tmp_path / ".out.k1ll3d.partial"
    (stale / "release").mkdir(parents=True)
    (stale / "release" / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 2_000_000)
    result = cpmgen_cli("reshard", source, "--mp", 2, "-o", tmp_path / "out")
    assert result.code == 0, result.stderr
    assert "warning: removed .out.k1ll3d.partial (2 MB), left by an interrupted run" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


@pytest.mark.slow
def test_sigterm_during_reshard_leaves_nothing_and_the_next_run_works(write_ckpt, tmp_path, cpmgen_env):
    # large enough that the reshard is still writing when the signal comes
    source = write_ckpt("ckpt", args=dataclasses.replace(TINY, num_layers=8, hidden_size=512, vocab_size=8000,
                                                         max_positions=512))
    target = tmp_path / "out"
    command = [sys.executable, "-m", "cpmgen", "reshard", str(source), "--mp", "2", "-o", str(target)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.*.partial")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err
    if proc.returncode != 0:  # stopped in time (on a fast machine it may have finished first)
        assert proc.returncode == 128 + signal.SIGTERM, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_dangling_symlink_output_is_refused_up_front(cpmgen_cli, write_ckpt, tmp_path):
    source = write_ckpt("ckpt")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    result = cpmgen_cli("reshard", source, "--mp", 2, "-o", link)
    one_line_error(result, f"{link}: is a symbolic link; give the folder it should be, or another --output")
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_no_space_is_refused_before_the_work(cpmgen_cli, write_ckpt, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    source = write_ckpt("ckpt")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    result = cpmgen_cli("reshard", source, "--mp", 2, "-o", tmp_path / "out")
    one_line_error(result, contains=f"{tmp_path / 'out'}: needs about ")
    assert "free some space or choose another --output" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def _run_limited(command: list, limit: int) -> subprocess.CompletedProcess:
    import resource

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "cpmgen", *map(str, command)], capture_output=True, text=True,
                          preexec_fn=limited, timeout=120)


@pytest.mark.slow
def test_file_size_limit_is_one_line_and_leaves_nothing(write_ckpt, tmp_path, cpmgen_env):
    """`ulimit -f` below a rank file: refused before the work; just above the estimate, the
    write itself fails (EFBIG in torch's writer): one line either way, nothing left."""
    from cpmgen.checkpoint.reader import open_checkpoint

    source = write_ckpt("ckpt")
    per_rank = open_checkpoint(source, strict=False).nbytes() // 2
    proc = _run_limited(["reshard", source, "--mp", 2, "-o", tmp_path / "out"], per_rank // 2)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {tmp_path / 'out'}: a file of about ") and "ulimit -f" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = _run_limited(["reshard", source, "--mp", 2, "-o", tmp_path / "out"], per_rank + 1)
    assert proc.stderr == (f"error: {tmp_path / 'out'}: writing failed (disk full or file size limit, ulimit -f); "
                           "nothing was written\n")
    assert proc.returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_write_that_fails_midway_is_one_line_and_leaves_nothing(cpmgen_cli, write_ckpt, tmp_path, monkeypatch):
    """Disk full while writing (the space check passed, another process took the space)."""
    import errno

    from cpmgen.checkpoint import writer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    source = write_ckpt("ckpt")
    monkeypatch.setattr(writer, "write_megatron", full)
    result = cpmgen_cli("reshard", source, "--mp", 2, "-o", tmp_path / "out")
    one_line_error(result, f"{tmp_path / 'out'}: writing failed: no space left on the device; nothing was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_symlink_loop_as_rank_file(cpmgen_cli, write_ckpt):
    source = write_ckpt("ckpt")
    rank_file = source / "release" / megatron.rank_file_name(0)
    rank_file.unlink()
    rank_file.symlink_to(rank_file)
    result = cpmgen_cli("inspect-ckpt", source)
    one_line_error(result, contains=f"{rank_file}: cannot open the rank file (")


# ----------------------------------------------------------------------------- generation --output


def test_output_is_checked_before_the_work(cpmgen_cli, model_dir, prompt_file, tmp_path):
    existing = tmp_path / "old.txt"
    existing.write_text("keep me")
    (tmp_path / "file").write_text("x")
    cases = [
        (tmp_path / "missing" / "out.txt", f"{tmp_path / 'missing' / 'out.txt'}: folder {tmp_path / 'missing'} "
                                           "does not exist; create it or choose another --output"),
        (tmp_path, f"{tmp_path}: is a folder; --output takes a file name"),
        (tmp_path / "file" / "out.txt", f"{tmp_path / 'file' / 'out.txt'}: {tmp_path / 'file'} is a file, not a "
                                        "folder; choose another --output"),
        (prompt_file, f"{prompt_file}: is the input file; write the text to another --output"),
        (existing, f"{existing}: exists; pass --force to replace it, or choose another --output"),
    ]
    for output, message in cases:
        for force in ([], ["--force"]):
            if output == existing and force:
                continue
            if output == tmp_path / "missing" / "out.txt" and force:
                continue
            result = cpmgen_cli("novel", prompt_file, "-m", model_dir, "-o", output, *force, "--max-new-tokens", 4)
            one_line_error(result, message)
    assert existing.read_text() == "keep me"
    assert prompt_file.read_text(encoding="utf-8") == "春天的风吹过山岗<eod>我们一起唱歌<eod>"
    result = cpmgen_cli("novel", prompt_file, "-m", model_dir, "-o", existing, "--force", "--max-new-tokens", 4,
                        "--seed", 1)
    assert result.code == 0, result.stderr
    assert existing.read_text(encoding="utf-8") == result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "in.txt", "old.txt"]


def test_read_only_output_folder(cpmgen_cli, model_dir, prompt_file, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): permissions are not enforced")
        result = cpmgen_cli("novel", prompt_file, "-m", model_dir, "-o", folder / "out.txt")
        one_line_error(result, f"{folder / 'out.txt'}: cannot write in {folder} (permission denied or read-only); "
                               "choose another --output")
    finally:
        folder.chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_a_signal_keeps_the_text_so_far_at_output(cpmgen_env, model_dir, prompt_file, tmp_path, sig):
    output = tmp_path / "story.txt"
    proc = subprocess.Popen([sys.executable, "-m", "cpmgen", "lyric", str(prompt_file), "-m", str(model_dir),
                             "--max-new-tokens", "0", "--output", str(output), "--seed", "2", "--stride", "16",
                             "--temperature", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = b""
    while len(first) < 300:
        first += os.read(proc.stdout.fileno(), 4096)
    proc.send_signal(sig)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err
    assert output.read_text(encoding="utf-8") == (first + rest).decode("utf-8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "story.txt"]


def test_a_run_that_fails_midway_keeps_the_text_so_far(cpmgen_cli, model_dir, prompt_file, tmp_path, monkeypatch):
    """A failure inside the loop (a dying model-parallel rank raises in the collective): the
    text generated before it is at --output, the error is one line."""
    from cpmgen import runner
    from cpmgen.errors import UserError

    real = runner.generate

    def dies(*args, **kwargs):
        for step, tokens in enumerate(real(*args, **kwargs)):
            if step == 10:
                raise UserError("rank 1 stopped")
            yield tokens

    monkeypatch.setattr(runner, "generate", dies)
    output = tmp_path / "out.txt"
    result = cpmgen_cli("novel", prompt_file, "-m", model_dir, "-o", output, "--greedy")
    one_line_error(result, "rank 1 stopped")
    saved = output.read_text(encoding="utf-8")
    assert saved.startswith("春天的风吹过山") and saved == result.stdout + "\n" and len(saved) > 20
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


def test_a_killed_generation_leaves_a_partial_that_the_next_run_removes(cpmgen_cli, model_dir, prompt_file,
                                                                        tmp_path):
    (tmp_path / ".out.txt.x1y2.partial").write_text("text of a run killed with SIGKILL")
    result = cpmgen_cli("novel", prompt_file, "-m", model_dir, "-o", tmp_path / "out.txt", "--max-new-tokens", 3)
    assert result.code == 0, result.stderr
    assert "warning: removed .out.txt.x1y2.partial (0 KB), left by an interrupted run" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


# ----------------------------------------------------------------------------- silent nonsense, tracebacks


@pytest.mark.parametrize("option, message", [
    (["--temperature", "1e-40"], "--temperature 1e-40: below 0.001 the logits overflow; use --greedy for the most "
                                 "likely token"),
    (["--frequency-penalty", "nan"], "--frequency-penalty nan: must be a finite number"),
    (["--presence-penalty", "-inf"], "--presence-penalty -inf: must be a finite number"),
    (["--presence-penalty", "1e30"], "--presence-penalty 1e+30: must be between -100.0 and 100.0"),
    (["--seed", str(2 ** 70)], f"--seed {2 ** 70}: must be between 0 and 2**64 - 1"),
    (["--set", "model.num_heads=0"], "model.num_heads=0: must be a positive number"),
    (["--set", "model.num_heads=-4"], "model.num_heads=-4: must be a positive number"),
    (["--num-samples", "100000000"], None),
])
def test_degenerate_values_are_refused_up_front(cpmgen_cli, model_dir, prompt_file, option, message):
    result = cpmgen_cli("novel", prompt_file, "-m", model_dir, *option)
    if message is None:
        one_line_error(result, contains="--num-samples 100000000: needs about ")
        assert result.stderr.strip().endswith(" samples")
    else:
        one_line_error(result, message)


def test_nan_weights_stop_generation_and_score_with_the_cause(cpmgen_cli, model_dir_factory, prompt_file):
    state = random_state_dict(TINY, seed=5)
    state["transformer.final_layernorm.weight"][3] = float("nan")
    folder = model_dir_factory("nan", state=state)
    message = ("the model computed NaN or Inf logits; its weights may hold NaN/Inf (run cpmgen inspect-ckpt "
               "--check-values on the model folder), or fp16 overflowed (try --dtype bf16 or fp32)")
    for command in ("novel", "score"):
        one_line_error(cpmgen_cli(command, prompt_file, "-m", folder), message)
    result = cpmgen_cli("inspect-ckpt", folder, "--check-values")
    assert result.code == 1
    assert "tensor transformer.final_layernorm.weight on rank 0 holds NaN or Inf values" in result.stdout


def test_inspect_reports_head_counts_that_cannot_be(cpmgen_cli, write_ckpt):
    source = write_ckpt("ckpt")
    result = cpmgen_cli("inspect-ckpt", source, "--set", "model.num_heads=5")
    assert result.code == 1
    assert "5 attention heads do not divide the hidden size 64" in result.stdout
    rank_file = source / "release" / megatron.rank_file_name(0)
    state = torch.load(rank_file, weights_only=False)
    state["args"] = argparse.Namespace(num_attention_heads=0)
    torch.save(state, rank_file)
    result = cpmgen_cli("inspect-ckpt", source)
    assert result.code == 1
    assert "the stored training args say num_attention_heads=0, not a positive number" in result.stdout


@pytest.mark.slow
def test_ctrl_c_while_starting_exits_130_without_a_traceback(cpmgen_env, model_dir, prompt_file):
    """Ctrl-C at moments before generation (importing, loading): exit 130, no traceback."""
    for delay in (0.3, 0.8, 1.5, 2.5):
        proc = subprocess.Popen([sys.executable, "-m", "cpmgen", "novel", str(prompt_file), "-m", str(model_dir)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        if b"init_import_site" in err or (proc.returncode == -signal.SIGINT and not err):
            continue  # still in the interpreter's own start-up (a busy machine), before any cpmgen code
        assert b"Traceback" not in err, err.decode()
        assert proc.returncode in (0, 130), (delay, proc.returncode, err.decode())


def test_a_ctrl_c_after_the_command_is_done_is_ignored_during_shutdown(tmp_path):
    """Once the command's work is done, Python's shutdown would put back the default Ctrl-C action,
    and a Ctrl-C in that moment killed a finished run by the signal: it is ignored from then on."""
    script = ("import atexit, signal, sys\n"
              "from cpmgen import entry\n"
              "atexit.register(lambda: print('ignored' if signal.getsignal(signal.SIGINT) is signal.SIG_IGN else 'default'))\n"
              "sys.argv = ['cpmgen', '--version']\n"
              "entry.main()\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "ignored"


def test_default_threads_follow_affinity_and_local_ranks(monkeypatch):
    from cpmgen import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert threads.default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's own setting, not the user's
    assert threads.default_threads() == 2
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("LOCAL_SIZE", "4")  # the DeepSpeed launcher's name for it
    assert threads.default_threads() == 1
    monkeypatch.delenv("LOCAL_SIZE")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.default_threads() == 3
    before = torch.get_num_threads()
    try:
        assert threads.apply_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_workers_spin_a_bounded_while_unless_the_user_chose(monkeypatch):
    from cpmgen import threads

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    threads.configure_wait_policy()
    assert os.environ["GOMP_SPINCOUNT"] == "10000" and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    threads.configure_wait_policy()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ


def test_the_thread_count_is_tuned_only_where_cpmgen_chose_it():
    """--threads N, one thread, a GPU and model-parallel ranks decode with the step as it is."""
    from cpmgen.threads import tuned_decode

    def step():
        return 1

    assert tuned_decode(step, 0, 2, "cpu", 1) is not step and tuned_decode(step, 0, 2, "cpu", 1)() == 1
    for requested, threads, device, world in ((2, 2, "cpu", 1), (0, 1, "cpu", 1), (0, 2, "cuda", 1), (0, 2, "cpu", 2)):
        assert tuned_decode(step, requested, threads, device, world) is step


def _rank_pid(rank: int, root: int) -> int | None:
    """The pid of model-parallel rank `rank` among the descendants of `root`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ and f"CPMGEN_TEST_ROOT={root}".encode() in environ:
                return int(entry.name)
        except OSError:
            continue
    return None


@pytest.mark.slow
def test_a_killed_rank_leaves_the_text_so_far_at_output(cpmgen_env, model_dir, prompt_file, tmp_path):
    output = tmp_path / "story.txt"
    env = {**os.environ, "CPMGEN_TEST_ROOT": str(os.getpid())}
    proc = subprocess.Popen([sys.executable, "-m", "cpmgen", "lyric", str(prompt_file), "-m", str(model_dir),
                             "--mp", "2", "--max-new-tokens", "0", "--output", str(output), "--seed", "2",
                             "--stride", "16", "--temperature", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    first = b""
    while len(first) < 300:
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, proc.stderr.read().decode()
        first += chunk
    rank = _rank_pid(1, os.getpid())
    assert rank is not None, "rank 1 is not among the processes"
    os.kill(rank, signal.SIGKILL)
    rest, err = proc.communicate(timeout=90)
    assert proc.returncode != 0, err.decode()
    assert b"Traceback" not in err, err.decode()
    saved = output.read_text(encoding="utf-8")
    # everything that streamed before the kill, at least
    assert saved.encode("utf-8").startswith(first[:300]), (first[:300].decode(errors="replace"), saved, err.decode())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "story.txt"], err.decode()


@pytest.mark.parametrize("swap", ["held", "stop_on_ctrl_c"])
def test_a_signal_while_handlers_are_swapped_in_leaves_none_of_them_behind(swap, monkeypatch):
    """A Ctrl-C (or SIGTERM) can raise while the handlers are being swapped in; whatever was
    swapped in by then is swapped back out, so no later Ctrl-C goes to a handler of a block that
    is over (held's would hold it, stop_on_ctrl_c's would only set a flag nobody reads)."""
    import cpmgen.signals
    from cpmgen.runner import stop_on_ctrl_c

    before = {sig: signal.getsignal(sig) for sig in cpmgen.signals.HELD}
    real = signal.signal
    calls = []

    def interrupted_on_the_second(sig, handler):
        calls.append(sig)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as the Python-level handler of a Ctrl-C arriving right then
        return real(sig, handler)

    monkeypatch.setattr(cpmgen.signals.signal, "signal", interrupted_on_the_second)
    block = cpmgen.signals.held() if swap == "held" else stop_on_ctrl_c()
    with pytest.raises(KeyboardInterrupt):
        with block:
            pytest.fail("the block ran")
    monkeypatch.setattr(cpmgen.signals.signal, "signal", real)
    assert {sig: signal.getsignal(sig) for sig in cpmgen.signals.HELD} == before
