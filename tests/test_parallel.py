"""Model parallel through torchrun on CPU (gloo): the same tokens as one process, from any stored mp."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cpmgen.config import ModelArgs
from cpmgen.synthetic import random_state_dict

# Every split dimension divisible by 4: heads 8, hidden 64, vocab 800.
ARGS = ModelArgs(num_layers=2, hidden_size=64, num_heads=8, vocab_size=800, max_positions=48)
HEADS = ["--set", "model.num_heads=8"]


@pytest.fixture(scope="module")
def checkpoints(model_dir_factory, tmp_path_factory):
    state = random_state_dict(ARGS, seed=11)
    folders = {mp: model_dir_factory(f"mp{mp}", ARGS, mp=mp, state=state, iteration=100) for mp in (1, 2)}
    prompt = tmp_path_factory.mktemp("mp-prompt") / "prompt.txt"
    prompt.write_text("春天的风吹过山岗<eod>我们一起唱歌<eod>", encoding="utf-8")
    return folders, prompt


def cpmgen(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "cpmgen", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


LYRIC = ["--json", "--stride", "8", "--max-new-tokens", "120"]
SAMPLED = ["--seed", "4", "--num-samples", "2", "--temperature", "1.2"]


def in_process(cpmgen_cli, folder, prompt, *extra):
    """The single-process reference run (mp 1), in this process to save a launch."""
    code, out, err = cpmgen_cli("lyric", prompt, "-m", folder, *HEADS, *LYRIC, *extra)
    assert code == 0, err
    return json.loads(out)


def launched(folder, prompt, mp, *extra):
    proc = cpmgen("lyric", prompt, "-m", folder, *HEADS, "--mp", mp, *LYRIC, *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("stored_mp", [1, 2])
def test_mp2_samples_the_tokens_of_mp1(cpmgen_cli, checkpoints, stored_mp):
    folders, prompt = checkpoints
    one = in_process(cpmgen_cli, folders[1], prompt, *SAMPLED)
    two = launched(folders[stored_mp], prompt, 2, *SAMPLED)
    assert [s["ids"] for s in two] == [s["ids"] for s in one]
    assert two[0]["stats"]["slides"] >= 3


def test_mp2_checkpoint_runs_greedy_at_mp4(cpmgen_cli, checkpoints):
    folders, prompt = checkpoints
    assert launched(folders[2], prompt, 4, "--greedy")["ids"] == in_process(cpmgen_cli, folders[1], prompt, "--greedy")["ids"]


def test_joins_a_group_started_by_torchrun(cpmgen_cli, checkpoints):
    folders, prompt = checkpoints
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "cpmgen", "lyric", str(prompt), "-m", str(folders[2]), *HEADS, *LYRIC, "--greedy"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    # rank 0 alone printed
    assert json.loads(proc.stdout)["ids"] == in_process(cpmgen_cli, folders[1], prompt, "--greedy")["ids"]


def test_score_mp2(cpmgen_cli, checkpoints):
    folders, prompt = checkpoints
    two = json.loads(cpmgen("score", prompt, "-m", folders[2], *HEADS, "--mp", 2, "--json").stdout)
    one = json.loads(cpmgen_cli("score", prompt, "-m", folders[2], *HEADS, "--json").stdout)
    assert one["ids"] == two["ids"]
    assert two["nll"] == pytest.approx(one["nll"], abs=1e-4)


@pytest.fixture
def broken(checkpoints, tmp_path):
    import shutil

    folders, _ = checkpoints
    folder = shutil.copytree(folders[2], tmp_path / "broken")
    rank1 = folder / "100" / "mp_rank_01_model_states.pt"
    rank1.write_bytes(rank1.read_bytes()[:2000])
    return folder, rank1


def test_a_corrupt_rank_file_is_one_clear_error(cpmgen_env, checkpoints, broken):
    """--mp checks what every rank would trip over before it launches them."""
    folder, rank1 = broken
    proc = cpmgen("novel", checkpoints[1], "-m", folder, *HEADS, "--mp", 2, "--max-new-tokens", 5, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("error: ") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {rank1}: cannot read as a PyTorch checkpoint (truncated or not a .pt file: ")


def test_a_failing_rank_ends_every_rank(cpmgen_env, checkpoints, broken):
    """Under torchrun, rank 0 reads only its own (sound) file and waits for rank 1 in a collective;
    rank 1 fails on its file, and torchrun ends rank 0: no hang (a hang fails on the timeout)."""
    folder, rank1 = broken
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--monitor-interval=0.2", "-m", "cpmgen", "novel", str(checkpoints[1]), "-m", str(folder),
                           *HEADS, "--max-new-tokens", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: {rank1}: cannot read") == 1  # rank 1's error, once


def test_mp_must_divide_the_heads(cpmgen_env, checkpoints):
    folders, prompt = checkpoints
    proc = cpmgen("novel", prompt, "-m", folders[1], *HEADS, "--mp", 3, "--max-new-tokens", 5)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --mp 3 does not divide the model's 8 attention heads; choose a divisor"
