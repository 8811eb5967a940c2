"""GPU generation benchmark (for a lent device): CPM-Large-sized random weights, fp16, batch 1.

The performance issue's GPU targets, measured side by side in one run:

1. HBM bandwidth (device-to-device copy) and the decode bound it implies;
2. cpmgen's fast decode tokens/s within the window, eager and under --compile (CUDA graphs),
   compile time counted;
3. HF transformers GPT2LMHeadModel.generate on the same weights (converted in-process);
4. the fast path over --windows windows of unlimited generation at the default stride, with the
   share of time spent re-encoding after slides, and a full-window prefill.

The weights are random and made on the device (a 2.6B checkpoint on disk would take longer to
write than the whole run); loading is measured by the CPU benchmark. The timing, the bound and
the HF baseline come from the shared modules beside this script (timing.py, bandwidth.py,
hf_baseline.py), as in bench_generate.py. Prints one JSON object with the targets checked;
progress on stderr.

    python benchmarks/bench_gpu.py                          # CPM-Large fp16, a few minutes on an H100
    python benchmarks/bench_gpu.py --preset cpm-small --device cpu --new-tokens 16 --windows 1   # a dry run
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import bandwidth
import hf_baseline
from cpmgen.config import PRESETS, WindowSection
from cpmgen.generate import generate
from cpmgen.loading import TORCH_DTYPES, compile_decode
from cpmgen.model import CPMModel, decode_step
from cpmgen.window import Window
from timing import cpmgen_generate_rate, measure_in_window, measure_prefill, measure_unlimited
from workload import GREEDY, PROMPT_TOKENS, random_ids, synchronize

TARGETS = {"of_hbm_bound": 0.60, "over_hf": 2.0, "reencode_share_max": 0.10}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="cpm-large", choices=list(PRESETS))
    parser.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--new-tokens", type=int, default=256, help="decode tokens per timed run (default 256)")
    parser.add_argument("--reps", type=int, default=2, help="timed runs per rate, the fastest kept (default 2)")
    parser.add_argument("--windows", type=int, default=4, help="windows of unlimited generation (default 4)")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="time HF generate too")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="time the --compile decode step too")
    return parser.parse_args(argv)


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Device-to-device copy in GB/s, counting the bytes read and written (STREAM's copy)."""
    a = torch.ones(nbytes // 4, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(reps):
        synchronize()
        start = time.perf_counter()
        b.copy_(a)
        synchronize()
        best = min(best, time.perf_counter() - start)
    return round(2 * nbytes / best / 1e9, 1)


def random_model(preset: str, dtype: torch.dtype, device: torch.device) -> CPMModel:
    """CPM weights drawn on the device: N(0, 0.02) matrices, LayerNorms at 1 and 0."""
    with torch.device(device):
        model = CPMModel(PRESETS[preset]).to(dtype)
    generator = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "layernorm" in name:
                tensor.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                tensor.normal_(0.0, 0.02, generator=generator)
    return model.eval().requires_grad_(False)


def decode_row(name: str, model: CPMModel, prompt: list[int], args, bound_gbs: float, decode=decode_step) -> dict:
    rate = cpmgen_generate_rate(model, prompt, args.new_tokens, args.reps, decode)
    weight_bytes = bandwidth.weight_bytes_per_token(model)
    bound = bandwidth.decode_bound(bound_gbs, weight_bytes)
    return {"variant": name, "weight_bytes_per_token": weight_bytes, "tokens_per_s": rate["tokens_per_s"],
            "bound_tokens_per_s": bound, "of_bound": round(rate["tokens_per_s"] / bound, 3), "decode": rate}


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), TORCH_DTYPES[args.dtype]
    started = time.perf_counter()

    def step(name: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {name}", file=sys.stderr, flush=True)

    result = {"benchmark": "cpmgen generate (GPU)", "model": args.preset, "dtype": args.dtype, "batch": 1,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "config": vars(args)}
    step("bandwidth")
    result["copy_gbs"] = copy_bandwidth(device)
    step(f"random {args.preset} weights on {device}")
    model = random_model(args.preset, dtype, device)
    prompt = random_ids(PROMPT_TOKENS, model.args.vocab_size, 1)
    step(f"eager decode, {args.new_tokens} tokens x {args.reps}")
    result["variants"] = [decode_row("eager", model, prompt, args, result["copy_gbs"])]

    window = Window.from_settings(WindowSection(), model.args.max_positions)
    step("full-window prefill")
    result["prefill"] = measure_prefill(model, window.size, 3)
    first_window = window.size - PROMPT_TOKENS - 1
    step(f"one whole window ({first_window} tokens) and {args.windows} windows at stride {window.stride}")
    result["in_window"] = measure_in_window(model, window.size, window.stride, PROMPT_TOKENS, first_window, seed=1)
    result["unlimited"] = measure_unlimited(model, window.size, window.stride,
                                            random_ids(PROMPT_TOKENS, model.args.vocab_size, 5),
                                            args.windows * window.size)

    if args.hf:
        step("HF transformers generate")
        hf = hf_baseline.hf_model_from_cpmgen(model, dtype)
        choice = hf_baseline.choose_attn_implementation(hf, prompt, min(args.new_tokens, 64), 1)
        result["hf"] = {"attn_implementation": choice["attn_implementation"],
                        **hf_baseline.hf_generate_rate(hf, prompt, args.new_tokens, args.reps),
                        "logits_vs_cpmgen": hf_baseline.hf_logits_diff(model, hf)}
        del hf

    if args.compile:
        step("--compile: compile, then decode")
        compiled = compile_decode(model)
        start = time.perf_counter()
        for _ in generate(model, prompt, window, GREEDY, 3, decode=compiled):
            pass
        compile_s = round(time.perf_counter() - start, 1)
        result["variants"].append({**decode_row("compiled", model, prompt, args, result["copy_gbs"], compiled),
                                   "compile_s": compile_s})

    best = max(result["variants"], key=lambda row: row["tokens_per_s"])
    unlimited = result["unlimited"]
    targets = {"of_hbm_bound": (best["of_bound"], TARGETS["of_hbm_bound"], ">="),
               "unlimited_over_in_window": (unlimited["tokens_per_s"] / result["in_window"]["tokens_per_s"], None,
                                            ">="),
               "reencode_share": (unlimited["reencode_share"], TARGETS["reencode_share_max"], "<=")}
    if args.hf:
        targets["over_hf"] = (best["tokens_per_s"] / result["hf"]["tokens_per_s"], TARGETS["over_hf"], ">=")
    result["targets"] = {
        name: {"measured": round(value, 3), "target": target, "best_variant": best["variant"],
               "met": None if target is None else (value >= target if sense == ">=" else value <= target)}
        for name, (value, target, sense) in targets.items()}
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    step("done")
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
