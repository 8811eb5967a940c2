"""The bandwidth bound of batch-1 decode: memory bandwidth measured STREAM-style with torch on
the CPU, the bytes a model holds and the weight bytes one decode step reads, and the tokens/s
those imply; and the matrix-product rate that bounds a window's re-encode.

Batch-1 decode reads every weight once per token and writes almost nothing, so its rate is at
most the read bandwidth over the weight bytes per token; the benchmarks report each way of
running the model as a share of that bound.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cpmgen import hugepages, kernels, prepack
from cpmgen.model import CPMModel


def _best_seconds(reps: int, fn: Callable, *args, **kwargs) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return min(times)


def _gbs(nbytes: int, seconds: float) -> float:
    return round(nbytes / seconds / 1e9, 2)


def memory_bandwidth(threads: int | None = None, nbytes: int = 1 << 30, reps: int = 5) -> dict:
    """STREAM-style bandwidth in GB/s (1e9 bytes/s), best of `reps`, with `threads` torch threads
    (default: the process's count; restored afterwards). Arrays are fp32 of `nbytes` each, far
    beyond any cache, and touched before timing so page faults are not measured.

    - copy: c.copy_(a), counting the bytes read and written (2 x nbytes; the write-allocate
      read that plain stores also cause is not counted, as in STREAM);
    - read: a.sum(), counting the bytes read; a reduction writes nothing; `read_huge_gbs` the
      same on an array on 2 MB pages (cpmgen.hugepages, where available), as cpmgen places its
      weights;
    - triad: c = a + 3 b, counting 3 x nbytes;
    - linear_batch1: one row times an `nbytes` weight [n, 4096] in fp32 and bf16, counting the
      weight bytes, through F.linear (MKL's GEMV), through oneDNN on a weight prepacked for
      batch 1 and through cpmgen's GEMV (the two forms of cpmgen.prepack): the operation
      batch-1 decode is made of.

    `bound_gbs`, the figure for decode_bound: batch-1 decode reads every weight once per token
    and writes almost nothing, so its limit is the read bandwidth at the thread count it runs
    with, the better of the two page sizes. The linears are reported beside it, not folded in:
    the bound must not depend on the kernels it judges."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        used = torch.get_num_threads()
        n = nbytes // 4
        read, read_huge = read_gbs(nbytes, reps)
        a, b, c = torch.ones(n), torch.ones(n), torch.zeros(n)
        copy = _gbs(2 * nbytes, _best_seconds(reps, c.copy_, a))
        triad = _gbs(3 * nbytes, _best_seconds(reps, torch.add, a, b, alpha=3.0, out=c))
        del a, b, c
        linear = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            cols = 4096
            weight = torch.full((nbytes // (cols * dtype.itemsize), cols), 0.5, dtype=dtype)
            x = torch.full((1, cols), 0.5, dtype=dtype)
            size = weight.numel() * dtype.itemsize
            linear[f"{name}_mkl"] = _gbs(size, _best_seconds(reps, F.linear, x, weight))
            if kernels.loaded():
                gemv = kernels.op("gemv_linear")
                linear[f"{name}_cpmgen_gemv"] = _gbs(size, _best_seconds(reps, gemv, x, weight, None))
            if prepack.supported(torch.device("cpu"), dtype):
                packed = prepack.pack_weight(weight)
                del weight
                linear[f"{name}_onednn_packed"] = _gbs(size, _best_seconds(reps, prepack.packed_linear, x, packed, None))
                del packed
            else:
                del weight
    finally:
        torch.set_num_threads(previous)
    return {"threads": used, "array_bytes": nbytes, "reps": reps, "copy_gbs": copy, "read_gbs": read,
            "read_huge_gbs": read_huge, "triad_gbs": triad, "linear_batch1_gbs": linear,
            "bound_gbs": max(read, read_huge or 0.0),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def read_gbs(nbytes: int = 1 << 30, reps: int = 5) -> tuple[float, float | None]:
    """a.sum() over an fp32 array of `nbytes` in GB/s, best of `reps`, on normal pages and on 2 MB
    pages (None where huge pages are not available), with the process's torch threads."""
    n = nbytes // 4
    plain = torch.ones(n)
    read = _gbs(nbytes, _best_seconds(reps, plain.sum))
    del plain
    huge = hugepages.zeros((n,), torch.float32, "cpu").fill_(1.0) if hugepages.available() else None
    read_huge = _gbs(nbytes, _best_seconds(reps, huge.sum)) if huge is not None else None
    return read, read_huge


def read_bound_gbs(reps: int = 3) -> float:
    """The read bound alone (the better page size; see memory_bandwidth), quick enough to sample
    between measurements on a machine whose bandwidth changes during a run."""
    return max(value for value in read_gbs(reps=reps) if value is not None)


def matmul_gflops(rows: int, in_features: int, out_features: int, reps: int = 5) -> float:
    """The CPU's fp32 matrix-product rate in GFLOP/s (1e9 multiply-adds x 2 a second), best of
    `reps`, on a product of a re-encode's shape ([rows, in] x [out, in]^T), with the process's
    torch threads: the faster of F.linear (MKL, which takes its AVX2 code on AMD CPUs) and oneDNN
    on a weight prepacked for that many rows. The compute counterpart of the read bound: what a
    window's re-encode, a matrix product over its kept tokens, could run at."""
    x, weight = torch.full((rows, in_features), 0.5), torch.full((out_features, in_features), 0.5)
    seconds = _best_seconds(reps, F.linear, x, weight)
    if prepack.supported(torch.device("cpu"), torch.float32):
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)
        seconds = min(seconds, _best_seconds(reps, prepack.packed_linear, x, packed, None))
    return round(2 * rows * in_features * out_features / seconds / 1e9, 1)


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


def kv_bytes_per_token(model: CPMModel, prompt_tokens: int, new_tokens: int) -> int:
    """Mean bytes of KV cache a batch-1 decode step reads over a run of `new_tokens` steps after a
    `prompt_tokens` prompt: each step's attention reads the keys and values of every token so far
    (2 x layers x hidden values each, in the cache's dtype)."""
    args = model.args
    per_token = 2 * args.num_layers * args.hidden_size * model.kv_cache_dtype.itemsize
    mean_context = prompt_tokens + (new_tokens - 1) / 2
    return round(per_token * mean_context)


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
