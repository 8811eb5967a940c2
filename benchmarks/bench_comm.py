"""Per-token communication of tensor-parallel decode, measured on gloo over loopback.

One decode step of a model split over N ranks (cpmgen/parallel.py) communicates, per row of
the batch: one all-reduce of `hidden` values after the vocab-parallel embedding, two per
layer (after the row-parallel attention dense and 4h_to_h), and one all-gather of the logits
(vocab / N values from each rank). This replays exactly that sequence, with the shapes of
each CPM-1 size, between N processes on this machine, round by round with the sizes
interleaved, and prints one JSON object: per size the counts, the bytes and the median time
per token, and the median time of one all-reduce and of the all-gather.

    .venv/bin/python benchmarks/bench_comm.py                 # N = 2, fp32, 7 rounds of 200 tokens
    .venv/bin/python benchmarks/bench_comm.py --world 4 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cpmgen.config import ModelArgs

PRESETS = ("cpm-small", "cpm-medium", "cpm-large")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def one_token(args: ModelArgs, world: int, dtype: torch.dtype, times: dict) -> None:
    """The collectives of one decode step for one row, each timed."""
    hidden = torch.randn(1, 1, args.hidden_size).to(dtype)
    logits = torch.randn(1, 1, args.vocab_size // world).to(dtype)
    parts = [torch.empty_like(logits) for _ in range(world)]
    for _ in range(1 + 2 * args.num_layers):
        start = time.perf_counter()
        dist.all_reduce(hidden)
        times["all_reduce"].append(time.perf_counter() - start)
    start = time.perf_counter()
    dist.all_gather(parts, logits)
    times["all_gather"].append(time.perf_counter() - start)


def worker(rank: int, world: int, port: int, dtype_name: str, rounds: int, tokens: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    dtype = DTYPES[dtype_name]
    presets = {name: ModelArgs.from_name(name) for name in PRESETS}
    per_token = {name: [] for name in PRESETS}
    ops = {name: {"all_reduce": [], "all_gather": []} for name in PRESETS}
    for name, args in presets.items():  # warm-up: connections, buffers
        for _ in range(10):
            one_token(args, world, dtype, {"all_reduce": [], "all_gather": []})
    for _ in range(rounds):
        for name, args in presets.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(tokens):
                one_token(args, world, dtype, ops[name])
            per_token[name].append((time.perf_counter() - start) / tokens)
    if rank == 0:
        size = torch.tensor([], dtype=dtype).element_size()
        result = {"world": world, "backend": "gloo", "transport": "loopback", "dtype": dtype_name,
                  "host": socket.gethostname(), "cpus": os.cpu_count(), "rounds": rounds, "tokens_per_round": tokens,
                  "sizes": {}}
        for name, args in presets.items():
            result["sizes"][name] = {
                "all_reduces_per_token": 1 + 2 * args.num_layers,
                "all_reduce_bytes": args.hidden_size * size,
                "all_gather_bytes_per_rank": args.vocab_size // world * size,
                "ms_per_token": round(statistics.median(per_token[name]) * 1e3, 3),
                "us_per_all_reduce": round(statistics.median(ops[name]["all_reduce"]) * 1e6, 1),
                "us_per_all_gather": round(statistics.median(ops[name]["all_gather"]) * 1e6, 1),
            }
        print(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=200)
    a = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(a.world, port, a.dtype, a.rounds, a.tokens), nprocs=a.world)


if __name__ == "__main__":
    main()
