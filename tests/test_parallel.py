"""Model parallel on CPU (gloo, loopback): the same tokens as one process, from any stored mp,
under --mp, torchrun (one machine, or two "machines" as two torchrun processes) and the
DeepSpeed launcher. Tests that start a launcher are marked slow (`make test` runs them)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from cpmgen.checkpoint.megatron import rank_file_name
from cpmgen.checkpoint.reader import needed_ranks, open_checkpoint
from cpmgen.errors import UserError
from cpmgen.synthetic import random_state_dict

from helpers import TINY


@pytest.fixture(scope="module")
def checkpoints(model_dir_factory, tmp_path_factory):
    state = random_state_dict(TINY, seed=11)
    folders = {mp: model_dir_factory(f"mp{mp}", mp=mp, state=state, iteration=100) for mp in (1, 2)}
    prompt = tmp_path_factory.mktemp("mp-prompt") / "prompt.txt"
    prompt.write_text("春天的风吹过山岗<eod>我们一起唱歌<eod>", encoding="utf-8")
    return folders, prompt


def cpmgen(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "cpmgen", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


LYRIC = ["--json", "--stride", "8", "--max-new-tokens", "120"]
SAMPLED = ["--seed", "4", "--num-samples", "2", "--temperature", "1.2"]


_references: dict[tuple, dict] = {}


def in_process(cpmgen_cli, folder, prompt, *extra):
    """The single-process reference run (mp 1), in this process to save a launch; run once per arguments."""
    key = (str(folder), str(prompt), *map(str, extra))
    if key not in _references:
        code, out, err = cpmgen_cli("lyric", prompt, "-m", folder, *LYRIC, *extra)
        assert code == 0, err
        _references[key] = json.loads(out)
    return _references[key]


def launched(folder, prompt, mp, *extra):
    proc = cpmgen("lyric", prompt, "-m", folder, "--mp", mp, *LYRIC, *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("stored_mp", [1, 2])
def test_mp2_samples_the_tokens_of_mp1(cpmgen_cli, checkpoints, stored_mp):
    folders, prompt = checkpoints
    one = in_process(cpmgen_cli, folders[1], prompt, *SAMPLED)
    two = launched(folders[stored_mp], prompt, 2, *SAMPLED)
    assert [s["ids"] for s in two] == [s["ids"] for s in one]
    assert two[0]["stats"]["slides"] >= 3


@pytest.mark.slow
def test_mp2_checkpoint_runs_greedy_at_mp4(cpmgen_cli, checkpoints):
    folders, prompt = checkpoints
    assert launched(folders[2], prompt, 4, "--greedy")["ids"] == in_process(cpmgen_cli, folders[1], prompt, "--greedy")["ids"]


@pytest.mark.slow
def test_joins_a_group_started_by_torchrun(cpmgen_cli, checkpoints):
    folders, prompt = checkpoints
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "cpmgen", "lyric", str(prompt), "-m", str(folders[2]), *LYRIC, "--greedy"],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    # rank 0 alone printed
    assert json.loads(proc.stdout)["ids"] == in_process(cpmgen_cli, folders[1], prompt, "--greedy")["ids"]


@pytest.mark.slow
def test_score_mp2(cpmgen_cli, checkpoints):
    folders, prompt = checkpoints
    two = json.loads(cpmgen("score", prompt, "-m", folders[2], "--mp", 2, "--json").stdout)
    one = json.loads(cpmgen_cli("score", prompt, "-m", folders[2], "--json").stdout)
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


@pytest.mark.slow
def test_a_corrupt_rank_file_is_one_clear_error(cpmgen_env, checkpoints, broken):
    """--mp checks what every rank would trip over before it launches them."""
    folder, rank1 = broken
    proc = cpmgen("novel", checkpoints[1], "-m", folder, "--mp", 2, "--max-new-tokens", 5, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("error: ") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {rank1}: cannot read as a PyTorch checkpoint (truncated or not a .pt file: ")


@pytest.mark.slow
def test_a_failing_rank_ends_every_rank(cpmgen_env, checkpoints, broken):
    """Under torchrun, rank 0 reads only its own (sound) file and waits for rank 1 in a collective;
    rank 1 fails on its file, and torchrun ends rank 0: no hang (a hang fails on the timeout)."""
    folder, rank1 = broken
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--monitor-interval=0.2", "-m", "cpmgen", "novel", str(checkpoints[1]), "-m", str(folder),
                           "--max-new-tokens", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count(f"error: {rank1}: cannot read") == 1  # rank 1's error, once


@pytest.mark.slow
def test_mp_must_divide_the_heads(cpmgen_env, checkpoints):
    folders, prompt = checkpoints
    proc = cpmgen("novel", prompt, "-m", folders[1], "--mp", 3, "--max-new-tokens", 5)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --mp 3 does not divide the 4 attention heads of ")
    assert proc.stderr.strip().endswith("; choose a divisor of 4")


# ----------------------------------------------------------------------------- rank files a rank reads


@pytest.mark.parametrize("stored, world", [(4, 2), (2, 4), (2, 2), (1, 2)])
def test_a_rank_opens_only_the_files_of_its_slices(write_ckpt, stored, world):
    """A rank's tensors read from a folder holding only the files it needs equal those read
    from the whole folder."""
    full = write_ckpt("full", mp=stored, iteration=7)
    for rank in range(world):
        needed = needed_ranks(stored, world, rank)
        assert needed == ([rank // (world // stored)] if world >= stored else
                          list(range(rank * stored // world, (rank + 1) * stored // world)))
        part = shutil.copytree(full, full.parent / f"part{world}-{rank}")
        for other in set(range(stored)) - set(needed):
            (part / "7" / rank_file_name(other)).unlink()
        ckpt = open_checkpoint(part, rank=rank, world=world)
        assert ckpt.files == [part / "7" / rank_file_name(r) for r in needed]
        mine, whole = dict(ckpt.rank_tensors(world, rank)), dict(open_checkpoint(full).rank_tensors(world, rank))
        assert list(mine) == list(whole)
        assert all(torch.equal(mine[name], whole[name]) for name in whole)


def test_a_missing_slice_names_the_file_and_the_machine(write_ckpt):
    folder = write_ckpt("mp2", mp=2, iteration=7)
    (folder / "7" / rank_file_name(1)).unlink()
    with pytest.raises(UserError) as e:
        open_checkpoint(folder, rank=1, world=2)
    assert str(e.value) == (f"{folder / '7'}: rank 1 of this 2-rank run reads mp_rank_01_model_states.pt, which is "
                            f"not on this machine ({socket.gethostname()}); copy it there, or start this machine's "
                            "ranks as the ranks whose files it holds (static rendezvous: torchrun --node-rank)")
    assert open_checkpoint(folder, rank=0, world=2).files == [folder / "7" / rank_file_name(0)]


@pytest.mark.parametrize("args", [["--local_rank=1", "tokenize"], ["tokenize", "--local-rank", "0"],
                                  ["--local-rank=0", "tokenize"]])
def test_the_launchers_local_rank_argument_is_ignored(cpmgen_cli, checkpoints, args):
    """The DeepSpeed launcher passes --local_rank=N before the command; LOCAL_RANK says it too."""
    folders, _ = checkpoints
    plain = cpmgen_cli("tokenize", "春天", "-m", folders[1], "--json")
    code, out, err = cpmgen_cli(*args, "春天", "-m", folders[1], "--json")
    assert (code, err) == (0, "") and out == plain.stdout


# ----------------------------------------------------------------------------- two machines on loopback

GREEDY = ["--greedy", "--presence-penalty", "3"]  # greedy alone repeats one token on random weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def static(port: int, node: int) -> list[str]:
    return ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
            "--node-rank", str(node)]


def c10d(port: int, node: int, addr: str) -> list[str]:
    """--local-addr names the node in the rendezvous, whose ranks follow the sorted names."""
    return ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"127.0.0.1:{port}", "--rdzv-id", "cpmgen-test", "--node-rank", str(node), "--local-addr", addr]


def start_node(cwd, torchrun: list[str], folder, *extra) -> subprocess.Popen:
    """One "machine": a torchrun process in its own folder (the prompt is prompt.txt there, if anywhere)."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *torchrun, "--monitor-interval", "0.2",
                             "-m", "cpmgen", "lyric", "prompt.txt", "-m", str(folder), *LYRIC, *GREEDY, *extra],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def machines(tmp_path, prompt, holds_prompt: int):
    folders = [tmp_path / "machine0", tmp_path / "machine1"]
    for folder in folders:
        folder.mkdir()
    shutil.copy(prompt, folders[holds_prompt] / "prompt.txt")
    return folders


def only_rank_file(folder, tmp_path, rank: int):
    """A copy of an mp-2 folder that holds only rank `rank`'s file (and the vocab, the iteration file)."""
    copy = shutil.copytree(folder, tmp_path / f"only{rank}")
    (copy / "100" / rank_file_name(1 - rank)).unlink()
    return copy


def finish(procs, timeout=240) -> list[tuple[int, str, str]]:
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *output) for p, output in zip(procs, outputs)]


@pytest.mark.slow
def test_two_machines_static_each_holding_only_its_rank_file(cpmgen_cli, cpmgen_env, checkpoints, tmp_path):
    """Machine 0 holds mp_rank_00 and no prompt, machine 1 mp_rank_01 and the prompt: rank 1
    reads only its file and the prompt, rank 0 alone prints the single-process tokens."""
    folders, prompt = checkpoints
    expected = in_process(cpmgen_cli, folders[1], prompt, *GREEDY)
    cwd, port = machines(tmp_path, prompt, holds_prompt=1), free_port()
    procs = [start_node(cwd[node], static(port, node), only_rank_file(folders[2], tmp_path, node)) for node in (0, 1)]
    (code0, out0, err0), (code1, out1, err1) = finish(procs)
    assert (code0, code1) == (0, 0), err0 + err1
    assert out1 == "" and json.loads(out0)["ids"] == expected["ids"]
    assert expected["stats"]["slides"] >= 3


@pytest.mark.slow
def test_two_machines_c10d_where_node_rank_1_becomes_rank_0(cpmgen_cli, cpmgen_env, checkpoints, tmp_path):
    """With c10d the machine started as --node-rank 1 becomes rank 0 here (its name sorts
    first); the prompt is only on the other machine, and the output comes out once, on rank 0's."""
    folders, prompt = checkpoints
    expected = in_process(cpmgen_cli, folders[1], prompt, *GREEDY)
    cwd, port = machines(tmp_path, prompt, holds_prompt=0), free_port()
    procs = [start_node(cwd[0], c10d(port, 0, "127.0.0.2"), folders[2]),
             start_node(cwd[1], c10d(port, 1, "127.0.0.1"), folders[2])]
    (code0, out0, err0), (code1, out1, err1) = finish(procs)
    assert (code0, code1) == (0, 0), err0 + err1
    assert out0 == "" and json.loads(out1)["ids"] == expected["ids"]


def plain_ranks(cwds, folder, port: int, *extra) -> list[subprocess.Popen]:
    """Two ranks started by nothing but RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT."""
    return [subprocess.Popen([sys.executable, "-m", "cpmgen", "lyric", "prompt.txt", "-m", str(folder), *LYRIC,
                              *GREEDY, *extra], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": str(port)})
            for rank, cwd in enumerate(cwds)]


@pytest.mark.slow
def test_ranks_from_a_plain_environment(cpmgen_cli, cpmgen_env, checkpoints, tmp_path):
    """The prompt only where rank 1 runs: rank 0 prints the single-process tokens."""
    folders, prompt = checkpoints
    expected = in_process(cpmgen_cli, folders[1], prompt, *GREEDY)
    (code0, out0, err0), (code1, out1, err1) = finish(plain_ranks(machines(tmp_path, prompt, holds_prompt=1),
                                                                  folders[2], free_port()))
    assert (code0, code1) == (0, 0), err0 + err1
    assert out1 == "" and json.loads(out0)["ids"] == expected["ids"]


@pytest.mark.slow
def test_copies_of_the_input_must_agree(cpmgen_env, checkpoints, tmp_path):
    folders, prompt = checkpoints
    cwd = machines(tmp_path, prompt, holds_prompt=0)
    (cwd[1] / "prompt.txt").write_text("另一首歌<eod>", encoding="utf-8")
    host = socket.gethostname()
    for code, out, err in finish(plain_ranks(cwd, folders[2], free_port())):
        assert (code, out) == (2, "")
        assert [line for line in err.splitlines() if line.startswith("error: ")] == [
            f"error: the input on {host} (rank 1) differs from the one on {host} (rank 0); "
            "give every machine the same input, or keep it on one only"]


_WAITING_RANKS = """
import os, sys, time
from datetime import timedelta
import torch.distributed as dist
from cpmgen import parallel

dist.init_process_group("gloo", timeout=timedelta(seconds=2))  # the model's collectives: 2 s
parallel.init("cpu")
rank = int(os.environ["RANK"])

def typed():  # a user who pauses for longer than the process-group timeout at each prompt
    for text in ("first", "second"):
        time.sleep(4)
        yield text

print(list(parallel.shared_items(typed() if rank == 0 else None)))
sys.stdout.flush()
if rank == 1:
    box = [None]
    dist.broadcast_object_list(box, src=0)  # rank 0 is sleeping: the default group times out
else:
    time.sleep(6)
"""


@pytest.mark.slow
def test_ranks_wait_for_the_next_prompt_beyond_the_group_timeout(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _WAITING_RANKS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "RANK": str(rank), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for port in [free_port()] for rank in (0, 1)]
    (code0, out0, err0), (code1, out1, err1) = finish(procs, timeout=120)
    assert code0 == 0, err0
    assert out0 == out1 == "['first', 'second']\n"
    assert code1 != 0 and "timed out" in err1.lower()  # the same pause on the default group ends it


@pytest.mark.slow
def test_a_failing_machine_ends_the_other(cpmgen_env, checkpoints, tmp_path):
    """Machine 1 lacks its rank file and fails with the error that says so; machine 0, waiting
    on it, ends within 30 s saying only that it lost its peer."""
    folders, prompt = checkpoints
    cwd, port = machines(tmp_path, prompt, holds_prompt=0), free_port()
    procs = [start_node(cwd[0], static(port, 0), folders[2]),
             start_node(cwd[1], static(port, 1), only_rank_file(folders[2], tmp_path, 0))]
    code1, _, err1 = finish(procs[1:])[0]
    code0, _, err0 = finish(procs[:1], timeout=30)[0]
    assert code1 != 0 and code0 != 0
    assert [line for line in err1.splitlines() if line.startswith("error: ")] == [
        f"error: {tmp_path / 'only0' / '100'}: rank 1 of this 2-rank run reads mp_rank_01_model_states.pt, which is "
        f"not on this machine ({socket.gethostname()}); copy it there, or start this machine's ranks as the ranks "
        "whose files it holds (static rendezvous: torchrun --node-rank)"]
    assert [line for line in err0.splitlines() if line.startswith("error: ")] == [
        "error: rank 0: lost the connection to another rank, which failed or was stopped: its own error says why"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="the deepspeed extra is not installed (pip install -e '.[deepspeed]'; make install does)")
def test_the_deepspeed_launcher_gives_the_single_process_tokens(cpmgen_cli, cpmgen_env, checkpoints):
    """deepspeed --num_gpus 2 --module cpmgen ...: each rank gets --local_rank=N before the command."""
    folders, prompt = checkpoints
    expected = in_process(cpmgen_cli, folders[1], prompt, *GREEDY)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                           str(free_port()), "--module", "cpmgen", "lyric", str(prompt), "-m", str(folders[2]),
                           *LYRIC, *GREEDY], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed = [line for line in proc.stdout.splitlines() if line.startswith("{")]  # the launcher logs to stdout too
    assert len(printed) == 1 and json.loads(printed[0])["ids"] == expected["ids"]



def _on_a_terminal(argv: list[str], cwd, keys: list[bytes], timeout: float = 180) -> tuple[int, str]:
    """Run `python ARGV` on a pseudo-terminal, typing keys[i] at its (i + 1)-th prompt; its exit code and output."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(cwd)
        # A shell starts commands with Ctrl-C at its default; a forked copy of this test process
        # would inherit whatever an earlier test left (an ignored SIGINT survives exec).
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, *argv])
    output, deadline = b"", time.monotonic() + timeout

    def read_until(prompts: int) -> None:  # prompts: how many prompts to wait for; 0: the end
        nonlocal output
        while time.monotonic() < deadline and (not prompts or output.count(b">>> ") < prompts):
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:  # the terminal closed: the command ended
                    return
                if not chunk:
                    return
                output += chunk

    try:
        for i, key in enumerate(keys):
            read_until(i + 1)
            os.write(fd, key)
        read_until(0)
    finally:
        if time.monotonic() >= deadline:
            os.kill(pid, 9)
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), output.decode("utf-8", "replace")


@pytest.mark.slow
@pytest.mark.parametrize("end, code", [(b"stop\r", 0), (b"\x03", 130)])
def test_the_interactive_loop_under_mp_ends_every_rank(cpmgen_env, checkpoints, end, code):
    """A prompt generates; then "stop" or Ctrl-C at the next prompt ends the launcher, torchrun and both ranks."""
    folders, prompt = checkpoints
    exit_code, output = _on_a_terminal(["-m", "cpmgen", "lyric", "-m", str(folders[2]), "--mp", "2",
                                         "--max-new-tokens", "8", *GREEDY], prompt.parent, [b"\xe6\x98\xa5<eod>\r", end])
    assert exit_code == code, output
    assert "done: 8 new" in output  # the closing status line (wrapped at the terminal width)
    assert "Traceback" not in output and "error" not in output
