"""Generation benchmark: CPM-Small-sized random weights on the CPU, greedy (and sampled), batch 1, side by side.

Measures in one run, on the same weights, through the real loading and generation code:

1. memory bandwidth (STREAM-style read and copy) and the decode bound it implies: batch-1
   decode reads every weight once per token, so tokens/s <= read bandwidth / weight bytes;
2. cpmgen's fast decode tokens/s within the window, per kernel variant, all loaded at once and
   decoded in `--rounds` interleaved rounds (median; ratios between variants as the median of
   the rounds' ratios): fp32 and bf16 in the CLI's default form (prepack.py's choice for the
   CPU), fp32 on plain `F.linear` (MKL GEMV), int8 and int4 weights (`--quantize int8|int4`),
   int8 with bf16 activations, and fp32 and int4 sampling as the CLI does by default (temperature
   0.9, top-p 0.9: what a sampled token costs beside the step); then fp32 under `--compile`, its
   compile time counted; then at CPM-Large's shape (random weights, 32 x 2560) bf16, int8 and
   int4 side by side the same way (`--large-rounds`; the targets are checked at both shapes);
3. HF transformers GPT2LMHeadModel.generate on the same weights (converted in-process), fp32
   and bf16, timed the same way (tokens after the first; best of --reps runs);
4. the fast path through one whole window and over `--windows` windows of unlimited generation
   at the default stride, the two side by side (a token of each in turn) in `--window-rounds`
   rounds (their ratio the median of the rounds' ratios); at a nearly full window, and in the steady state
   for each of `--strides`;
5. the slow path at a full window (the older scripts' rule: all 1023 tokens per new token);
6. prefill (re-encode) throughput of a full window, its GFLOP/s beside the CPU's fp32 matrix-product
   rate, and from those the ceilings of the unlimited run's ratio (re-encodes free; re-encodes at
   that rate);
7. peak RSS of a fresh process that loads and generates, against weights + KV cache;

and prints one JSON object on stdout, with the issue's targets checked under `targets`
(a table and progress on stderr).

The checkpoint is written once with cpmgen.synthetic.write_megatron_checkpoint into
$CPMGEN_BENCH_CACHE, else $XDG_CACHE_HOME/cpmgen-bench, else ~/.cache/cpmgen-bench, and reused
(workload.py). The measurements come from the shared modules beside this script: bandwidth.py
(bandwidth and bound), timing.py (cpmgen's loop; re-encode time from its own Stats),
hf_baseline.py (HF transformers), peak_memory.py (peak RSS in a child process).

    .venv/bin/python benchmarks/bench_generate.py            # full run (about 11-14 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_generate.py --quick    # smaller counts, no compile: about 3 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from cpmgen.threads import configure_wait_policy

configure_wait_policy()  # the cpmgen command's OpenMP wait policy, set before torch loads OpenMP
import torch  # noqa: E402
from rich.console import Console
from rich.table import Table

import bandwidth
import hf_baseline
import peak_memory
import timing
from cpmgen.config import PRESETS, WindowSection
from cpmgen.generate import generate
from cpmgen.sampling import SamplingParams
from cpmgen.window import Window
from workload import GREEDY, PROMPT_TOKENS, WINDOW, ensure_checkpoint, load_cpmgen, loaded_cpmgen, random_ids

PRESET = "cpm-small"
console = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


# ----------------------------------------------------------------------------- setup


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts and no compile (about 3 minutes)")
    parser.add_argument("--new-tokens", type=int, help="in-window decode tokens (default 256, quick 64)")
    parser.add_argument("--windows", type=int, help="windows of unlimited generation (default 4, quick 1)")
    parser.add_argument("--window-rounds", type=int,
                        help="rounds of --windows windows beside whole windows, a token of each in turn, the median ratio kept (default 2, quick 1)")
    parser.add_argument("--strides", help="comma-separated sweep strides (default 64,128,256,512; quick 128,256,512)")
    parser.add_argument("--sweep-tokens", type=int,
                        help="new tokens per sweep stride, rounded up to whole strides (default 1024, quick 256)")
    parser.add_argument("--slow-tokens", type=int, help="slow-path tokens at a full window (default 3, quick 2)")
    parser.add_argument("--prefill-reps", type=int, help="timed full-window prefills (default 3, quick 1)")
    parser.add_argument("--rounds", type=int,
                        help="interleaved decode rounds of the variants, the median kept (default 5, quick 2)")
    parser.add_argument("--reps", type=int,
                        help="timed decode runs of HF and of --compile, the fastest kept (default 3, quick 2)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction,
                        help="also time fp32 under --compile, compile time included (default: on, quick off)")
    parser.add_argument("--large-rounds", type=int,
                        help="interleaved decode rounds at CPM-Large's shape, bf16, int8, int4 (default 3, quick 0: none)")
    parser.add_argument("--large-tokens", type=int, help="decode tokens a round at CPM-Large's shape (default 33)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads first (default: leave as is)")
    args = parser.parse_args(argv)
    defaults = dict(new_tokens=(64, 256), windows=(1, 4), strides=("128,256,512", "64,128,256,512"),
                    sweep_tokens=(256, 1024), slow_tokens=(2, 3), prefill_reps=(1, 3), rounds=(2, 5), reps=(2, 3),
                    window_rounds=(1, 2), large_rounds=(0, 3), large_tokens=(33, 33),
                    compile=(False, True))
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.strides = [int(s) for s in str(args.strides).split(",") if s.strip()]
    return args


def warm_up(model, size: int, stride: int) -> None:
    """Touch every weight page and the allocator paths once (checkpoint tensors are memory-mapped)."""
    timing.run_generate(model, random_ids(PROMPT_TOKENS, model.args.vocab_size, 99), Window(size, stride), 32)


# ----------------------------------------------------------------------------- report


def measure_windows(model, size: int, stride: int, args, step) -> tuple[dict, dict]:
    """Unlimited generation against generation through one whole window (no slide): both cover
    contexts from short to full, and what differs is the slides. They run side by side, one token
    of each in turn (timing.measure_windows_side_by_side), in each of --window-rounds rounds: run
    one after the other, a minute apart, the two met different machines as often as not here
    (round ratios 0.65-1.04 within one run). The ratio is the median of the rounds' ratios, and
    each side's figures are those of that round."""
    rounds = []
    for r in range(args.window_rounds):
        step(f"fp32: round {r + 1}/{args.window_rounds}: {args.windows} windows ({args.windows * size} tokens) at "
             f"stride {stride} beside whole windows from {PROMPT_TOKENS}-token prompts, a token of each in turn")
        in_window, unlimited = timing.measure_windows_side_by_side(model, size, stride, PROMPT_TOKENS,
                                                                    args.windows * size, seed=5 + 10 * r)
        rounds.append({"in_window": in_window, "unlimited": unlimited})
    ratios = [f["unlimited"]["tokens_per_s"] / f["in_window"]["tokens_per_s"] for f in rounds]
    median = rounds[ratios.index(statistics.median_low(ratios))]
    in_window, unlimited = median["in_window"], median["unlimited"]
    in_window["rounds_tokens_per_s"] = [f["in_window"]["tokens_per_s"] for f in rounds]
    unlimited["rounds_tokens_per_s"] = [f["unlimited"]["tokens_per_s"] for f in rounds]
    unlimited["rounds_over_in_window"] = [round(x, 3) for x in ratios]
    unlimited["over_in_window"] = round(statistics.median(ratios), 3)
    return in_window, unlimited


def encode_flop(args, tokens: int) -> float:
    """Floating-point operations (2 per multiply-add) of encoding `tokens` tokens at positions
    0..tokens-1 with the next token's logits only (a prefill, a re-encode), as the model runs it:
    every token through every block but the last (the linears, and causal attention: half the
    query-key pairs, for the scores and for the weighted sum of values); in the last block every
    token's keys and values and the rest for the last token alone; the output layer for it."""
    h = args.hidden_size
    qkv, rest = 3 * h * h, h * h + 2 * h * args.ffn_size
    block = tokens * (qkv + rest) + tokens * tokens * h
    last_block = tokens * qkv + rest + 2 * tokens * h
    return 2.0 * ((args.num_layers - 1) * block + last_block + h * args.vocab_size)


def add_ceilings(result: dict, args, matmul_gflops: float) -> None:
    """What the unlimited run's ratio to whole windows could be at most, from this run's own
    figures: with re-encodes that cost nothing (its decode steps alone, which read the longer
    contexts' larger KV cache), and with re-encodes at the matrix-product rate measured here
    (their arithmetic, which the fp32 path can neither skip nor round, at that rate)."""
    unlimited, in_window = result["unlimited"], result["in_window"]["tokens_per_s"]
    decode_s = unlimited["seconds"] - unlimited["reencode_s"]
    reencode_gflop = unlimited["slides"] * encode_flop(args, unlimited["kept_after_slide"]) / 1e9
    prefill = result["prefill"]
    result["compute"] = {
        "matmul_gflops": matmul_gflops,
        "prefill_gflops": round(encode_flop(args, prefill["tokens"]) / 1e9 / prefill["median_s"], 1),
        "reencode_gflop": round(reencode_gflop, 1),
        "reencode_gflops": round(reencode_gflop / unlimited["reencode_s"], 1) if unlimited["reencode_s"] else None,
    }
    unlimited["ceilings_over_in_window"] = {
        "reencodes_free": round(unlimited["new_tokens"] / decode_s / in_window, 3),
        "reencodes_at_matmul_rate": round(unlimited["new_tokens"] / (decode_s + reencode_gflop / matmul_gflops)
                                          / in_window, 3),
    }


def add_ratios(result: dict) -> None:
    in_window = result["in_window"]["tokens_per_s"]
    prefill_tps = result["prefill"]["tokens_per_s"]
    for row in result["stride_sweep"]:
        row["over_in_window"] = round(row["tokens_per_s"] / in_window, 3)
        # the same share predicted from the full-window prefill rate (a check on the measured one)
        row["reencode_share_est"] = round(row["slides"] * row["kept_after_slide"] / prefill_tps / row["seconds"], 4)
    result["ratios"] = {
        "fast_over_slow": round(in_window / result["slow_full_window"]["tokens_per_s"], 2),
        "unlimited_over_in_window": result["unlimited"]["over_in_window"],
        "unlimited_ceilings_over_in_window": result["unlimited"]["ceilings_over_in_window"],
        "in_window_long_over_whole": round(result["in_window_long_context"]["tokens_per_s"] / in_window, 3),
        "reencode_share_by_stride": {str(r["stride"]): r["reencode_share"] for r in result["stride_sweep"]},
        "steady_over_in_window_by_stride": {str(r["stride"]): r["over_in_window"] for r in result["stride_sweep"]},
    }


# ----------------------------------------------------------------------------- variants and peers

# (name, dtype, runtime settings): how cpmgen can run the model on the CPU. The first is the
# CLI's default; "fp32-plain" is the same model on F.linear, the eager PyTorch baseline.
VARIANTS = [
    ("fp32", "fp32", {}),
    ("fp32-plain", "fp32", {"runtime.prepack": False}),
    ("bf16", "bf16", {}),
    ("int8", "fp32", {"runtime.quantize": "int8"}),
    ("int8-bf16", "bf16", {"runtime.quantize": "int8"}),
    ("int4", "fp32", {"runtime.quantize": "int4"}),
]
COMPILED = ("fp32-compile", "fp32", {"runtime.compile": True})
# Variants that sample as the CLI does by default (temperature 0.9, top-p 0.9), each on the model of
# the greedy variant it names: the cost of sampling a token beside the step that computes its logits.
SAMPLED = {"fp32-sampled": "fp32", "int4-sampled": "int4"}
# Variant over variant, each pair's ratio the median of the rounds' ratios.
PAIRS = [("bf16", "fp32"), ("int8", "fp32"), ("int8", "bf16"), ("int8-bf16", "bf16"), ("int4", "bf16"),
         ("int4", "int8"), ("fp32", "fp32-plain"), ("fp32-sampled", "fp32"), ("int4-sampled", "int4")]

# The same measurement at CPM-Large's shape (32 x 2560, 2.6B parameters; random weights kept in
# fp16 on disk), the model whose bytes per token the performance targets are about: its output
# layer is 3% of its weights, where CPM-Small's, int8 in int4's form, is a third of int4's bytes
# (so at CPM-Small's shape int4 reads only 3.0x fewer bytes than bf16). fp32 is left out: 10.4 GB
# beside the others would not fit a 24 GB machine, and its bound is bf16's halved.
LARGE = "cpm-large"
LARGE_VARIANTS = [
    ("bf16", "bf16", {}),
    ("int8", "fp32", {"runtime.quantize": "int8"}),
    ("int4", "fp32", {"runtime.quantize": "int4"}),
]
LARGE_PAIRS = [("int8", "bf16"), ("int4", "bf16"), ("int4", "int8")]


def variant_row(folder: Path, preset: str, name: str, dtype: str, extra: dict, prompt: list[int],
                new_tokens: int) -> tuple[dict, object]:
    """One way of running the model, loaded: its row (load time, bytes a token reads) and the
    Loaded (the model and its one-token step)."""
    start = time.perf_counter()
    loaded = loaded_cpmgen(str(folder), preset, dtype, extra)
    model = loaded.model
    row = {"variant": name, "dtype": dtype, "settings": extra, "load_s": round(time.perf_counter() - start, 2),
           "model_bytes": bandwidth.model_bytes(model),
           "weight_bytes_per_token": bandwidth.weight_bytes_per_token(model),
           "kv_bytes_per_token": bandwidth.kv_bytes_per_token(model, len(prompt), new_tokens)}
    return row, loaded


def measure_variants(folder: Path, preset: str, variants: list, sampled_variants: dict, pairs: list,
                     prompt: list[int], rounds_count: int, new_tokens: int, slice_tokens: int, prefill_reps: int,
                     step) -> dict:
    """`variants` of `preset` side by side: all loaded, then `rounds_count` rounds, each decoding
    every variant once (greedy, or sampled for `sampled_variants`: {name: the greedy variant whose
    model it samples from}; `new_tokens` after the prompt) between two samples of the read bound,
    `slice_tokens` tokens of each in turn (timing.cpmgen_rates_side_by_side; the order rotated
    round by round). A shared
    machine's bandwidth moves within seconds to minutes (here between about 30 and 80 GB/s), so
    variants timed apart would compare two machines: decoded one after the other, seconds apart,
    the rounds' int4/bf16 ratios spread 1.7-3.1 within one run. Per variant: the median rate and
    every round's, the round of the median's figures, and (with `prefill_reps`) its full-window
    prefill; per pair of `pairs`, the median of the rounds' ratios."""
    rows, models = [], {}
    for name, dtype, extra in variants:
        step(f"cpmgen {preset} {name}: load")
        row, loaded = variant_row(folder, preset, name, dtype, extra, prompt, new_tokens)
        models[name] = loaded.model
        rows.append(row)
    for name, greedy in sampled_variants.items():
        models[name] = models[greedy]
        row = next(r for r in rows if r["variant"] == greedy)
        rows.append({**row, "variant": name, "load_s": 0.0, "sampling": "temperature 0.9, top-p 0.9 (the defaults)"})
    sampled = dict.fromkeys(sampled_variants, SamplingParams())
    bounds = [bandwidth.read_bound_gbs()]
    rounds = []  # per round: {variant: rate figures}
    for r in range(rounds_count):
        order = rows[r % len(rows):] + rows[:r % len(rows)]
        step(f"{preset} round {r + 1}/{rounds_count}: decode {new_tokens} tokens with each variant, {slice_tokens} of "
             f"each in turn, from {order[0]['variant']}")
        rounds.append(timing.cpmgen_rates_side_by_side({row["variant"]: models[row["variant"]] for row in order},
                                                       prompt, new_tokens, slice_tokens, params=sampled))
        bounds.append(bandwidth.read_bound_gbs())
    for row in rows:
        name = row["variant"]
        rates = [figures[name]["tokens_per_s"] for figures in rounds]
        median = statistics.median_low(rates)
        row["decode"] = rounds[rates.index(median)][name]
        row["tokens_per_s"] = round(statistics.median(rates), 3)
        row["rounds_tokens_per_s"] = rates
        # each round's rate against the mean of the samples taken at its start and its end
        row["round_shares_around"] = [
            round(rate / bandwidth.decode_bound((bounds[r] + bounds[r + 1]) / 2, row["weight_bytes_per_token"]), 3)
            for r, rate in enumerate(rates)]
        row["effective_gbs"] = round(row["tokens_per_s"] * row["weight_bytes_per_token"] / 1e9, 2)
        if name not in sampled_variants and prefill_reps:
            step(f"cpmgen {preset} {name}: prefill")
            row["prefill"] = timing.measure_prefill(models[name], 1023, prefill_reps)
    del models
    ratios = {f"{a}_over_{b}": round(statistics.median(f[a]["tokens_per_s"] / f[b]["tokens_per_s"] for f in rounds), 3)
              for a, b in pairs}
    return {"rows": rows, "bound_samples_gbs": bounds, "paired_ratios": ratios}


def measure_compiled(folder: Path, prompt: list[int], args) -> dict:
    """fp32 under --compile, apart from the interleaved rounds (its first call compiles): the
    compile time as compile_s, then decode tokens/s (best of --reps) between two bound samples
    (the tokens it takes to win the compile time back are filled in by add_targets)."""
    name, dtype, extra = COMPILED
    row, loaded = variant_row(folder, PRESET, name, dtype, extra, prompt, args.new_tokens)
    model = loaded.model
    start = time.perf_counter()
    for _ in generate(model, prompt, WINDOW, GREEDY, 3, decode=loaded.decode):
        pass
    row["compile_s"] = round(time.perf_counter() - start, 1)
    before = bandwidth.read_bound_gbs()
    row["decode"] = timing.cpmgen_generate_rate(model, prompt, args.new_tokens, args.reps, loaded.decode)
    row["round_shares_around"] = [round(row["decode"]["tokens_per_s"] / bandwidth.decode_bound(
        (before + bandwidth.read_bound_gbs()) / 2, row["weight_bytes_per_token"]), 3)]
    row["tokens_per_s"] = row["decode"]["tokens_per_s"]
    row["effective_gbs"] = round(row["tokens_per_s"] * row["weight_bytes_per_token"] / 1e9, 2)
    row["prefill"] = timing.measure_prefill(model, 1023, 1 if args.quick else 2)
    return row


def measure_hf(folder: Path, prompt: list[int], args) -> list[dict]:
    """HF GPT2LMHeadModel.generate on the same weights in fp32 and bf16 (its faster attention),
    with the logits check against cpmgen and what it does past 1024 positions."""
    plain = load_cpmgen(str(folder), PRESET, "fp32", {"runtime.prepack": False})
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        hf = hf_baseline.hf_model_from_cpmgen(plain, dtype)
        choice = hf_baseline.choose_attn_implementation(hf, prompt, min(args.new_tokens, 64), 1)
        rate = hf_baseline.hf_generate_rate(hf, prompt, args.new_tokens, args.reps)
        row = {"variant": f"hf-{str(dtype).removeprefix('torch.').replace('float32', 'fp32').replace('bfloat16', 'bf16')}",
               "attn_implementation": choice["attn_implementation"], "decode": rate,
               "tokens_per_s": rate["tokens_per_s"]}
        if dtype == torch.float32:
            row["logits_vs_cpmgen"] = hf_baseline.hf_logits_diff(plain, hf)
            row["greedy_agreement"] = hf_baseline.greedy_agreement(plain, hf, prompt, 32)
            row["past_window"] = hf_baseline.hf_past_window(hf, random_ids(1020, plain.args.vocab_size, 2), 8)
        rows.append(row)
        del hf
    return rows


def add_bound_shares(rows: list[dict], samples: list[float]) -> float:
    """Each variant's share of the read bound: against the median of `samples` (the bound moves
    while a shared machine runs, and one sample can be far from the rest), the same counting the
    KV cache a step also reads, and the median over its rounds of each round's rate against the
    bound sampled around that round. Returns the median."""
    bound_gbs = round(statistics.median(samples), 2)
    for row in rows:
        row["bound_tokens_per_s"] = bandwidth.decode_bound(bound_gbs, row["weight_bytes_per_token"])
        row["of_bound"] = round(row["tokens_per_s"] / row["bound_tokens_per_s"], 3)
        # the same share counting the KV cache a step also reads (what its attention streams)
        with_kv = row["weight_bytes_per_token"] + row["kv_bytes_per_token"]
        row["of_bound_with_kv"] = round(row["tokens_per_s"] / bandwidth.decode_bound(bound_gbs, with_kv), 3)
        row["of_bound_around"] = round(statistics.median(row["round_shares_around"]), 3)
    return bound_gbs


def measure_large(prompt: list[int], args, step) -> dict:
    """LARGE_VARIANTS side by side at CPM-Large's shape (its checkpoint written once, 5 GB), as
    measure_variants measures CPM-Small's, with bound samples of their own."""
    folder = ensure_checkpoint(LARGE, dtype=torch.float16, log=console.print)
    measured = measure_variants(folder, LARGE, LARGE_VARIANTS, {}, LARGE_PAIRS, prompt, args.large_rounds,
                                args.large_tokens, 8, 0, step)
    bound_gbs = add_bound_shares(measured["rows"], measured["bound_samples_gbs"])
    return {"model": LARGE, "checkpoint": str(folder), "rounds": args.large_rounds, "new_tokens": args.large_tokens,
            "variants": measured["rows"], "paired_ratios": measured["paired_ratios"],
            "bound_samples_gbs": measured["bound_samples_gbs"], "bound_median_gbs": bound_gbs}


def add_targets(result: dict) -> None:
    """The performance issue's CPU targets, each with its measured ratio and whether it is met."""
    rates = {row["variant"]: row for row in result["variants"] + result["hf"]}
    fp32, bf16 = rates["fp32"], rates["bf16"]
    paired = result["paired_ratios"]  # variant over variant: the median of the rounds' ratios
    if "fp32-compile" in rates:
        compiled = rates["fp32-compile"]
        gain = 1 / fp32["tokens_per_s"] - 1 / compiled["tokens_per_s"]
        compiled["break_even_tokens"] = round(compiled["compile_s"] / gain) if gain > 0 else None
    targets = {
        "fp32_over_hf_fp32": (fp32["tokens_per_s"] / rates["hf-fp32"]["tokens_per_s"], 1.3),
        "fp32_of_bandwidth_bound": (fp32["of_bound"], 0.8),
        "unlimited_over_in_window": (result["ratios"]["unlimited_over_in_window"], 0.93),
        "bf16_over_fp32": (paired["bf16_over_fp32"], 1.6),
        "bf16_of_bandwidth_bound": (bf16["of_bound"], 0.85),
        "bf16_over_hf_bf16": (bf16["tokens_per_s"] / rates["hf-bf16"]["tokens_per_s"], None),
        "int8_over_fp32": (paired["int8_over_fp32"], None),
        "int8_over_bf16": (paired["int8_over_bf16"], 1.8),
        "int8_of_bandwidth_bound": (rates["int8"]["of_bound"], 0.8),
        "int4_over_bf16": (paired["int4_over_bf16"], 3.0),
        "int4_of_bandwidth_bound": (rates["int4"]["of_bound"], 0.7),
        "peak_rss_over_weights_kv_mb": (max(r["peak_minus_weights_kv_mb"] for r in result["peak_rss"]), 300),
    }
    if "large" in result:  # the same targets at CPM-Large's shape
        large = {row["variant"]: row for row in result["large"]["variants"]}
        large_paired = result["large"]["paired_ratios"]
        targets.update({
            "large_bf16_of_bandwidth_bound": (large["bf16"]["of_bound"], 0.85),
            "large_int8_over_bf16": (large_paired["int8_over_bf16"], 1.8),
            "large_int8_of_bandwidth_bound": (large["int8"]["of_bound"], 0.8),
            "large_int4_over_bf16": (large_paired["int4_over_bf16"], 3.0),
            "large_int4_of_bandwidth_bound": (large["int4"]["of_bound"], 0.7),
        })
    result["targets"] = {
        name: {"measured": round(value, 3), "target": target,
               "met": None if target is None else (value <= target if name.endswith("_mb") else value >= target)}
        for name, (value, target) in targets.items()}


# ----------------------------------------------------------------------------- report


def print_tables(result: dict) -> None:
    threads = result["env"]["torch_threads"]
    table = Table(title=f"decode, {PRESET}, batch 1, {threads} torch threads, bound at "
                        f"{result['bandwidth']['bound_median_gbs']} GB/s read (median of "
                        f"{min(result['bandwidth']['bound_samples_gbs'])}-{max(result['bandwidth']['bound_samples_gbs'])})")
    for column in ("variant", "weights MB/token", "tokens/s", "x hf-fp32", "of bound", "of bound around",
                   "of bound with KV", "GB/s", "prefill tok/s", "compile s"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    hf_fp32 = next(r for r in result["hf"] if r["variant"] == "hf-fp32")["tokens_per_s"]
    for row in result["variants"] + result["hf"]:
        bytes_ = row.get("weight_bytes_per_token")
        table.add_row(row["variant"], f"{bytes_ / 1e6:.0f}" if bytes_ else "-", str(row["tokens_per_s"]),
                      f"{row['tokens_per_s'] / hf_fp32:.2f}", str(row.get("of_bound", "-")),
                      str(row.get("of_bound_around", "-")), str(row.get("of_bound_with_kv", "-")),
                      str(row.get("effective_gbs", "-")), str(row.get("prefill", {}).get("tokens_per_s", "-")),
                      str(row.get("compile_s", "-")))
    console.print(table)
    console.print("variant over variant, median of the rounds' ratios: " +
                  ", ".join(f"{name} {value}" for name, value in result["paired_ratios"].items()))
    if "large" in result:
        large = result["large"]
        table = Table(title=f"decode, {LARGE}, batch 1, {threads} torch threads, bound at {large['bound_median_gbs']} "
                            f"GB/s read (median of {min(large['bound_samples_gbs'])}-{max(large['bound_samples_gbs'])})")
        for column in ("variant", "weights MB/token", "tokens/s", "of bound", "of bound around", "load s"):
            table.add_column(column, justify="left" if column == "variant" else "right")
        for row in large["variants"]:
            table.add_row(row["variant"], f"{row['weight_bytes_per_token'] / 1e6:.0f}", str(row["tokens_per_s"]),
                          str(row["of_bound"]), str(row["of_bound_around"]), str(row["load_s"]))
        console.print(table)
        console.print(f"{LARGE}, variant over variant, median of the rounds' ratios: " +
                      ", ".join(f"{name} {value}" for name, value in large["paired_ratios"].items()))

    in_window = result["in_window"]["tokens_per_s"]
    table = Table(title="fp32 (default kernels): windows, strides, slow path")
    for column in ("run", "stride", "tokens", "slides", "seconds", "tokens/s", "x in-window", "re-encode share"):
        table.add_column(column, justify="left" if column == "run" else "right")

    def row(name, stride, tokens, slides, seconds, tps, share="-"):
        table.add_row(name, str(stride), str(tokens), str(slides), str(seconds), str(tps),
                      str(round(tps / in_window, 3)), str(share))

    for key, name in (("in_window", "fast, one whole window, no slide"),
                      ("in_window_long_context", "fast, in window, long context")):
        w = result[key]
        row(name, "-", w["decode_tokens"], 0, w["decode_s"], w["tokens_per_s"])
    u = result["unlimited"]
    row(f"fast, {result['config']['windows']} windows from a short prompt", u["stride"], u["new_tokens"],
        u["slides"], u["seconds"], u["tokens_per_s"], u["reencode_share"])
    for r in result["stride_sweep"]:
        row("fast, steady state (from a full window)", r["stride"], r["new_tokens"], r["slides"], r["seconds"],
            r["tokens_per_s"], r["reencode_share"])
    s = result["slow_full_window"]
    row("slow, full window", 1, s["new_tokens"], "-", s["seconds"], s["tokens_per_s"])
    p = result["prefill"]
    table.add_row("prefill (re-encode) of a full window", "-", str(p["tokens"]), "-", str(p["median_s"]),
                  str(p["tokens_per_s"]), "-", "-")
    console.print(table)
    c, ceilings = result["compute"], u["ceilings_over_in_window"]
    console.print(f"{result['config']['windows']} windows over whole windows, at most: {ceilings['reencodes_free']} with "
                  f"re-encodes free, {ceilings['reencodes_at_matmul_rate']} with re-encodes at the matrix-product "
                  f"rate ({c['matmul_gflops']} GFLOP/s; the re-encodes ran at {c['reencode_gflops']}, a full window's "
                  f"prefill at {c['prefill_gflops']})")

    table = Table(title="peak RSS of a process that loads and generates (MB)")
    for column in ("variant", "peak", "after import torch", "weights", "KV cache", "peak - weights - KV"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in result["peak_rss"]:
        table.add_row(r["variant"], str(r["peak_mb"]), str(r["baseline_mb"]), str(r["weights_mb"]), str(r["kv_mb"]),
                      str(r["peak_minus_weights_kv_mb"]))
    console.print(table)

    table = Table(title="targets (performance issue, CPU)")
    for column in ("target", "measured", "wanted", "met"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for name, t in result["targets"].items():
        wanted = "-" if t["target"] is None else (f"<= {t['target']}" if name.endswith("_mb") else f">= {t['target']}")
        table.add_row(name, str(t["measured"]), wanted, {True: "yes", False: "NO", None: "-"}[t["met"]])
    console.print(table)


def environment() -> dict:
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "machine": platform.machine(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    env = environment()
    folder = ensure_checkpoint(PRESET, log=console.print)
    result = {"benchmark": "cpmgen generate", "model": PRESET, "device": "cpu", "batch": 1,
              "sampling": "greedy; the -sampled variants temperature 0.9, top-p 0.9 (the defaults)",
              "env": env, "config": {"quick": args.quick, "new_tokens": args.new_tokens, "rounds": args.rounds, "reps": args.reps,
                                     "windows": args.windows, "window_rounds": args.window_rounds, "strides": args.strides,
                                     "sweep_tokens": args.sweep_tokens, "large_rounds": args.large_rounds,
                                     "checkpoint": str(folder)}}

    def step(name: str) -> None:
        console.print(f"[{time.perf_counter() - started:6.1f}s] {name}")

    step("memory bandwidth")
    result["bandwidth"] = bandwidth.memory_bandwidth()
    vocab = PRESETS[PRESET].vocab_size
    prompt = random_ids(PROMPT_TOKENS, vocab, 1)
    variants = measure_variants(folder, PRESET, VARIANTS, SAMPLED, PAIRS, prompt, args.rounds, args.new_tokens, 16,
                                1 if args.quick else 2, step)
    result["variants"], result["paired_ratios"] = variants["rows"], variants["paired_ratios"]
    samples = [result["bandwidth"]["bound_gbs"]] + variants["bound_samples_gbs"]
    if args.compile:
        step(f"cpmgen {COMPILED[0]}: compile, decode {args.new_tokens} tokens x {args.reps}, prefill")
        result["variants"].append(measure_compiled(folder, prompt, args))
    result["bandwidth"]["bound_samples_gbs"] = samples
    result["bandwidth"]["bound_median_gbs"] = add_bound_shares(result["variants"], samples)
    if args.large_rounds:
        result["large"] = measure_large(prompt, args, step)
    step("HF transformers generate, fp32 and bf16")
    result["hf"] = measure_hf(folder, prompt, args)

    model = load_cpmgen(str(folder), PRESET, "fp32")
    default = Window.from_settings(WindowSection(), model.args.max_positions)  # what the CLI uses by default
    size, default_stride = default.size, default.stride
    result["config"].update(window=size, default_stride=default_stride)
    step("fp32: warm-up")
    warm_up(model, size, default_stride)
    result["in_window"], result["unlimited"] = measure_windows(model, size, default_stride, args, step)
    long_tokens = min(args.new_tokens, 128)
    step(f"fp32: in-window decode at a nearly full window, {long_tokens} tokens")
    result["in_window_long_context"] = timing.measure_in_window(model, size, default_stride, size - long_tokens - 1,
                                                                long_tokens, seed=4)
    step(f"fp32: prefill of {size} tokens x {args.prefill_reps}, the matrix-product rate")
    result["prefill"] = timing.measure_prefill(model, size, args.prefill_reps)
    add_ceilings(result, model.args, bandwidth.matmul_gflops(size + 1 - default_stride, model.args.hidden_size,
                                                             model.args.ffn_size))
    step(f"fp32: slow path at a full window, {args.slow_tokens} tokens")
    result["slow_full_window"] = timing.measure_slow(model, size, args.slow_tokens)
    result["stride_sweep"] = []
    for stride in args.strides:
        step(f"fp32: steady state from a full window, {args.sweep_tokens}+ tokens at stride {stride}")
        result["stride_sweep"].append(timing.measure_steady(model, size, stride, args.sweep_tokens))
    del model
    add_ratios(result)

    result["peak_rss"] = []
    for name, dtype, extra in VARIANTS:
        if name != "fp32-plain":
            step(f"peak RSS of generation, {name}")
            rss = peak_memory.peak_rss_of_generation(str(folder), PRESET, dtype, args.new_tokens, extra)
            result["peak_rss"].append({"variant": name, **rss})
    add_targets(result)
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    step("done")
    print_tables(result)
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
