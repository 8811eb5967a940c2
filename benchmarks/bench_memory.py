"""Memory benchmark: peak RSS of loading and generating with CPM-Large's shape, quantized.

CPM-Large (32 layers, hidden 2560, 32 heads, vocab 30000, 1024 positions) is the model whose
weights decide whether a machine can run it at all; quantized, it has to fit in little more
than its int8 or int4 weights. Random weights of that shape are written once into the bench
cache (fp16, as the releases are stored; workload.cache_dir) and kept. Each case runs in a
fresh process (peak_memory.py), so its peak (VmHWM) is its own:

- the checkpoint loaded with `--quantize int8` and `int4` (quantized while loading), then
  --new-tokens tokens generated greedily after a 32-token prompt: load seconds, peak, the
  weights the model holds, its KV cache, and the peak against weights + KV cache + --slack-mb;
- `cpmgen quantize CKPT --to int8|int4 --output OUT` (its own peak RSS and seconds), then OUT
  loaded and generating the same way: a quantized folder should load in seconds, peaking near
  its own size. The folders are deleted afterwards.

Memory figures do not depend on the machine's load; the seconds do. One JSON object on stdout,
a table on stderr:

    .venv/bin/python benchmarks/bench_memory.py                        # CPM-Large, int8 and int4
    .venv/bin/python benchmarks/bench_memory.py --preset cpm-small --no-folders   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from cpmgen.config import PRESETS
from peak_memory import peak_rss_of_command, peak_rss_of_generation
from workload import cache_dir, ensure_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
MB = 1e6
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpm-large", choices=list(PRESETS))
    parser.add_argument("--quantize", default="int8,int4", help="comma-separated: int8, int4, none (default int8,int4)")
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES),
                        help="the random checkpoint's dtype (default fp16, as the releases are stored)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per case (default 32)")
    parser.add_argument("--slack-mb", type=float, default=400,
                        help="what a case may hold beyond its weights and KV cache (default 400)")
    parser.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=True,
                        help="load the checkpoint with --quantize (default on)")
    parser.add_argument("--folders", action=argparse.BooleanOptionalAction, default=True,
                        help="also time `cpmgen quantize` and the loading of its folders (default on)")
    args = parser.parse_args(argv)
    args.quantize = [q.strip() for q in args.quantize.split(",") if q.strip()]
    unknown = set(args.quantize) - {"int8", "int4", "none"}
    if unknown:
        parser.error(f"--quantize: unknown {', '.join(sorted(unknown))}")
    return args


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def check_disk(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    if free < needed:
        raise SystemExit(f"{folder}: {free / 1e9:.1f} GB free, this needs about {needed / 1e9:.1f} GB")


def with_limit(row: dict, slack_mb: float) -> dict:
    limit = row["weights_mb"] + row["kv_mb"] + slack_mb
    return {**row, "limit_mb": round(limit, 1), "within_limit": row["peak_mb"] <= limit}


def quantized_folder_case(source: Path, preset: str, to: str, new_tokens: int, slack_mb: float) -> dict:
    """`cpmgen quantize` into the cache (its peak and seconds), then a fresh process loading
    the folder and generating; the folder is removed afterwards."""
    out = cache_dir() / f"{source.name}-{to}.tmp"
    shutil.rmtree(out, ignore_errors=True)
    log = cache_dir() / f"{out.name}.log"
    try:
        peak, seconds = peak_rss_of_command(
            [sys.executable, "-m", "cpmgen", "quantize", str(source), "--to", to, "--output", str(out)], log)
        written = folder_bytes(out)
        run = with_limit(peak_rss_of_generation(out, preset, "fp32", new_tokens), slack_mb)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        log.unlink(missing_ok=True)
    return {"case": f"{to} folder", "quantize": to, "source": "cpmgen quantize folder",
            "quantize_command": {"seconds": round(seconds, 1), "peak_mb": round(peak / MB, 1)},
            "folder_mb": round(written / MB, 1), **run,
            "peak_over_folder": round(run["peak_mb"] / (written / MB), 3)}


def print_table(result: dict) -> None:
    table = Table(title=f"{result['preset']}: peak RSS of a process that loads and generates "
                        f"{result['new_tokens']} tokens (MB)")
    for column in ("case", "load s", "peak", "weights", "KV cache", "peak - weights - KV", "limit", "ok",
                   "folder", "quantize s / peak"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for r in result["cases"]:
        command = r.get("quantize_command")
        table.add_row(r["case"], str(r["load_s"]), str(r["peak_mb"]), str(r["weights_mb"]), str(r["kv_mb"]),
                      str(r["peak_minus_weights_kv_mb"]), str(r["limit_mb"]), "yes" if r["within_limit"] else "NO",
                      str(r.get("folder_mb", "-")),
                      f"{command['seconds']} / {command['peak_mb']}" if command else "-")
    console.print(table)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.chdir(ROOT)  # `python -m cpmgen` then runs this working tree's cpmgen
    started = time.perf_counter()
    checkpoint = ensure_checkpoint(args.preset, dtype=DTYPES[args.dtype], log=console.print)
    result = {"benchmark": "cpmgen memory", "preset": args.preset, "checkpoint": str(checkpoint),
              "checkpoint_mb": round(folder_bytes(checkpoint) / MB, 1), "checkpoint_dtype": args.dtype,
              "new_tokens": args.new_tokens, "slack_mb": args.slack_mb,
              "env": {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                      "cpu_count": os.cpu_count(), "python": platform.python_version(),
                      "loadavg_start": [round(x, 2) for x in os.getloadavg()]},
              "cases": []}
    for q in args.quantize if args.checkpoint else []:
        console.print(f"[{time.perf_counter() - started:6.1f}s] load with --quantize {q}, generate")
        extra = {"runtime.quantize": q} if q != "none" else {}
        row = peak_rss_of_generation(checkpoint, args.preset, "fp32", args.new_tokens, extra)
        result["cases"].append({"case": f"--quantize {q}", "quantize": q, "source": "checkpoint",
                                **with_limit(row, args.slack_mb)})
    if args.folders:
        for q in [q for q in args.quantize if q != "none"]:
            check_disk(cache_dir(), int(result["checkpoint_mb"] * MB * (0.6 if q == "int8" else 0.35)))
            console.print(f"[{time.perf_counter() - started:6.1f}s] cpmgen quantize --to {q}, "
                          "load the folder, generate")
            result["cases"].append(quantized_folder_case(checkpoint, args.preset, q, args.new_tokens, args.slack_mb))
    result["env"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    print_table(result)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
