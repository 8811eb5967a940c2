"""Quality past the window, measured on the trained cpm-tiny: perplexity and tokens/s against stride.

Every configuration scores the same held-out text with cpmgen.score.score_ids (what `cpmgen
score` runs): each token predicted from exactly the window generation would have had after the
tokens before it, so the perplexity is what generation with that window rule sees. Its
tokens/s is the real cost of generating that many tokens with the same window
(cpmgen.generate.generate, greedy, from the text's first token):

- slow path, stride 1: the older scripts' exact rule (recompute the last W tokens per token);
- fast path at strides 1, 8, 16, 32, 64 and W/2: KV cache, one re-encode per slide;
- the older scripts' KV cache with stale positions (reproduced here only, as the baseline
  that fails): once full, drop the oldest cached entry and feed each new token at the last
  position, keeping every other entry's old position encoding.

Prints one JSON object; a table on stderr; writes a plot (perplexity and tokens/s against
stride) when matplotlib is installed (`pip install cpmgen[bench]`).

    .venv/bin/python benchmarks/bench_quality.py [--model models/cpm-tiny] [--tokens 3000]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from cpmgen.config import Settings
from cpmgen.generate import Stats, generate, prefill
from cpmgen.loading import load_model
from cpmgen.model import decode_step
from cpmgen.sampling import SamplingParams
from cpmgen.score import score_ids
from cpmgen.tokenizer import CPMTokenizer
from cpmgen.window import Window

ROOT = Path(__file__).resolve().parent.parent


def window_run(model, ids: list[int], window: Window, fast: bool) -> dict:
    """Perplexity of ids[1:] under `window` (score_ids), and the tokens/s and slides of
    generating len(ids) - 1 tokens after ids[0] with the same window and path."""
    logprobs = score_ids(model, ids, window, fast)
    stats = Stats()
    start = time.perf_counter()
    for _ in generate(model, ids[:1], window, SamplingParams(greedy=True), len(ids) - 1, fast=fast, stats=stats):
        pass
    return result(logprobs, time.perf_counter() - start, stats.slides)


@torch.inference_mode()
def stale_cache_run(model, ids: list[int], size: int) -> dict:
    """The older fast path: past the window, shift the cache and keep the stale encodings."""
    kv_cache = model.new_kv_cache(1, size)
    logprobs: list[float] = []
    start = time.perf_counter()
    logits = prefill(model, ids[:1], kv_cache, 0)
    cached = 1
    for j in range(1, len(ids)):
        logprobs.append(float(torch.log_softmax(logits.float(), dim=-1)[ids[j]]))
        if j == len(ids) - 1:
            break
        if cached == size:  # drop the oldest entry; the others keep the positions they were encoded at
            for t in kv_cache.k + kv_cache.v:
                t[:, :, :-1] = t[:, :, 1:].clone()
            cached -= 1
        logits = decode_step(model, torch.tensor([ids[j]]), torch.tensor([cached]), kv_cache)[0]
        cached += 1
    return result(logprobs, time.perf_counter() - start, 0)


def result(logprobs: list[float], seconds: float, slides: int) -> dict:
    nll = -sum(logprobs) / len(logprobs)
    return {"perplexity": round(math.exp(nll), 3), "nll": round(nll, 5), "tokens": len(logprobs),
            "seconds": round(seconds, 3), "tokens_per_s": round(len(logprobs) / seconds, 2), "slides": slides}


def unigram_perplexity(ids: list[int], vocab_size: int) -> float:
    counts = torch.bincount(torch.tensor(ids), minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-float(logp[torch.tensor(ids)].mean()))


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fast = [r for r in rows if r["path"] == "fast"]
    fig, left = plt.subplots(figsize=(7, 4))
    strides = [r["stride"] for r in fast]
    left.plot(strides, [r["perplexity"] for r in fast], "o-", color="tab:blue", label="fast path perplexity")
    for r, style in ((next(r for r in rows if r["path"] == "slow"), "--"), (next(r for r in rows if r["path"] == "stale-cache"), ":")):
        left.axhline(r["perplexity"], linestyle=style, color="tab:blue", label=f"{r['path']} perplexity")
    left.set_xscale("log", base=2)
    left.set_xlabel("stride (tokens dropped per slide)")
    left.set_ylabel("held-out perplexity", color="tab:blue")
    right = left.twinx()
    right.plot(strides, [r["tokens_per_s"] for r in fast], "s-", color="tab:orange", label="fast path tokens/s")
    right.set_ylabel("tokens/s", color="tab:orange")
    lines = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    left.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="center right")
    left.set_title("cpm-tiny past the window: quality and speed against stride")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "cpm-tiny"))
    parser.add_argument("--text", default=None, help="held-out text [default: MODEL/heldout.txt]")
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--strides", default=None, help="comma-separated fast-path strides [default: 1,8,16,32,64,W/2]")
    parser.add_argument("--plot", default=str(ROOT / "benchmarks" / "results" / "quality.png"))
    parser.add_argument("--threads", type=int, default=None)
    options = parser.parse_args()
    if options.threads:
        torch.set_num_threads(options.threads)

    settings = Settings()
    settings.model.path, settings.runtime.device, settings.runtime.dtype = options.model, "cpu", "fp32"
    model = load_model(settings).model
    tokenizer = CPMTokenizer(Path(options.model) / "chinese_vocab.model")
    text = Path(options.text or Path(options.model) / "heldout.txt").read_text(encoding="utf-8")
    ids = tokenizer.encode(text)[:options.tokens]
    size = model.args.max_positions - 1
    strides = [int(s) for s in options.strides.split(",")] if options.strides else [1, 8, 16, 32, 64, size // 2]

    rows = [{"path": "slow", "stride": 1, **window_run(model, ids, Window(size, 1), fast=False)}]
    for stride in strides:
        rows.append({"path": "fast", "stride": stride, **window_run(model, ids, Window(size, stride), fast=True)})
    rows.append({"path": "stale-cache", "stride": 1, **stale_cache_run(model, ids, size)})

    slow = rows[0]
    for row in rows:
        row["perplexity_over_slow"] = round(row["perplexity"] / slow["perplexity"], 4)
        row["speed_over_slow"] = round(row["tokens_per_s"] / slow["tokens_per_s"], 2)
    plot_path = Path(options.plot)
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": options.model, "tokens": len(ids), "window": size, "windows_of_text": round(len(ids) / size, 1),
        "unigram_perplexity": round(unigram_perplexity(ids, model.args.vocab_size), 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "results": rows,
        "plot": str(plot_path) if plot(rows, plot_path) else None,
    }
    print(json.dumps(report, ensure_ascii=False, indent=1))

    from rich.console import Console
    from rich.table import Table

    table = Table("path", "stride", "perplexity", "vs slow", "tokens/s", "slides", title=f"{len(ids)} held-out tokens, window {size}")
    for row in rows:
        table.add_row(row["path"], str(row["stride"]), f"{row['perplexity']:.2f}", f"{row['perplexity_over_slow']:.3f}",
                      f"{row['tokens_per_s']:.1f}", str(row["slides"]))
    Console(stderr=True).print(table)


if __name__ == "__main__":
    sys.exit(main())
