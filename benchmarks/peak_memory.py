"""Peak memory of loading and generating, each measured in a fresh process: what a user's
`cpmgen` process would reach, against what it must hold (the weights and the KV cache).

A shared module, not a script. The child processes import it and nothing heavier (no
transformers), so their peaks are cpmgen's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from bandwidth import model_bytes
from cpmgen.config import Settings
from cpmgen.generate import generate
from workload import GREEDY, PROMPT_TOKENS, WINDOW, apply_extra_settings, load_cpmgen, random_ids

MB = 1e6


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM of /proc/self/status (Linux).

    Not getrusage's ru_maxrss: Linux carries the parent's high-water mark into it across fork
    and exec, so a child started by a 3 GB benchmark would report 3 GB from its first line.
    VmHWM belongs to the process's own address space, which exec makes new."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # in kB
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(baseline: int, request: dict) -> None:
    """In the child: load (timed), note the weight and KV cache bytes, generate, print the figures as JSON."""
    import torch

    start = time.perf_counter()
    model = load_cpmgen(request["checkpoint"], request["preset"], request["dtype"], request["extra_settings"])
    load_s = time.perf_counter() - start
    loaded = peak_rss_bytes()
    weights = model_bytes(model)
    # its size only (meta tensors): a real cache made and freed here would stay in the C heap and
    # count in the peak beside the one generate() makes
    kv = model.new_kv_cache(1, WINDOW.size, lambda shape, dtype, device: torch.empty(shape, dtype=dtype,
                                                                                      device="meta")).nbytes
    prompt = random_ids(PROMPT_TOKENS, model.args.vocab_size, 1)
    start = time.perf_counter()
    for _ in generate(model, prompt, WINDOW, GREEDY, request["new_tokens"]):
        pass
    generate_s = time.perf_counter() - start
    print(json.dumps({"baseline": baseline, "loaded": loaded, "peak": peak_rss_bytes(), "weights": weights, "kv": kv,
                      "load_s": load_s, "generate_s": generate_s, "threads": torch.get_num_threads()}))


def peak_rss_of_generation(checkpoint: str | Path, preset: str | None, dtype: str, new_tokens: int,
                           extra_settings: dict | None = None) -> dict:
    """Peak RSS of a fresh process that loads the model (workload.load_cpmgen) and greedily
    generates `new_tokens` tokens after a PROMPT_TOKENS-token prompt with the fast path, WINDOW's cache.

    Figures in MB (1e6 bytes), from peak_rss_bytes: peak (at the end), baseline (right after
    `import torch`, before cpmgen is imported), loaded (once the model is loaded,
    before generating: tells a loading peak from a generation one), weights (model_bytes: what
    the loaded model holds, packed copies included), kv (the K and V buffers of
    model.new_kv_cache(1, 1023)), and peak_minus_weights_kv, what the process holds beyond
    the weights and the cache (the performance issue bounds it); peak_minus_baseline_weights_kv
    also takes off what importing torch alone costs. Weights the loader leaves memory-mapped
    (fp32, unconverted) count in RSS once their pages are read. load_s and generate_s are the
    child's wall seconds for loading and for generating."""
    apply_extra_settings(Settings(), extra_settings)  # fail here, not in the child
    request = {"checkpoint": str(checkpoint), "preset": preset, "dtype": dtype, "new_tokens": new_tokens,
               "extra_settings": extra_settings or {}}
    # the baseline is read (as peak_rss_bytes reads it) before anything but torch is imported
    code = ("import sys, torch\n"
            "baseline = next(int(line.split()[1]) * 1024 for line in open('/proc/self/status')\n"
            "                if line.startswith('VmHWM:'))\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "import json, peak_memory\n"
            "peak_memory._child(baseline, json.loads(sys.argv[1]))\n")
    done = subprocess.run([sys.executable, "-c", code, json.dumps(request)], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"RSS child failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    child = json.loads(done.stdout.strip().splitlines()[-1])
    figures = {name: round(child[name] / MB, 1) for name in ("peak", "baseline", "loaded", "weights", "kv")}
    return {"dtype": dtype, "new_tokens": new_tokens, "extra_settings": extra_settings or {},
            **{f"{name}_mb": value for name, value in figures.items()},
            "peak_minus_weights_kv_mb": round((child["peak"] - child["weights"] - child["kv"]) / MB, 1),
            "peak_minus_baseline_weights_kv_mb":
                round((child["peak"] - child["baseline"] - child["weights"] - child["kv"]) / MB, 1),
            "load_s": round(child["load_s"], 2), "generate_s": round(child["generate_s"], 2)}


# Runs argv[1:] and prints its exit code and ru_maxrss. A child's ru_maxrss starts from the
# peak of the process it was spawned from (Linux carries it over exec), so each command is
# spawned from this small wrapper, not from the benchmark, which may hold far more.
_MEASURE = """
import os, sys
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ,
                     file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def peak_rss_of_command(argv: list[str], log: Path) -> tuple[int, float]:
    """Run argv in a fresh process (its stdout dropped, its stderr to `log`): its own peak RSS
    in bytes and its wall seconds. A failure is an error showing the log."""
    started = time.perf_counter()
    with open(log, "wb") as err:
        measured = subprocess.run([sys.executable, "-c", _MEASURE, *argv], stdout=subprocess.PIPE, stderr=err,
                                  check=True, text=True)
    seconds = time.perf_counter() - started
    code, maxrss = map(int, measured.stdout.split())
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{log.read_text(errors='replace')[-4000:]}")
    return maxrss * 1024, seconds  # ru_maxrss is in KiB on Linux
