"""Decode speed of the `cpmgen` command by thread setting, on an idle and on a busy CPU.

Each measurement is a fresh `python -m cpmgen novel --json --greedy` process on a model with
CPM-Small's layers and random weights (the OpenMP wait policy is fixed when a process loads torch), so
it measures what a user gets. Settings:

- `default`: what cpmgen picks (no --threads, no OpenMP variables);
- `threads=1`: --threads 1 (no waiting between parallel regions to speak of);
- `passive, threads=2`: --threads 2, OMP_WAIT_POLICY=PASSIVE: a worker sleeps as soon as a region ends;
- `spin N, threads=2`: --threads 2, GOMP_SPINCOUNT=N: a worker spins N times before it sleeps
  (300000 is GNU OpenMP's own default).

Conditions: `idle` (nothing else of ours running) and `busy` (`--busy` background processes
spinning on the CPU, 2 by default: on a 2-core machine, load 2 beside us). The settings are
interleaved round by round and each figure is the median of `--rounds`. Prints one JSON object.

    .venv/bin/python benchmarks/bench_threads.py [--rounds 3] [--busy 2] [--tokens 64] [--precisions fp32,int8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPIN_COUNTS = "3000,10000,30000,100000,300000"


def settings(spin_counts: list[int]) -> dict[str, tuple[list[str], dict]]:
    """{name: (options, environment)} of the settings compared."""
    return {"default": ([], {}), "threads=1": (["--threads", "1"], {}),
            "passive, threads=2": (["--threads", "2"], {"OMP_WAIT_POLICY": "PASSIVE"}),
            **{f"spin {n}, threads=2": (["--threads", "2"], {"GOMP_SPINCOUNT": str(n)}) for n in spin_counts}}


PRECISIONS = {"fp32": [], "int8": ["--quantize", "int8"], "int4": ["--quantize", "int4"]}
PROMPT = "今天天气很好，我们一起去公园散步。"


def checkpoint(folder: Path) -> Path:
    """CPM-Small's layers (12 x 768) with the 8000-piece vocab of models/cpm-tiny, so that the
    command can tokenize the prompt; random weights, fp16 on disk, written once."""
    import torch

    from cpmgen.config import ModelArgs
    from cpmgen.synthetic import write_megatron_checkpoint

    if not (folder / "latest_checkpointed_iteration.txt").is_file():
        write_megatron_checkpoint(folder, ModelArgs(num_layers=12, hidden_size=768, num_heads=12, vocab_size=8000),
                                  dtype=torch.float16)
        vocab = Path(__file__).resolve().parents[1] / "models" / "cpm-tiny" / "chinese_vocab.model"
        (folder / "chinese_vocab.model").write_bytes(vocab.read_bytes())
    return folder


def spin() -> None:
    while True:
        pass


def decode_rate(model: Path, prompt: Path, tokens: int, options: list[str], env: dict) -> float:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    environment.update(env)
    command = [sys.executable, "-m", "cpmgen", "novel", "--model", str(model), str(prompt), "--json", "--greedy",
               "--max-new-tokens", str(tokens), *options]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)["stats"]["tokens_per_s"]


def measure(model: Path, prompt: Path, rounds: int, tokens: int, precisions: list[str], compared: dict) -> dict:
    """{precision: {setting: {tokens_per_s (median), runs}, default_vs_best}}; settings and
    precisions interleaved within each round."""
    runs = {p: {name: [] for name in compared} for p in precisions}
    for _ in range(rounds):
        for name, (options, env) in compared.items():
            for p in precisions:
                runs[p][name].append(decode_rate(model, prompt, tokens, options + PRECISIONS[p], env))
    result = {}
    for p in precisions:
        rates = {name: {"tokens_per_s": round(statistics.median(r), 2), "runs": r} for name, r in runs[p].items()}
        best = max(rates[name]["tokens_per_s"] for name in compared)
        result[p] = {**rates, "default_vs_best": round(rates["default"]["tokens_per_s"] / best, 3)}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", type=int, default=2, help="background spinning processes in the busy condition")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per run (after a 16-token prompt)")
    parser.add_argument("--precisions", default="fp32,int8", help=f"comma-separated, of {', '.join(PRECISIONS)}")
    parser.add_argument("--spin-counts", default=SPIN_COUNTS, help=f"GOMP_SPINCOUNT values compared (default {SPIN_COUNTS})")
    parser.add_argument("--output", help="write the JSON here too")
    args = parser.parse_args(argv)
    precisions = args.precisions.split(",")
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        parser.error(f"--precisions: unknown {', '.join(sorted(unknown))}")
    compared = settings([int(n) for n in args.spin_counts.split(",")])
    cache = Path(os.environ.get("CPMGEN_BENCH_CACHE") or Path.home() / ".cache" / "cpmgen-bench")
    model = checkpoint(cache / "threads-cpm-small")
    with tempfile.TemporaryDirectory() as tmp:
        prompt = Path(tmp) / "prompt.txt"
        prompt.write_text(PROMPT, encoding="utf-8")
        started = time.time()
        result = {"cores": len(os.sched_getaffinity(0)), "load_before": os.getloadavg(),
                  "idle": measure(model, prompt, args.rounds, args.tokens, precisions, compared)}
        spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
        for p in spinners:
            p.start()
        try:
            result["busy"] = {"background_processes": args.busy, **measure(model, prompt, args.rounds, args.tokens, precisions, compared)}
        finally:
            for p in spinners:
                p.terminate()
        result["seconds"] = round(time.time() - started, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
