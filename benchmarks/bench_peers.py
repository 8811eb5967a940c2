"""cpmgen against the CPU engines a GPT-2 user would otherwise pick, on the same weights, in one run.

The random CPM-Small checkpoint of bench_generate.py (12 x 768, vocab 30000, 1024 positions) runs in:
- cpmgen at fp32, bf16, --quantize int8 and int4;
- HF transformers GPT2LMHeadModel (fp32, bf16), built from cpmgen's weights (hf_baseline.py);
- CTranslate2 (float32, bfloat16, int8_float32), its model converted from that HF model by its
  transformers loader, with a placeholder vocabulary (token strings t0, t1, ...: only ids matter);
- llama.cpp through llama-cpp-python (f32, f16, q8_0, q4_0): a GGUF written with the `gguf`
  package (gpt2 architecture, placeholder vocabulary), quantized by llama.cpp itself.
A peer whose package is missing (`pip install -e ".[peers]"`) is reported as skipped.

Each engine runs in a process of its own (CTranslate2 brings its own OpenMP runtime, and in one
process with it cpmgen decoded at half its speed), loaded once and driven through a pipe, so the
rounds still interleave. Each system decodes greedily after a short (16-token) and a long
(~900-token) prompt with 2 threads; the decode rate is (tokens - 1) / (time of the last token - time of the first),
timestamped per token, so the prompt's prefill is left out. Systems are interleaved round by
round and the median of the rounds is reported, beside the read-bandwidth bound measured in
the same run (bandwidth.read_bound_gbs) over the weight bytes each system reads per token (the
KV cache a long context also reads is not in the bound). Each system's top-1 over 32 positions
of a random sequence is compared with cpmgen fp32's, with the largest logit difference, so no
one is timing a broken model: random weights give nearly tied logits, so quantized precisions
agree less than they would on a trained model, while a broken conversion agrees at chance
(about 0).

    .venv/bin/python benchmarks/bench_peers.py [--rounds 5] [--tokens 32]  (make bench-peers)
    .venv/bin/python benchmarks/bench_peers.py --quick --engines llama.cpp  # a check, 1 round of 8 tokens

Prints one JSON object on stdout and a table on stderr; a full run also writes it to
benchmarks/results/peers.json (a --quick run only where --output says).
"""

from __future__ import annotations

import argparse
import copy
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from cpmgen.threads import configure_wait_policy

configure_wait_policy()  # the cpmgen command's OpenMP wait policy, set before torch loads OpenMP
import torch  # noqa: E402

import bandwidth
import hf_baseline
from cpmgen.checkpoint.hf import EOS_ID, megatron_to_hf
from cpmgen.config import PRESETS
from cpmgen.generate import generate
from timing import TokenClock
from workload import GREEDY, WINDOW, ensure_checkpoint, load_cpmgen, random_ids

PRESET = "cpm-small"  # the checkpoint bench_generate.py measures
PEERS = ("transformers", "ctranslate2", "llama.cpp")
SHORT, LONG = 16, 900
AGREE_TOKENS = 32  # positions compared with cpmgen fp32's top-1
RESULTS = Path(__file__).with_name("results") / "peers.json"


class System:
    """name, precision, bytes read per token; decode(prompt, n) -> per-token timestamps;
    logits(ids) -> [len(ids), vocab] numpy."""

    def __init__(self, engine: str, precision: str, weight_bytes: int, decode, logits):
        self.engine, self.precision, self.weight_bytes = engine, precision, weight_bytes
        self.decode, self.logits = decode, logits

    @property
    def name(self) -> str:
        return f"{self.engine} {self.precision}"


def serve(engine: str, checkpoint: Path, folder: Path, conn) -> None:
    """A worker process: build `engine`'s systems, send [(engine, precision, weight bytes)] (or an
    error's text), then answer ("decode", system, prompt, n) and ("logits", system, ids, None)
    until None comes."""
    torch.set_num_threads(2)
    try:
        if engine == "cpmgen":
            systems = cpmgen_systems(checkpoint)
        else:
            plain = load_cpmgen(checkpoint, PRESET, "fp32", {"runtime.prepack": False})
            makers = {"transformers": lambda: hf_systems(plain), "ctranslate2": lambda: ctranslate2_systems(plain, folder),
                      "llama.cpp": lambda: llama_cpp_systems(plain, folder)}
            systems = makers[engine]()
    except Exception as e:  # a missing package or a converter that fails: reported, the others go on
        conn.send(f"{type(e).__name__}: {e}")
        return
    conn.send([(s.engine, s.precision, s.weight_bytes) for s in systems])
    while (message := conn.recv()) is not None:
        op, index, ids, n = message
        conn.send(systems[index].decode(ids, n) if op == "decode" else systems[index].logits(ids))


class Remote(System):
    """A system of a worker process, called through its pipe."""

    def __init__(self, conn, index: int, engine: str, precision: str, weight_bytes: int):
        super().__init__(engine, precision, weight_bytes,
                         lambda prompt, n: self.call("decode", prompt, n), lambda ids: self.call("logits", ids, None))
        self.conn, self.index = conn, index

    def call(self, op: str, ids: list[int], n):
        self.conn.send((op, self.index, ids, n))
        return self.conn.recv()


def start_workers(engines: list[str], checkpoint: Path, folder: Path) -> tuple[list[System], dict, list]:
    """(systems, skipped engines with why, worker processes), one worker per engine, started one
    after another (each converts its weights alone)."""
    context = multiprocessing.get_context("spawn")
    systems, skipped, processes = [], {}, []
    for engine in engines:
        conn, child = context.Pipe()
        process = context.Process(target=serve, args=(engine, checkpoint, folder, child), daemon=True)
        process.start()
        info = conn.recv()
        if isinstance(info, str):
            skipped[engine] = info
            print(f"skipping {engine}: {info}", file=sys.stderr)
            process.join()
            continue
        processes.append((process, conn))
        systems += [Remote(conn, i, *row) for i, row in enumerate(info)]
    return systems, skipped, processes


def cpmgen_systems(checkpoint: Path) -> list[System]:
    systems = []
    for precision, dtype, extra in (("fp32", "fp32", {}), ("bf16", "bf16", {}),
                                    ("int8", "fp32", {"runtime.quantize": "int8"}),
                                    ("int4", "fp32", {"runtime.quantize": "int4"})):
        model = load_cpmgen(str(checkpoint), PRESET, dtype, extra)

        def decode(prompt, n, model=model):
            times = [time.perf_counter()]
            for _ in generate(model, prompt, WINDOW, GREEDY, n):
                times.append(time.perf_counter())
            return times[1:]

        def logits(ids, model=model):
            with torch.inference_mode():
                return model(torch.tensor([ids]), torch.arange(len(ids)))[0].float().numpy()

        systems.append(System("cpmgen", precision, bandwidth.weight_bytes_per_token(model), decode, logits))
    return systems


def hf_systems(plain) -> list[System]:
    systems = []
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        hf = hf_baseline.hf_model_from_cpmgen(plain, dtype)

        def decode(prompt, n, hf=hf):
            clock = TokenClock()
            hf_baseline.hf_generate(hf, prompt, n, clock)
            return clock.times[1:]

        def logits(ids, hf=hf):
            with torch.inference_mode():
                return hf(input_ids=torch.tensor([ids])).logits[0].float().numpy()

        # every parameter once (the tied head is read whole; the position table a row a step)
        nbytes = sum(p.numel() * p.element_size() for p in hf.parameters())
        wpe = hf.transformer.wpe.weight
        systems.append(System("transformers", precision, nbytes - wpe.numel() * wpe.element_size(), decode, logits))
    return systems


def ctranslate2_systems(plain, folder: Path) -> list[System]:
    import ctranslate2
    from ctranslate2.converters.transformers import GPT2Loader

    # A copy: the converter works on numpy views of the HF tensors, which share memory with
    # `plain` (and with the transformers system); its conversions changed them in place.
    hf = hf_baseline.hf_model_from_cpmgen(copy.deepcopy(plain), torch.float32)
    vocab = [f"t{i}" for i in range(plain.args.vocab_size)]
    systems = []
    supported = ctranslate2.get_supported_compute_types("cpu")
    for precision, compute in (("fp32", "float32"), ("bf16", "bfloat16"), ("int8", "int8_float32")):
        if compute not in supported:
            continue
        out = folder / f"ct2-{compute}"
        spec = GPT2Loader().get_model_spec(hf)
        spec.register_vocabulary(vocab)
        spec.config.bos_token = spec.config.eos_token = spec.config.unk_token = vocab[EOS_ID]
        spec.validate()
        spec.optimize(quantization=compute)
        out.mkdir()
        spec.save(str(out))
        generator = ctranslate2.Generator(str(out), device="cpu", compute_type=compute, intra_threads=2)

        def decode(prompt, n, generator=generator):
            times = []
            for _ in generator.generate_tokens([vocab[i] for i in prompt], max_length=n, sampling_topk=1,
                                               end_token=[]):
                times.append(time.perf_counter())
            return times

        def logits(ids, generator=generator):
            return np.array(generator.forward_batch([[vocab[i] for i in ids]]))[0]

        # model.bin holds the tied embedding once (read whole as the output layer); the position table a row a step
        positions = plain.args.max_positions * plain.args.hidden_size * 4
        systems.append(System("ctranslate2", precision, (out / "model.bin").stat().st_size - positions, decode, logits))
    return systems


def llama_cpp_systems(plain, folder: Path) -> list[System]:
    import llama_cpp

    f32 = folder / "cpm-f32.gguf"
    write_gguf(plain, f32, np.float32)
    f16 = folder / "cpm-f16.gguf"
    write_gguf(plain, f16, np.float16)
    files = {"f32": f32, "f16": f16}
    for name, ftype in (("q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0)):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = ftype
        params.nthread = 2
        files[name] = folder / f"cpm-{name}.gguf"
        if llama_cpp.llama_model_quantize(str(f32).encode(), str(files[name]).encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not quantize to {name}")
    systems = []
    for precision, path in files.items():
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=1024, n_threads=2, n_threads_batch=2,
                              logits_all=True, verbose=False)

        def decode(prompt, n, llm=llm):
            llm.reset()
            llm.eval(prompt)
            times = []
            for _ in range(n):
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                times.append(time.perf_counter())
                llm.eval([token])
            return times

        def logits(ids, llm=llm):
            llm.reset()
            llm.eval(ids)
            return np.array(llm.scores[:len(ids)])

        # token_embd is the output layer too (read whole); position_embd (f32) a row a step
        positions = plain.args.max_positions * plain.args.hidden_size * 4
        systems.append(System("llama.cpp", precision, path.stat().st_size - positions, decode, logits))
    return systems


def write_gguf(plain, path: Path, dtype) -> None:
    """A GGUF of the gpt2 architecture holding `plain`'s weights (HF layout: Conv1D weights are
    [in, out], which GGUF stores as ggml's [out, in] linear weights after a transpose)."""
    import gguf

    args = plain.args
    state = {k: v.float().numpy() for k, v in megatron_to_hf(plain.state_dict()).items()}
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_context_length(args.max_positions)
    writer.add_embedding_length(args.hidden_size)
    writer.add_feed_forward_length(args.ffn_size)
    writer.add_block_count(args.num_layers)
    writer.add_head_count(args.num_heads)
    writer.add_layer_norm_eps(args.layernorm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == np.float32 else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"t{i}" for i in range(args.vocab_size)])
    writer.add_token_types([gguf.TokenType.NORMAL] * args.vocab_size)
    writer.add_token_merges(["t 0"])
    writer.add_eos_token_id(EOS_ID)
    writer.add_bos_token_id(EOS_ID)
    names = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm", "ln_1": "attn_norm",
             "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up",
             "mlp.c_proj": "ffn_down"}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue  # tied: llama.cpp's gpt2 reads token_embd for the output layer
        parts = name.removeprefix("transformer.").split(".")
        block = f"blk.{parts[1]}." if parts[0] == "h" else ""
        module = ".".join(parts[2:-1] if block else parts[:-1])
        if block and parts[-1] == "weight" and tensor.ndim == 2:
            tensor = tensor.T  # Conv1D [in, out] -> [out, in]
        matrix = tensor.ndim == 2
        writer.add_tensor(f"{block}{names[module]}.{parts[-1]}", np.ascontiguousarray(tensor.astype(dtype if matrix else np.float32)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a check that every system runs and agrees: 1 round of 8 tokens, no results file")
    parser.add_argument("--rounds", type=int, help="interleaved rounds, the median reported (default 5, quick 1)")
    parser.add_argument("--tokens", type=int, help="tokens decoded per measurement (default 32, quick 8)")
    parser.add_argument("--engines", default=",".join(PEERS),
                        help=f"comma-separated peers to run beside cpmgen (default {','.join(PEERS)})")
    parser.add_argument("--output", help="write the JSON here too (default: benchmarks/results/peers.json; "
                                         "quick: nowhere)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.tokens = args.tokens or (8 if args.quick else 32)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(args.engines) - set(PEERS)
    if unknown:
        parser.error(f"--engines: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PEERS)}")
    if args.output is None and not args.quick:
        args.output = str(RESULTS)
    return args


def print_table(result: dict) -> None:
    def out(line: str) -> None:
        print(line, file=sys.stderr)

    out(f"read bandwidth {result['read_gbs']:.1f} GB/s (median of {result['read_gbs_rounds']}), "
        f"{result['threads']} threads, {result['rounds']} rounds of {result['decode_tokens']} tokens")
    out(f"{'system':<24}{'MB/token':>9}{'bound':>7}{'short tok/s':>12}{'of bound':>9}{'long tok/s':>11}"
        f"{'of bound':>9}{'top-1':>7}{'max |dlogit|':>13}")
    for r in result["systems"]:
        out(f"{r['engine'] + ' ' + r['precision']:<24}{r['weight_mb_per_token']:>9}{r['bound_tokens_per_s']:>7}"
            f"{r['short_tokens_per_s']:>12}{r['short_of_bound']:>9}{r['long_tokens_per_s']:>11}"
            f"{r['long_of_bound']:>9}{r['top1_agree_with_cpmgen_fp32']:>7.2f}"
            f"{r['max_abs_logit_diff_with_cpmgen_fp32']:>13.2g}")
    for engine, why in result["skipped"].items():
        out(f"{engine}: skipped ({why})")


def main(argv=None) -> int:
    args = parse_args(argv)
    checkpoint = ensure_checkpoint(PRESET, log=lambda line: print(line, file=sys.stderr))
    work = Path(tempfile.mkdtemp(prefix="cpmgen-peers-"))
    systems, skipped, processes = start_workers(["cpmgen", *args.engines], checkpoint, work)
    vocab_size = PRESETS[PRESET].vocab_size

    ids = random_ids(AGREE_TOKENS, vocab_size, 7)
    reference_logits = systems[0].logits(ids)
    reference = reference_logits.argmax(-1)
    prompts = {"short": random_ids(SHORT, vocab_size, 1), "long": random_ids(LONG, vocab_size, 2)}
    rates = {(s.name, c): [] for s in systems for c in prompts}
    read_rounds = []
    torch.set_num_threads(2)  # the bandwidth measurement's threads, in this process
    for s in systems:
        s.decode(prompts["short"], 4)  # one-time costs out of the way
    for _ in range(args.rounds):
        read_rounds.append(bandwidth.read_bound_gbs())  # 2 threads (set above), the better page size
        for s in systems:
            for context, prompt in prompts.items():
                times = s.decode(prompt, args.tokens)
                rates[(s.name, context)].append((len(times) - 1) / (times[-1] - times[0]))
    read = statistics.median(read_rounds)
    rows = []
    for s in systems:
        bound = read * 1e9 / s.weight_bytes
        logits = s.logits(ids)
        row = {"engine": s.engine, "precision": s.precision, "weight_mb_per_token": round(s.weight_bytes / 1e6, 1),
               "bound_tokens_per_s": round(bound, 1),
               "top1_agree_with_cpmgen_fp32": float((logits.argmax(-1) == reference).mean()),
               "max_abs_logit_diff_with_cpmgen_fp32": round(float(np.abs(logits - reference_logits).max()), 6)}
        for context in prompts:
            median = statistics.median(rates[(s.name, context)])
            row[f"{context}_tokens_per_s"] = round(median, 2)
            row[f"{context}_of_bound"] = round(median / bound, 3)
            row[f"{context}_rounds"] = [round(r, 2) for r in rates[(s.name, context)]]
        rows.append(row)
    result = {"preset": PRESET, "threads": 2, "quick": args.quick, "rounds": args.rounds, "decode_tokens": args.tokens,
              "prompt_tokens": {"short": SHORT, "long": LONG}, "read_gbs_rounds": read_rounds, "read_gbs": read,
              "systems": rows, "skipped": skipped}
    for process, conn in processes:
        conn.send(None)
        process.join()
    print_table(result)
    text = json.dumps(result, indent=1) + "\n"
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
