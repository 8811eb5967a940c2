"""Reshard benchmark: peak memory and time of `cpmgen reshard` on a CPM-Medium-sized checkpoint.

The requirement: a reshard peaks below 1.3x the checkpoint's size (the peak resident set of the
whole `cpmgen reshard` process, torch's own ~220 MB included). Random weights in fp16, as the
releases are stored, written once with cpmgen.synthetic.write_megatron_checkpoint at model-parallel
sizes 1 and 2 (the same weights) into $CPMGEN_BENCH_CACHE, else $XDG_CACHE_HOME/cpmgen-bench,
else ~/.cache/cpmgen-bench, and reused.

Each reshard runs as its own `python -m cpmgen reshard` process; its peak RSS is the ru_maxrss
that wait4 reports for that process alone. A child that only imports torch and cpmgen.cli gives the
baseline. `python -m cpmgen` finds the cpmgen package of the current folder first: run this from
the repository root to measure the working tree. One JSON object on stdout, a table on stderr:

    .venv/bin/python benchmarks/bench_reshard.py                       # 1->2, 2->1, 1->4 (under a minute)
    .venv/bin/python benchmarks/bench_reshard.py --runs 2:1 --preset cpm-small --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cpmgen.config import PRESETS
from cpmgen.synthetic import random_state_dict, write_megatron_checkpoint
from peak_memory import peak_rss_of_command
from workload import cache_dir

LIMIT = 1.3  # peak RSS over checkpoint size, the requirement
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpm-medium", choices=list(PRESETS))
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    parser.add_argument("--runs", default="1:2,2:1,1:4",
                        help="comma-separated SOURCE:TARGET model-parallel sizes (sources 1 and 2 are written)")
    args = parser.parse_args(argv)
    args.runs = [tuple(int(n) for n in run.split(":")) for run in args.runs.split(",") if run.strip()]
    return args


def ensure_checkpoints(preset: str, dtype: str, sizes: set[int]) -> dict[int, Path]:
    """The random checkpoint at each model-parallel size, written once (to a temporary folder, then renamed)."""
    folders = {mp: cache_dir() / f"{preset}-{dtype}-seed0-mp{mp}" for mp in sorted(sizes)}
    missing = [mp for mp, folder in folders.items() if not (folder / "latest_checkpointed_iteration.txt").is_file()]
    if missing:
        console.print(f"writing a random {preset} {dtype} checkpoint at mp {', '.join(map(str, missing))} ...")
        state = random_state_dict(PRESETS[preset], seed=0, dtype=DTYPES[dtype])
        for mp in missing:
            partial = folders[mp].with_name(folders[mp].name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            write_megatron_checkpoint(partial, PRESETS[preset], mp, seed=0, dtype=DTYPES[dtype], state=state)
            partial.rename(folders[mp])
    return folders


def rank_files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("mp_rank_*_model_states.pt"))


def print_table(result: dict) -> None:
    table = Table(title=f"cpmgen reshard, {result['preset']} {result['dtype']}: peak RSS of the process")
    for column in ("reshard", "checkpoint MB", "peak RSS MB", "peak / checkpoint", "seconds"):
        table.add_column(column, justify="left" if column == "reshard" else "right")
    table.add_row("baseline: import torch, cpmgen.cli", "-", f"{result['baseline_rss_bytes'] / 1e6:.0f}", "-", "-")
    for run in result["runs"]:
        ratio = f"{run['ratio']:.2f}" + ("" if run["ratio"] < LIMIT else f" (over {LIMIT})")
        table.add_row(f"mp {run['source_mp']} -> {run['mp']}", f"{run['checkpoint_bytes'] / 1e6:.0f}",
                      f"{run['peak_rss_bytes'] / 1e6:.0f}", ratio, f"{run['seconds']:.1f}")
    console.print(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    folders = ensure_checkpoints(args.preset, args.dtype, {source for source, _ in args.runs})
    result = {"benchmark": "cpmgen reshard", "preset": args.preset, "dtype": args.dtype, "limit_ratio": LIMIT,
              "env": {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                      "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
              "checkpoints": {f"mp{mp}": str(folder) for mp, folder in folders.items()}, "runs": []}
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="reshard-") as tmp:
        log = Path(tmp) / "stderr.txt"
        result["baseline_rss_bytes"], _ = peak_rss_of_command([sys.executable, "-c", "import torch, cpmgen.cli"], log)
        for source, mp in args.runs:
            out = Path(tmp) / f"mp{source}-to-mp{mp}"
            console.print(f"cpmgen reshard {folders[source]} --mp {mp} ...")
            peak, seconds = peak_rss_of_command([sys.executable, "-m", "cpmgen", "reshard", str(folders[source]), "--mp", str(mp),
                                       "--output", str(out)], log)
            size = rank_files_bytes(folders[source])
            result["runs"].append({"source_mp": source, "mp": mp, "checkpoint_bytes": size,
                                   "output_bytes": rank_files_bytes(out), "peak_rss_bytes": peak,
                                   "ratio": round(peak / size, 3), "seconds": round(seconds, 2)})
            shutil.rmtree(out)
    result["env"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print_table(result)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
