"""Tensor parallelism as Megatron splits CPM-1, applied to a model from outside.

`apply_tensor_parallel(model, rank, world)` rewrites a (meta-device) CPMModel so that each
rank holds exactly its Megatron shard: column-parallel QKV and h_to_4h (their outputs stay
split, so attention heads and the GELU run locally), row-parallel attention dense and
4h_to_h (partial products all-reduced, then the bias added once), a vocab-parallel word
embedding (each rank looks up its vocab range, the sum is all-reduced) and gathered logits.
The KV cache follows the local head count, so it is sharded by heads. The model code itself
knows nothing of this.

`launch` and `init` connect a command to a launcher: the command relaunches itself through
torch.distributed.run with N local ranks, or joins the group that torchrun, the DeepSpeed
launcher or a plain RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT environment started, on one
machine or several. Prompts reach every rank from whichever rank has them (`agreed_text`,
`shared_items`), on a group of their own that waits for a human without a time limit.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from cpmgen.checkpoint.splits import check_split
from cpmgen.errors import UserError
from cpmgen.model import CPMModel
from cpmgen.signals import handlers_replaced


class RowParallelLinear(nn.Module):
    """y = all_reduce(x_r @ W_r^T) + b: each rank holds the input columns of its shard."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        dist.all_reduce(out)
        return out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [start, start + rows); other ids look up zeros; the sum is all-reduced."""

    def __init__(self, rows: int, dim: int, start: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
        self.start = start

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        dist.all_reduce(out)
        return out


class GatheredOutput(nn.Module):
    """The output layer over a vocab-parallel table: each rank's `local` layer gives the logits
    of its vocab slice; every rank gets all of them, in rank order."""

    def __init__(self, local: nn.Module):
        super().__init__()
        self.local = local

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        local = self.local(x, table).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local)
        return torch.cat(parts, dim=-1)


def apply_tensor_parallel(model: CPMModel, rank: int, world: int) -> CPMModel:
    """Give every split layer its rank-local shape (Megatron's split of the reference); load the
    rank's tensors afterwards with load_state_dict(assign=True)."""
    args = model.args
    check_split(args, world)
    hidden, device = args.hidden_size, model.word_embeddings.weight.device
    with torch.device(device):
        for block in model.transformer.layers:
            attention, mlp = block.attention, block.mlp
            attention.num_heads = args.num_heads // world
            attention.query_key_value = nn.Linear(hidden, 3 * hidden // world)
            attention.dense = RowParallelLinear(hidden // world, hidden)
            mlp.dense_h_to_4h = nn.Linear(hidden, args.ffn_size // world)
            mlp.dense_4h_to_h = RowParallelLinear(args.ffn_size // world, hidden)
        rows = args.vocab_size // world
        model.word_embeddings = VocabParallelEmbedding(rows, hidden, rank * rows)
    model.lm_head = GatheredOutput(model.lm_head)
    return model


# ----------------------------------------------------------------------------- launchers


def launched() -> bool:
    """True in a process that torchrun, the DeepSpeed launcher or the user's environment made a rank."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def world_size(requested: Optional[int]) -> int:
    """The model-parallel size: --mp / runtime.mp, or the launcher's WORLD_SIZE when one started us."""
    if launched():
        world = int(os.environ["WORLD_SIZE"])
        if requested not in (None, world):
            raise UserError(f"--mp {requested}: the launcher started {world} processes; pass --mp {world} or drop --mp")
        return world
    return requested or 1


# How long ranks wait for the next prompt of the interactive loop: for a human, no practical
# limit. A rank that dies still ends the wait at once (its connections close).
PROMPT_WAIT = timedelta(days=365)

_prompts: Optional[dist.ProcessGroup] = None  # gloo, PROMPT_WAIT timeout: prompts travel here


def init(device_type: str) -> tuple[int, int]:
    """Join the launcher's process group: NCCL with one GPU per rank on CUDA, gloo on CPU, and
    a gloo group for the prompts whose timeout is PROMPT_WAIT."""
    global _prompts
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    unset = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if unset:
        raise UserError(f"RANK and WORLD_SIZE are set but {' and '.join(unset)} not: set them to rank 0's "
                        "address and a free port, or start cpmgen through torchrun or deepspeed")
    if not dist.is_initialized():
        if device_type == "cuda":  # without LOCAL_RANK, ranks fill each machine's GPUs in order
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    _prompts = dist.new_group(backend="gloo", timeout=PROMPT_WAIT)
    return rank, world


def shutdown(code: int) -> None:
    """End a rank. After success (or a Ctrl-C, where all ranks stop at the same step) the ranks
    leave the group together; after a failure the others may be stuck in a collective, so this
    rank leaves at once and torchrun stops the rest. Either way the process ends with os._exit
    once its output is flushed: gloo's threads can abort ("terminate called without an active
    exception") in the interpreter's teardown, which would turn a finished run into a failure."""
    if dist.is_initialized() and code in (0, 130):
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# How gloo reports a rank whose process ended (its sockets closed) while this one waited on it.
_LOST = ("Connection closed by peer", "Connection reset by peer")
LOST_MESSAGE = "lost the connection to another rank, which failed or was stopped: its own error says why"


def failure_line(error: Exception) -> str:
    """A rank's crash as one `error:` line: a lost peer says so (the failing rank shows the
    cause), anything else by its type and the first line of its message."""
    rank = os.environ["RANK"]
    if isinstance(error, dist.DistNetworkError) or any(s in str(error) for s in _LOST):
        return f"error: rank {rank}: {LOST_MESSAGE}\n"
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"error: rank {rank}: {type(error).__name__}: {reason}\n"


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (Ctrl-C lands on the ranks at different steps)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def raise_together(problem: Optional[str]) -> None:
    """Raise UserError(problem) on every rank when any rank has one (the lowest rank's), so that
    all ranks stop with the same one-line error instead of some waiting for the rest."""
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem, group=_prompts)
    first = next((p for p in problems if p is not None), None)
    if first is not None:
        raise UserError(first)


def agreed_text(read: Callable[[], Optional[str]], missing: Optional[str] = None) -> Optional[str]:
    """The one text every rank runs on, from whichever ranks have it.

    Each rank calls read(): its copy, or None where its machine has none; a UserError it
    raises (a file that is not UTF-8) ends every rank with that error. Copies found on several
    machines must be equal (their digests are compared; the lowest rank holding one sends it).
    When no rank has a copy: UserError(missing + the machines), or None without `missing`."""
    try:
        mine, problem = read(), None
    except UserError as e:
        mine, problem = None, str(e)
    digest = hashlib.sha256(mine.encode("utf-8")).hexdigest() if mine is not None else None
    copies = [None] * dist.get_world_size()
    dist.all_gather_object(copies, (socket.gethostname(), digest, problem), group=_prompts)
    problem = next((p for _, _, p in copies if p is not None), None)
    if problem is not None:
        raise UserError(problem)
    found = [(rank, host, digest) for rank, (host, digest, _) in enumerate(copies) if digest is not None]
    for rank, host, digest in found[1:]:
        if digest != found[0][2]:
            raise UserError(f"the input on {host} (rank {rank}) differs from the one on {found[0][1]} "
                            f"(rank {found[0][0]}); give every machine the same input, or keep it on one only")
    if not found:
        if missing is None:
            return None
        hosts: dict[str, list[int]] = {}
        for rank, (host, _, _) in enumerate(copies):
            hosts.setdefault(host, []).append(rank)
        where = "; ".join(f"{host}: rank{'s' if len(r) > 1 else ''} {', '.join(map(str, r))}" for host, r in hosts.items())
        raise UserError(f"{missing} on any machine of the run ({where}); copy it to one of them")
    box = [mine]
    dist.broadcast_object_list(box, src=found[0][0], group=_prompts)
    return box[0]


def shared_items(items):
    """Rank 0's items (the prompts typed at its terminal), received by every rank as they come.

    The other ranks wait on the prompt group (no practical time limit) and ignore Ctrl-C while
    they wait: rank 0's terminal decides, and "stop", Ctrl-D or Ctrl-C there ends every rank."""
    source = iter(items) if items is not None else None
    while True:
        box = [None]
        if source is not None:
            box[0] = next(source, None)
            dist.broadcast_object_list(box, src=0, group=_prompts)
        else:
            with handlers_replaced((signal.SIGINT,), signal.SIG_IGN):
                dist.broadcast_object_list(box, src=0, group=_prompts)
        if box[0] is None:
            return
        yield box[0]


# torchrun's own log lines, its note that it set OMP_NUM_THREADS=1 for the ranks
# and its failure report: the ranks' one-line errors say it better.
_NOISE = re.compile(rb"^([WEI]\d{4} \d\d:\d\d:\d\d|\*{5,}|\s*$|Setting OMP_NUM_THREADS environment variable)")


def launch(mp: int, argv: list[str], debug: bool) -> int:
    """Run `python -m cpmgen ARGV` as `mp` local ranks through torchrun; return the exit code.

    Rank 0's stdout is the terminal's. The ranks' stderr passes through as it comes, without
    torchrun's log lines and the traceback it prints when a rank fails; a rank's one-line
    error is shown once even when every rank reports it, and a rank that lost its connection
    to the failing one says so only when no rank said why."""
    env = dict(os.environ)  # threads per rank: set by each rank from LOCAL_WORLD_SIZE, not here
    if sys.stderr.isatty():
        env["CPMGEN_STDERR_TTY"] = "1"  # the ranks' stderr is a pipe to here, but ends on a terminal
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={mp}",
               "--monitor-interval=0.2", "-m", "cpmgen", *argv]
    if debug:
        return subprocess.call(command, env=env)
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    relay, interrupted = _StderrRelay(), False
    while True:
        try:
            chunk = os.read(proc.stderr.fileno(), 65536)
        except KeyboardInterrupt:  # the ranks got the same Ctrl-C: they stop after the current token
            interrupted = True
            continue
        if not chunk:
            break
        relay.feed(chunk)
    code = proc.wait()
    relay.close()
    if interrupted:
        return 130
    if code and not relay.errors and relay.lost:
        sys.stderr.buffer.write(relay.lost)
        relay.errors.add(relay.lost)
    if code and not relay.errors:
        sys.stderr.write(f"error: a model-parallel rank failed (exit {code}); rerun with --debug to see its output\n")
    return 2 if code and relay.errors else code


class _StderrRelay:
    def __init__(self):
        self.pending = b""
        self.errors: set[bytes] = set()
        self.lost = b""  # the first "lost the connection" line, held back
        self.failed = False  # after a traceback only the ranks' error lines are worth showing

    def feed(self, chunk: bytes) -> None:
        self.pending += chunk
        *lines, self.pending = self.pending.split(b"\n")
        for line in lines:
            self._line(line + b"\n")
        if self.pending and not self.failed and not _NOISE.match(self.pending) and b"error: " not in self.pending:
            sys.stderr.buffer.write(self.pending)  # a prompt or progress bar without a newline yet
            sys.stderr.flush()
            self.pending = b""

    def _line(self, line: bytes) -> None:
        if line.startswith(b"error: ") and LOST_MESSAGE.encode() in line:
            self.lost = self.lost or line
        elif line.startswith(b"error: "):
            if line not in self.errors:
                self.errors.add(line)
                sys.stderr.buffer.write(line)
        elif line.startswith(b"Traceback"):
            self.failed = True
        elif not self.failed and not _NOISE.match(line):
            sys.stderr.buffer.write(line)
        sys.stderr.flush()

    def close(self) -> None:
        if self.pending:
            self._line(self.pending)
