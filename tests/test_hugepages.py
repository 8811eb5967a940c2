"""Weights and KV caches on 2 MB pages (cpmgen/hugepages.py): placed on a huge-page boundary with
their whole 2 MB pages advised MADV_HUGEPAGE, values bitwise unchanged, tensors keep their
identity (tied weights stay tied), memory goes back when the tensors go."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch

from cpmgen import hugepages
from cpmgen.config import Settings
from cpmgen.generate import generate
from cpmgen.loading import load_model
from cpmgen.model import CPMModel, decode_step
from cpmgen.quantize import quantize_model
from cpmgen.sampling import SamplingParams
from cpmgen.synthetic import random_state_dict
from cpmgen.window import Window

from helpers import TINY

needs_thp = pytest.mark.skipif(not hugepages.available(), reason="transparent huge pages are off or not Linux")


def advised(tensor: torch.Tensor) -> bool:
    """The mapping holding `tensor` is advised MADV_HUGEPAGE ("hg" among its VmFlags)."""
    address, start, end = tensor.data_ptr(), None, None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and all(c in "0123456789abcdef-" for c in fields[0]):
                start, end = (int(part, 16) for part in fields[0].split("-"))
            elif fields[0] == "VmFlags:" and start is not None and start <= address < end:
                return "hg" in fields[1:]
    return False


@needs_thp
def test_zeros_are_zeros_on_a_huge_page_boundary():
    tensor = hugepages.zeros((3, 5, 70_000), torch.float32, "cpu")
    assert tensor.shape == (3, 5, 70_000) and tensor.dtype == torch.float32 and tensor.is_contiguous()
    assert torch.count_nonzero(tensor) == 0
    assert tensor.data_ptr() % hugepages.HUGE_PAGE == 0 and tensor.storage_offset() == 0 and advised(tensor)
    tensor.fill_(2.5)
    assert tensor.sum().item() == 2.5 * tensor.numel()


def test_zeros_less_than_a_huge_page_or_off_the_cpu_are_plain(monkeypatch):
    small = hugepages.zeros((10,), torch.bfloat16, "cpu")
    assert small.dtype == torch.bfloat16 and torch.count_nonzero(small) == 0
    assert not advised(small)  # no whole 2 MB page to advise: nothing rounded up
    monkeypatch.setattr(hugepages, "available", lambda: False)
    plain = hugepages.zeros((4, 4), torch.float32, "cpu")
    assert torch.equal(plain, torch.zeros(4, 4)) and not advised(plain)


def test_the_memory_goes_back_with_the_last_tensor():
    def resident_kb() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))

    before = resident_kb()
    tensor = hugepages.zeros((64 << 20,), torch.uint8, "cpu")
    tensor.fill_(1)
    assert resident_kb() - before >= 60 << 10
    view = tensor[1:]
    del tensor
    gc.collect()
    assert resident_kb() - before >= 60 << 10  # a view keeps the mapping
    del view
    gc.collect()
    assert resident_kb() - before < 16 << 10


def tiny_model(seed: int = 0) -> CPMModel:
    args = dataclasses.replace(TINY, hidden_size=256, vocab_size=3000)  # linears of 256 KB and more
    model = CPMModel(args)
    model.load_state_dict(random_state_dict(args, seed=seed))
    return model.requires_grad_(False)


@needs_thp
def test_a_model_moves_bitwise_keeping_its_tensors_and_their_ties():
    model = tiny_model()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    parameters = dict(model.named_parameters())
    big = [name for name, t in parameters.items() if t.numel() * t.element_size() >= 256 << 10]
    assert "word_embeddings.weight" in big and "transformer.layers.0.mlp.dense_h_to_4h.weight" in big
    released = []
    moved = hugepages.use_huge_pages(hugepages.streamed_tensors(model), released.append)
    assert moved >= sum(parameters[name].numel() * 4 for name in big)
    assert len(released) == len(big)
    assert dict(model.named_parameters()) == parameters  # the same Parameter objects
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
        assert advised(tensor) == (name in big), name
    assert model.word_embeddings.weight.data_ptr() % hugepages.HUGE_PAGE == 0


@needs_thp
def test_a_view_is_left_where_it_is():
    base = torch.arange(200_000, dtype=torch.float32)
    view = base[100:]
    assert hugepages.use_huge_pages([view]) == 0
    assert view.data_ptr() == base.data_ptr() + 400


def test_nothing_moves_where_huge_pages_are_off(monkeypatch):
    monkeypatch.setattr(hugepages, "available", lambda: False)
    model = tiny_model()
    pointers = [t.data_ptr() for t in model.parameters()]
    assert hugepages.use_huge_pages(model.parameters()) == 0
    assert [t.data_ptr() for t in model.parameters()] == pointers


@needs_thp
def test_a_loaded_cpu_model_and_its_cache_are_on_huge_pages(write_ckpt):
    args = dataclasses.replace(TINY, hidden_size=256, vocab_size=3000)
    settings = Settings()
    settings.model.path = str(write_ckpt(args=args))
    # Plain linears, the same on every CPU: the default form is the CPU's (with AVX-512, oneDNN's
    # packed weights: opaque tensors that stay where oneDNN put them).
    settings.runtime.prepack = False
    loaded = load_model(settings).model
    assert advised(loaded.word_embeddings.weight)  # the tied output layer reads it whole
    assert advised(loaded.transformer.layers[0].mlp.dense_h_to_4h.weight)
    cache = loaded.new_kv_cache(2, 64, hugepages.zeros)
    assert cache.k[0].shape == (2, TINY.num_heads, 64, 256 // TINY.num_heads)
    assert all(torch.count_nonzero(t) == 0 for t in cache.k + cache.v)


def test_fast_and_slow_give_the_same_tokens_with_a_moved_model():
    model = tiny_model(seed=3)
    assert hugepages.use_huge_pages(hugepages.streamed_tensors(model)) > 0 or not hugepages.available()
    window, params = Window(size=32, stride=8), SamplingParams(greedy=True)
    prompt = list(range(1, 21))
    fast = [t for step in generate(model, prompt, window, params, max_new_tokens=40) for t in step]
    slow = [t for step in generate(model, prompt, window, params, max_new_tokens=40, fast=False) for t in step]
    assert fast == slow
    steps = []
    with torch.inference_mode():
        for zeros in (torch.zeros, hugepages.zeros):
            cache = model.new_kv_cache(1, 32, zeros)
            model(torch.tensor([prompt[:5]]), torch.arange(5), cache)
            steps.append(decode_step(model, torch.tensor([7]), torch.tensor([5]), cache))
    assert torch.equal(steps[0], steps[1])


def test_the_embedding_tables_are_left_unless_the_output_layer_reads_one():
    """A step looks up one row of each table: moving them would only add to the peak. The tied
    output layer multiplies by the whole word-embedding table; a quantized one has its own copy."""
    model = tiny_model()
    streamed = {id(t) for t in hugepages.streamed_tensors(model)}
    assert id(model.word_embeddings.weight) in streamed and id(model.position_embeddings.weight) not in streamed
    quantize_model(model, "int8")
    streamed = {id(t) for t in hugepages.streamed_tensors(model)}
    assert id(model.word_embeddings.weight) not in streamed
    assert id(model.lm_head.linear.packed) in streamed


@needs_thp
@pytest.mark.parametrize("float_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_a_quantized_folder_moves_and_lets_the_files_pages_go(write_ckpt, tmp_path, float_dtype):
    """safetensors maps the folder's file; each weight's pages of it are let go as the weight is
    copied onto huge pages (the output layer too, stored under another name), so the folder is not
    held twice. A folder of an fp16 release keeps its float tensors (embeddings, norms) in fp16:
    loaded in fp32 they are converted, and their pages are let go too."""
    from cpmgen.checkpoint.reader import open_checkpoint, resolve_args
    from cpmgen.quantized_checkpoint import read_quantized, write_quantized

    args = dataclasses.replace(TINY, hidden_size=512, vocab_size=3000)
    settings = Settings()
    source = open_checkpoint(write_ckpt(args=args, dtype=float_dtype))
    (tmp_path / "q").mkdir()
    write_quantized(tmp_path / "q", source, resolve_args(source, settings.model), "int8")
    settings.model.path = str(tmp_path / "q")
    loaded = load_model(settings).model
    file = tmp_path / "q" / "model.safetensors"
    resident = file_mappings(file)  # before anything else reads the file
    head, first = loaded.lm_head.linear.packed, loaded.transformer.layers[0].attention.query_key_value.packed
    assert advised(first)  # the region's whole 2 MB pages are advised; the first weight is in them
    assert not any(start <= t.data_ptr() < end for t in (head, first) for start, end, _ in resident)
    # resident: at most the tensors too small to move (loading reads no embedding row)
    small = sum(t.numel() * t.element_size() for t in loaded.state_dict().values() if t.numel() * t.element_size() < 256 << 10)
    assert sum(rss for _, _, rss in resident) <= small + 2 * 4096 * len(loaded.state_dict())  # partial pages
    _, _, stored = read_quantized(tmp_path / "q")
    assert torch.equal(head, stored["lm_head_quantized.packed"])
    assert torch.equal(first, stored["transformer.layers.0.attention.query_key_value.packed"])


@needs_thp
@pytest.mark.parametrize("float_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_a_quantized_folder_written_by_someone_else_with_unaligned_tensors_loads_the_same(write_ckpt, tmp_path,
                                                                                          float_dtype):
    """A safetensors file from another writer may place tensors at any byte offset. Each one is
    still mapped from the file, and letting its pages go after the copy (or, for an fp16 folder's
    float tensors, after their conversion to fp32) drops only whole pages of the read-only file
    mapping, which read back from the file: the model's values and its next-token logits are
    those of the folder cpmgen wrote."""
    import json
    import shutil
    import struct

    from cpmgen.checkpoint.reader import open_checkpoint, resolve_args
    from cpmgen.quantized_checkpoint import WEIGHTS_NAME, read_quantized, write_quantized

    args = dataclasses.replace(TINY, hidden_size=512, vocab_size=3000)
    settings = Settings()
    source = open_checkpoint(write_ckpt(args=args, dtype=float_dtype))
    written, odd = tmp_path / "q", tmp_path / "odd"
    written.mkdir()
    write_quantized(written, source, resolve_args(source, settings.model), "int4")
    shutil.copytree(written, odd)
    # the same tensors with the data starting one byte past an 8-byte boundary (the header's
    # length), so no tensor is aligned to its element size, a page or anything else
    _, _, stored = read_quantized(written)
    header, blobs, offset = {}, [], 0
    names = {torch.uint8: "U8", torch.int8: "I8", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int32: "I32"}
    for name, tensor in stored.items():
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * ((1 - len(encoded)) % 8)
    (odd / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))
    assert any(t.data_ptr() % t.element_size() for t in read_quantized(odd)[2].values() if t.dtype == float_dtype)  # unaligned

    models = []
    for folder in (written, odd):
        settings.model.path = str(folder)
        models.append(load_model(settings).model)
    for (name, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), name
    assert advised(models[1].transformer.layers[0].attention.query_key_value.packed)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.inference_mode():
        logits = [model(ids, torch.arange(4), model.new_kv_cache(1, 8))[:, -1] for model in models]
    assert torch.equal(logits[0], logits[1])


def file_mappings(path) -> list[tuple[int, int, int]]:
    """(start, end, resident bytes) of this process's mappings of the file at `path` (/proc/self/smaps)."""
    found, inside = [], False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and all(c in "0123456789abcdef-" for c in fields[0]):
                inside = len(fields) >= 6 and fields[-1] == str(path)
                if inside:
                    found.append([*(int(part, 16) for part in fields[0].split("-")), 0])
            elif inside and fields[0] == "Rss:":
                found[-1][2] = int(fields[1]) * 1024
    return [tuple(mapping) for mapping in found]
