"""Load test of `cpmgen serve` on loopback: N concurrent streaming clients, then 2x --max-batch.

The model has CPM-Small's layers (12 x 768, 12 heads) with random weights and the 8000-piece
vocab of models/cpm-tiny (vocab_size 8000 instead of CPM's 30000, so the output layer is a
quarter of CPM-Small's), fp32, written once to a temporary folder.

Part 1: for N = 1, 2, 4, 8, N clients each send streaming requests back to back (max_tokens
--tokens, their own seed per request) for --seconds; the sizes are interleaved round by
round (--rounds) and each figure is the median over rounds. Reported: aggregate tokens/s,
per-client tokens/s, time to first token p50/p95, and aggregate(N=8) / aggregate(N=1).

Part 2: a server with --max-batch B and --max-queue B/2 gets 2B clients at once: B run, B/2
wait, the rest get 429; every answered request is then sent again alone, and its text must be
the same (nothing lost or mixed between clients).

    .venv/bin/python benchmarks/bench_serve.py [--seconds 15] [--rounds 2] [--tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["今天天气很好，我们一起去公园散步。", "从前有座山，山里有座庙。", "中国经济持续发展，", "春天来了，花儿开了。"]


def checkpoint(folder: Path) -> Path:
    from cpmgen.config import ModelArgs
    from cpmgen.synthetic import write_megatron_checkpoint

    if not (folder / "latest_checkpointed_iteration.txt").is_file():
        import shutil

        write_megatron_checkpoint(folder, ModelArgs(num_layers=12, hidden_size=768, num_heads=12, vocab_size=8000))
        shutil.copy(ROOT / "models" / "cpm-tiny" / "chinese_vocab.model", folder / "chinese_vocab.model")
    return folder


class Server:
    def __init__(self, model: Path, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "cpmgen", "serve", "--model", str(model), "--port",
                                      str(self.port), *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.3)

    def close(self):
        self.proc.terminate()
        self.proc.wait(30)

    def stream(self, body: dict) -> dict:
        """One streaming request: status, text, tokens, time to first token, seconds."""
        start = time.perf_counter()
        request = urllib.request.Request(self.url + "/v1/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({**body, "stream": True}).encode())
        text, tokens, first = "", 0, None
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                for line in response:
                    line = line.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None:
                        first = time.perf_counter() - start
                    tokens += len(chunk["cpmgen"].get("ids", []))
                    text += chunk["choices"][0]["text"]
            status = 200
        except urllib.error.HTTPError as e:
            status = e.code
        return {"status": status, "text": text, "tokens": tokens, "ttft": first,
                "seconds": time.perf_counter() - start}


def load(server: Server, clients: int, seconds: float, tokens: int) -> dict:
    """`clients` threads sending requests back to back until `seconds` are over."""
    results: list[list[dict]] = [[] for _ in range(clients)]
    start = time.perf_counter()

    def client(i):
        k = 0
        while time.perf_counter() - start < seconds:
            results[i].append(server.stream({"prompt": PROMPTS[(i + k) % len(PROMPTS)], "max_tokens": tokens,
                                             "seed": 1000 * i + k}))
            k += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    done = [r for rs in results for r in rs]
    ttfts = sorted(r["ttft"] for r in done if r["ttft"] is not None)
    total = sum(r["tokens"] for r in done)
    return {"clients": clients, "seconds": round(elapsed, 2), "requests": len(done), "tokens": total,
            "aggregate_tokens_per_s": round(total / elapsed, 2),
            "per_client_tokens_per_s": round(total / elapsed / clients, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 3),
            "ttft_p95_s": round(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))], 3),
            "errors": sum(r["status"] != 200 for r in done)}


def overload(model: Path, max_batch: int, tokens: int, threads: list[str]) -> dict:
    server = Server(model, "--max-batch", str(max_batch), "--max-queue", str(max_batch // 2), *threads)
    try:
        bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens, "seed": 7 + i}
                  for i in range(2 * max_batch)]
        answers: list[dict] = [{} for _ in bodies]
        workers = [threading.Thread(target=lambda i=i: answers.__setitem__(i, server.stream(bodies[i])))
                   for i in range(len(bodies))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        answered = [i for i, a in enumerate(answers) if a["status"] == 200]
        alone = {i: server.stream(bodies[i]) for i in answered}  # the same request with nothing else running
        return {"max_batch": max_batch, "max_queue": max_batch // 2, "clients": len(bodies),
                "answered": len(answered), "rejected_429": sum(a["status"] == 429 for a in answers),
                "other_status": sorted({a["status"] for a in answers} - {200, 429}),
                "answered_equal_to_alone": sum(answers[i]["text"] == alone[i]["text"] and
                                               answers[i]["tokens"] == tokens for i in answered),
                "ttft_s_sorted": [round(answers[i]["ttft"], 2) for i in sorted(answered, key=lambda i: answers[i]["ttft"])]}
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--sizes", default="1,2,4,8")
    parser.add_argument("--threads", default="0", help="--threads of the server (0: cpmgen's automatic choice)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "serve.json"))
    opts = parser.parse_args()
    sizes = [int(s) for s in opts.sizes.split(",")]
    model = checkpoint(Path(tempfile.gettempdir()) / "cpmgen-bench-serve-small8k")
    threads = ["--threads", opts.threads]
    server = Server(model, "--max-batch", str(max(sizes)), "--max-queue", "0", *threads)
    try:
        server.stream({"prompt": PROMPTS[0], "max_tokens": 4})  # warm-up
        runs: dict[int, list[dict]] = {n: [] for n in sizes}
        for _ in range(opts.rounds):
            for n in sizes:
                runs[n].append(load(server, n, opts.seconds, opts.tokens))
    finally:
        server.close()
    table = []
    for n in sizes:
        row = {"clients": n}
        for key in ("aggregate_tokens_per_s", "per_client_tokens_per_s", "ttft_p50_s", "ttft_p95_s"):
            row[key] = round(statistics.median(r[key] for r in runs[n]), 3)
        row["requests"] = sum(r["requests"] for r in runs[n])
        row["errors"] = sum(r["errors"] for r in runs[n])
        table.append(row)
    result = {
        "model": "12 layers x 768 hidden, 12 heads, vocab 8000 (CPM-Small layers, cpm-tiny vocab), fp32, random",
        "machine": f"{os.cpu_count()} CPUs, shared with other jobs (noisy)",
        "seconds_per_run": opts.seconds, "rounds": opts.rounds, "max_tokens": opts.tokens,
        "load": table,
        "ratio_aggregate_max_over_1": round(table[-1]["aggregate_tokens_per_s"] / table[0]["aggregate_tokens_per_s"], 2),
        "overload": overload(model, 4, opts.tokens, threads),
    }
    text = json.dumps(result, indent=1, ensure_ascii=False)
    print(text)
    Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.output).write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
