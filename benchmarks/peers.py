"""Peer figures for the generation benchmark, measured in the same run on the same random weights:

1. memory bandwidth (STREAM-style, with torch on the CPU) and the batch-1 decode bound it implies;
2. HF transformers GPT2LMHeadModel.generate on the same weights, converted in-process through
   cpmgen's own mapping (cpmgen.checkpoint.hf), checked against cpmgen's logits and greedy tokens,
   and what it does past its 1024 positions;
3. the peak RSS of a generation, measured in a child process.

benchmarks/bench_generate.py imports this module (a script's own folder is on sys.path, so
`import peers` finds it) and runs all of it side by side with cpmgen's figures.

transformers is imported only inside the HF functions: the RSS child imports this module and
must not carry transformers' memory.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpmgen.checkpoint.hf import EOS_ID, hf_config, megatron_to_hf
from cpmgen.config import Settings
from cpmgen.generate import generate
from cpmgen.loading import load_model
from cpmgen.model import CPMModel
from cpmgen.sampling import SamplingParams
from cpmgen.window import Window

WINDOW = Window(1023, 256)  # the full 1023-token window; the runs here never fill it, so the stride is moot
GREEDY = SamplingParams(greedy=True)
MB = 1e6


def _best_seconds(reps: int, fn: Callable, *args, **kwargs) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def _gbs(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2)


def _ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# ----------------------------------------------------------------------------- bandwidth and bound


def memory_bandwidth(threads: int | None = None, nbytes: int = 1 << 30, reps: int = 5) -> dict:
    """STREAM-style bandwidth in GB/s (1e9 bytes/s), best of `reps`, with `threads` torch threads
    (default: the process's count; restored afterwards). Arrays are fp32 of `nbytes` each, far
    beyond any cache, and touched before timing so page faults are not measured.

    - copy: c.copy_(a), counting the bytes read and written (2 x nbytes; the write-allocate
      read that plain stores also cause is not counted, as in STREAM);
    - read: a.sum(), counting the bytes read; a reduction writes nothing;
    - triad: c = a + 3 b, counting 3 x nbytes;
    - linear_batch1: one row times an `nbytes` weight [n, 4096] in fp32 and bf16, counting the
      weight bytes, through F.linear (MKL's GEMV) and through oneDNN on a weight prepacked for
      batch 1 (what cpmgen.prepack runs): the operation batch-1 decode is made of.

    `bound_gbs`, the figure for decode_bound: batch-1 decode reads every weight once per token
    and writes almost nothing, so its limit is the read bandwidth at the thread count it runs
    with. The linears are reported beside it, not folded in: the bound must not depend on the
    kernels it judges."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()
        n = nbytes // 4
        a, b, c = torch.ones(n), torch.ones(n), torch.zeros(n)
        copy = _gbs(2 * nbytes, _best_seconds(reps, c.copy_, a))
        read = _gbs(nbytes, _best_seconds(reps, a.sum))
        triad = _gbs(3 * nbytes, _best_seconds(reps, torch.add, a, b, alpha=3.0, out=c))
        del a, b, c
        linear = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            cols = 4096
            weight = torch.full((nbytes // (cols * dtype.itemsize), cols), 0.5, dtype=dtype)
            x = torch.full((1, cols), 0.5, dtype=dtype)
            size = weight.numel() * dtype.itemsize
            linear[f"{name}_mkl"] = _gbs(size, _best_seconds(reps, F.linear, x, weight))
            if dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported():
                packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
                del weight
                linear[f"{name}_onednn_packed"] = _gbs(size, _best_seconds(
                    reps, torch.ops.mkldnn._linear_pointwise, x, packed, None, "none", [], ""))
                del packed
            else:
                del weight
    finally:
        torch.set_num_threads(previous)
    return {"threads": used, "array_bytes": nbytes, "reps": reps, "copy_gbs": copy, "read_gbs": read,
            "triad_gbs": triad, "linear_batch1_gbs": linear, "bound_gbs": read,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def decode_bound(bandwidth_gbs: float, weight_bytes: int) -> float:
    """Tokens/s if a decode step cost only the reading of `weight_bytes` at `bandwidth_gbs` GB/s."""
    return round(bandwidth_gbs * 1e9 / weight_bytes, 2)


def _tensor_bytes(tensor: torch.Tensor) -> int:
    # Not the storage's nbytes: oneDNN's prepacked (opaque) tensors have no storage to ask.
    # numel x element_size works for every layout, quantized ones too; for a blocked oneDNN
    # layout it leaves out any padding to the block size (none for CPM's sizes, multiples of 16).
    return tensor.numel() * tensor.element_size()


def _model_tensors(model: nn.Module):
    """(owning module, tensor) for every distinct tensor the model holds, each once (by identity,
    so a tied tensor counts once): parameters and buffers, non-persistent ones included (the
    oneDNN-prepacked weights of cpmgen.prepack, which state_dict() leaves out)."""
    seen = set()
    for module in model.modules():
        for tensor in itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield module, tensor


def model_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds, each once: what holding the model costs."""
    return sum(_tensor_bytes(tensor) for _, tensor in _model_tensors(model))


def weight_bytes_per_token(model: CPMModel) -> int:
    """Bytes of weights one batch-1 decode step reads.

    Every tensor the model holds is read once (linears and LayerNorms, weights and biases, in
    whatever form: plain, oneDNN-prepacked, int8), except the embedding tables, of which a step
    reads one row each (the new token's word, its position). The output layer reads a whole
    vocab x hidden matrix: a tensor of that size outside the embeddings (a packed or quantized
    copy of the tied head) is counted above already; without one the output layer reads the
    word-embedding matrix itself, counted once more in full. The KV cache a step also reads
    (2 x layers x hidden x context elements) is not included: it depends on the context, not on
    the model."""
    embeddings = [module for module in model.modules() if isinstance(module, nn.Embedding)]
    head_numel = model.word_embeddings.weight.numel()
    total, head_seen = 0, False
    for owner, tensor in _model_tensors(model):
        if any(owner is embedding for embedding in embeddings):
            total += _tensor_bytes(tensor) // owner.num_embeddings
        else:
            total += _tensor_bytes(tensor)
            head_seen = head_seen or tensor.numel() == head_numel
    if not head_seen:
        total += _tensor_bytes(model.word_embeddings.weight)
    return total


# ----------------------------------------------------------------------------- HF transformers


def hf_model_from_cpmgen(model: CPMModel, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """A transformers GPT2LMHeadModel holding `model`'s weights in `dtype`, built in-process with
    cpmgen's own mapping (megatron_to_hf renames and transposes the Conv1D weights; hf_config sets
    gelu_new, i.e. tanh GELU, the LayerNorm eps, no dropout, tied output layer).

    `model` must hold the plain CPMModel state: load it with runtime.prepack False and no
    quantization (the packed and int8 forms have no Linear weights to convert). Tensors that
    need no transpose are shared with `model` when it is in `dtype` already. HF masks with the
    dtype's minimum where CPM uses -10000; both give the masked keys a probability of exactly 0.
    `attn_implementation` is "sdpa" or "eager"; choose_attn_implementation times both."""
    from transformers import GPT2Config, GPT2LMHeadModel

    try:
        state = megatron_to_hf({name: tensor.detach().to(dtype) for name, tensor in model.state_dict().items()})
    except ValueError as e:
        raise ValueError(f"{e}: pass a plain CPMModel (runtime.prepack False, runtime.quantize none)") from None
    config = GPT2Config(**hf_config(model.args, dtype), attn_implementation=attn_implementation)
    with torch.device("meta"):  # no random initialisation: every tensor comes from `state`
        hf = GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if missing != ["lm_head.weight"] or unexpected:
        raise ValueError(f"HF GPT-2 state mismatch: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    if hf.lm_head.weight is not hf.transformer.wte.weight:
        raise ValueError("lm_head.weight is not tied to transformer.wte.weight")
    if hf.config._attn_implementation != attn_implementation:
        raise ValueError(f"asked for {attn_implementation} attention, got {hf.config._attn_implementation}")
    # the ids generate() would otherwise warn about; EOS_ID is CPM's </s>
    hf.generation_config.pad_token_id = EOS_ID
    hf.generation_config.eos_token_id = EOS_ID
    return hf.eval().requires_grad_(False)


def hf_logits_diff(model: CPMModel, hf_model, tokens: int = 64, seed: int = 0) -> dict:
    """Both models on the same random ids, no cache: max |HF - cpmgen| over all logits, the
    largest logit for scale, and the share of positions whose argmax agrees."""
    ids = torch.tensor([_ids(tokens, model.args.vocab_size, seed)], device=model.word_embeddings.weight.device)
    with torch.inference_mode():
        ours = model(ids, torch.arange(tokens, device=ids.device)).float()
        theirs = hf_model(input_ids=ids).logits.float()
    return {"tokens": tokens, "dtype": str(hf_model.dtype).removeprefix("torch."),
            "attn_implementation": hf_model.config._attn_implementation,
            "max_abs_diff": float((theirs - ours).abs().max()), "max_abs_logit": float(ours.abs().max()),
            "argmax_agree": float((theirs.argmax(-1) == ours.argmax(-1)).float().mean())}


class _TokenClock:
    """A streamer for generate() (the interface of transformers' BaseStreamer, put and end, which
    generate() only calls) that timestamps each put: the first is the prompt, before the
    prefill; every later one a new token, right after it was chosen."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate(hf_model, prompt_ids: list[int], new_tokens: int, streamer=None) -> list[int]:
    """Greedy, exactly `new_tokens` new tokens (min_new_tokens keeps EOS from ending it), with cache."""
    ids = torch.tensor([prompt_ids], device=hf_model.device)
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                                pad_token_id=EOS_ID, eos_token_id=EOS_ID, streamer=streamer)
    return out[0, len(prompt_ids):].tolist()


def _rate_figures(runs: list[list[float]], prompt_tokens: int) -> dict:
    """Per-token timestamps of several runs (each [start, token 1, token 2, ...]) -> the figures
    of the run with the fastest decode, and every run's rate: other work on the machine slows
    some runs, never speeds one up."""
    def decode_s(times):
        return times[-1] - times[1]

    best = min(runs, key=decode_s)
    decode_tokens = len(best) - 2
    return {"threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
            "first_token_s": round(best[1] - best[0], 4), "decode_s": round(decode_s(best), 4),
            "tokens_per_s": round(decode_tokens / decode_s(best), 3),
            "tokens_per_s_runs": [round(decode_tokens / decode_s(times), 3) for times in runs]}


def hf_generate_rate(hf_model, prompt_ids: list[int], new_tokens: int, reps: int = 3) -> dict:
    """HF greedy generate of `new_tokens` tokens after `prompt_ids`, timed per token by a streamer:
    the first token (the prompt's prefill) apart from the `new_tokens - 1` decode steps after it;
    the fastest of `reps` runs, after a short untimed one that takes the one-time costs."""
    _hf_generate(hf_model, prompt_ids, 4)
    runs = []
    for _ in range(reps):
        clock = _TokenClock()
        start = time.perf_counter()
        _hf_generate(hf_model, prompt_ids, new_tokens, clock)
        runs.append([start] + clock.times[1:])  # times[0] is the prompt's put, before the prefill
    return {"impl": "transformers", "dtype": str(hf_model.dtype).removeprefix("torch."),
            "attn_implementation": hf_model.config._attn_implementation, **_rate_figures(runs, len(prompt_ids))}


def choose_attn_implementation(hf_model, prompt_ids: list[int], new_tokens: int, reps: int = 3) -> dict:
    """Time hf_generate_rate with "sdpa" and "eager" attention, leave `hf_model` on the faster,
    and return {"attn_implementation": the faster, "rates": both rates}."""
    rates = {}
    for attn in ("sdpa", "eager"):
        hf_model.set_attn_implementation(attn)
        rates[attn] = hf_generate_rate(hf_model, prompt_ids, new_tokens, reps)
    faster = max(rates, key=lambda attn: rates[attn]["tokens_per_s"])
    hf_model.set_attn_implementation(faster)
    return {"attn_implementation": faster, "rates": rates}


def cpmgen_generate_rate(model: CPMModel, prompt_ids: list[int], new_tokens: int, reps: int = 3) -> dict:
    """The same figures as hf_generate_rate for cpmgen's fast path (WINDOW, greedy), for a
    side-by-side comparison at the same prompt, count and thread count."""
    def run(count: int) -> list[float]:
        times = [time.perf_counter()]
        for _ in generate(model, prompt_ids, WINDOW, GREEDY, count):
            times.append(time.perf_counter())
        return times

    run(4)
    return {"impl": "cpmgen", "dtype": str(model.word_embeddings.weight.dtype).removeprefix("torch."),
            **_rate_figures([run(new_tokens) for _ in range(reps)], len(prompt_ids))}


def greedy_agreement(model: CPMModel, hf_model, prompt_ids: list[int], new_tokens: int) -> dict:
    """Whether HF's greedy tokens equal cpmgen's (fast path, WINDOW) for `new_tokens` tokens.

    Reported, not asserted: different summation orders can flip a near tie, after which the two
    continuations part for good. HF cannot emit EOS here (min_new_tokens) while cpmgen can;
    with 30000 random-weight logits that matters only if cpmgen picks EOS (id 2)."""
    ours = [tokens[0] for tokens in generate(model, prompt_ids, WINDOW, GREEDY, new_tokens)]
    theirs = _hf_generate(hf_model, prompt_ids, new_tokens)
    mismatch = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    return {"compared": new_tokens, "equal": ours == theirs, "first_mismatch": mismatch,
            "dtype": str(hf_model.dtype).removeprefix("torch.")}


def hf_past_window(hf_model, prompt_ids: list[int], new_tokens: int) -> dict:
    """What HF generate does when prompt + new tokens pass the model's n_positions (1024): GPT-2
    has no window to slide, so it is expected to fail on the position embedding lookup."""
    positions = len(prompt_ids) + new_tokens
    try:
        _hf_generate(hf_model, prompt_ids, new_tokens)
    except Exception as e:  # whatever it raises is the finding
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {"positions": positions, "fails": True, "error": f"{type(e).__name__}: {message}"}
    return {"positions": positions, "fails": False, "error": ""}


# ----------------------------------------------------------------------------- peak RSS


def apply_extra_settings(settings: Settings, extra: dict | None) -> None:
    """Set {"section.key": value} on `settings`; an unknown section or key is an error."""
    for key, value in (extra or {}).items():
        section_name, _, field = key.partition(".")
        section = getattr(settings, section_name, None)
        if section is None or not field or not hasattr(section, field):
            raise ValueError(f"unknown setting {key!r}: expected section.key of cpmgen.config.Settings")
        setattr(section, field, value)


def load_cpmgen(checkpoint: str, preset: str, dtype: str, extra_settings: dict | None = None) -> CPMModel:
    """The model as bench_generate.load() loads it, in `dtype` (fp32, bf16, fp16), with extra settings."""
    settings = Settings()
    settings.model.path = str(checkpoint)
    settings.model.preset = preset
    settings.runtime.device = "cpu"
    settings.runtime.dtype = dtype
    apply_extra_settings(settings, extra_settings)
    return load_model(settings).model


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


def _rss_child(baseline: int, request: dict) -> None:
    """In the child: load, note the weight and KV cache bytes, generate, print the figures as JSON."""
    model = load_cpmgen(request["checkpoint"], request["preset"], request["dtype"], request["extra_settings"])
    loaded = peak_rss_bytes()
    weights = model_bytes(model)
    cache = model.new_kv_cache(1, WINDOW.size)
    kv = cache.nbytes
    del cache  # freed before generate() allocates its own, so it is not counted twice
    prompt = _ids(32, model.args.vocab_size, 1)
    for _ in generate(model, prompt, WINDOW, GREEDY, request["new_tokens"]):
        pass
    print(json.dumps({"baseline": baseline, "loaded": loaded, "peak": peak_rss_bytes(), "weights": weights, "kv": kv}))


def peak_rss_of_generation(checkpoint: str, preset: str, dtype: str, new_tokens: int,
                           extra_settings: dict | None = None) -> dict:
    """Peak RSS of a fresh process that loads the model (load_cpmgen) and greedily generates
    `new_tokens` tokens after a 32-token prompt with the fast path, WINDOW's cache.

    Figures in MB (1e6 bytes), from peak_rss_bytes: peak (at the end), baseline (right after
    `import torch`, before cpmgen is imported), loaded (once the model is loaded,
    before generating: tells a loading peak from a generation one), weights (model_bytes: what
    the loaded model holds, packed copies included), kv (the K and V buffers of
    model.new_kv_cache(1, 1023)), and peak_minus_weights_kv, which the performance issue wants
    at most 300 MB (peak <= weights + KV cache + 300 MB); peak_minus_baseline_weights_kv also
    takes off what importing torch alone costs. Weights the loader leaves memory-mapped (fp32,
    unconverted) count in RSS once their pages are read."""
    apply_extra_settings(Settings(), extra_settings)  # fail here, not in the child
    request = {"checkpoint": str(checkpoint), "preset": preset, "dtype": dtype, "new_tokens": new_tokens,
               "extra_settings": extra_settings or {}}
    # the baseline is read (as peak_rss_bytes reads it) before anything but torch is imported
    code = ("import sys, torch\n"
            "baseline = next(int(line.split()[1]) * 1024 for line in open('/proc/self/status')\n"
            "                if line.startswith('VmHWM:'))\n"
            f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            "import json, peers\n"
            "peers._rss_child(baseline, json.loads(sys.argv[1]))\n")
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
                round((child["peak"] - child["baseline"] - child["weights"] - child["kv"]) / MB, 1)}
