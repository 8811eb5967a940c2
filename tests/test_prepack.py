"""The CPU's faster linears (the default): oneDNN-prepacked or cpmgen's GEMV, the same model up to
rounding, with no plain linear left."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cpmgen.model import CPMModel
from cpmgen import kernels, prepack
from cpmgen.prepack import GemvLinear, GemvOutput, PackedLinear, chosen_form, prepack_linears
from cpmgen.synthetic import random_state_dict

from helpers import TINY, at_thread_counts, ops_run


def model_in(dtype: torch.dtype) -> CPMModel:
    model = CPMModel(TINY)
    model.load_state_dict(random_state_dict(TINY, 0))
    return model.to(dtype).eval().requires_grad_(False)


# oneDNN's bf16 linear needs AVX-512 (skipped without it)
@pytest.mark.parametrize("form,dtype,tolerance", [("onednn", torch.float32, 1e-4), ("onednn", torch.bfloat16, 5e-2),
                                                  ("gemv", torch.float32, 1e-4), ("gemv", torch.bfloat16, 5e-2)],
                         ids=["onednn-fp32", "onednn-bf16", "gemv-fp32", "gemv-bf16"])
@pytest.mark.parametrize("rows", [1, 2, 40])  # decode steps (one or a few rows read the weights once) and a prefill
def test_prepacked_model_matches_plain(form, dtype, tolerance, rows):
    if chosen_form(torch.device("cpu"), dtype, form) is None:
        pytest.skip(f"no {form} {dtype} linear on this CPU")
    plain, packed = model_in(dtype), model_in(dtype)
    assert prepack_linears(packed, form=form) == 4 * TINY.num_layers + 1
    assert not any(type(m) is nn.Linear for m in packed.modules())
    kind = PackedLinear if form == "onednn" else GemvLinear
    assert sum(type(m) is kind for m in packed.modules()) == 4 * TINY.num_layers
    ids = torch.randint(0, TINY.vocab_size, (rows, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(40)
    with torch.inference_mode():
        want, got = plain(ids, positions).float(), packed(ids, positions).float()
        # one token per row against a cache: every linear sees `rows` rows
        caches = plain.new_kv_cache(rows, 41), packed.new_kv_cache(rows, 41)
        plain(ids, positions, caches[0]), packed(ids, positions, caches[1])
        step = torch.tensor([40])
        want_step, got_step = plain(ids[:, :1], step, caches[0]), packed(ids[:, :1], step, caches[1])
    assert (got - want).abs().max() <= tolerance * want.abs().max()
    assert (got_step - want_step).abs().max() <= tolerance * want_step.abs().max()
    # the state dict is still the checkpoint's names minus the packed weights (nothing opaque in it)
    assert not any(t.is_mkldnn for t in packed.state_dict().values())


GEMV_FORMS = ["avx512bf16", "avx2", "generic"]


@pytest.mark.parametrize("form", GEMV_FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(37, 768), (64, 3072), (16, 100), (9, 40), (5, 7)])
def test_a_gemv_row_is_its_exact_sum_rounded_once(form, dtype, n, k):
    """Decode rows through each form of the GEMV this CPU runs (bf16 weights on bf16 dot products,
    AVX2 with bf16 widened, plain loops): each output is the sum of exact products in fp32,
    rounded to the weights' dtype once, so within half a step of that dtype of the exact value
    plus the fp32 sum's own error; a row's output does not depend on the rows beside it. Input
    lengths that leave every kind of tail."""
    if form not in kernels.gemv_forms():
        pytest.skip(f"this CPU does not run the {form} GEMV")
    generator = torch.Generator().manual_seed(n * k)
    w, b = torch.randn(n, k, generator=generator).to(dtype), torch.randn(n, generator=generator).to(dtype)
    x = torch.randn(3, k, generator=generator).to(dtype)
    with kernels.use_gemv(form):
        got = kernels.op("gemv_linear")(x, w, b)
        alone = kernels.op("gemv_linear")(x[1:2], w, b)
    exact = x.double() @ w.double().t() + b.double()
    magnitude = x.double().abs() @ w.double().abs().t() + b.double().abs()
    half_step = torch.finfo(dtype).eps / 2
    assert ((got.double() - exact).abs() <= half_step * exact.abs() + (k + 1) * 2 ** -23 * magnitude).all()
    assert torch.equal(alone, got[1:2])


def test_the_gemv_runs_the_best_form_and_refuses_one_the_cpu_does_not_run():
    if not kernels.loaded():
        pytest.skip("the kernel library is not built")
    forms = kernels.gemv_forms()
    assert forms[-1] == "generic" and set(forms) <= set(GEMV_FORMS)
    assert torch.ops.cpmgen.gemv_form() == forms[0]
    with kernels.use_gemv("generic"):
        assert torch.ops.cpmgen.gemv_form() == "generic"
    with pytest.raises(RuntimeError, match=f"gemv_use: this CPU runs {', '.join(forms)}, not sse9"):
        with kernels.use_gemv("sse9"):
            pass
    assert torch.ops.cpmgen.gemv_form() == forms[0]


def test_the_gemv_form_keeps_the_weights_as_they_are():
    """No copy of a weight (the output layer reads the word-embedding table itself), and the
    state dict is the plain model's."""
    if chosen_form(torch.device("cpu"), torch.float32, "gemv") is None:
        pytest.skip("the kernel library is not built")
    model = model_in(torch.float32)
    before = {name: t.data_ptr() for name, t in model.state_dict().items()}
    released = []
    assert prepack_linears(model, released.append, form="gemv") == 4 * TINY.num_layers + 1
    assert type(model.lm_head) is GemvOutput and released == []
    assert {name: t.data_ptr() for name, t in model.state_dict().items()} == before


@pytest.mark.parametrize("capability,vendor,fp32,bf16", [
    ("AVX512", "GenuineIntel", "onednn", "onednn"),
    ("AVX512", "AuthenticAMD", "gemv", "gemv"),
    ("AVX2", "AuthenticAMD", "gemv", "gemv"),
    ("AVX2", "GenuineIntel", "gemv", "gemv"),
])
def test_auto_picks_the_form_measured_fastest_on_the_cpu(monkeypatch, capability, vendor, fp32, bf16):
    if not kernels.loaded():
        pytest.skip("the C++ kernels are not built")
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(prepack, "cpu_vendor", lambda: vendor)
    # oneDNN's bf16 linear needs AVX-512; fp32 runs everywhere
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: capability == "AVX512")
    assert chosen_form(cpu, torch.float32) == fp32
    assert chosen_form(cpu, torch.bfloat16) == bf16
    assert chosen_form(cpu, torch.float32, "onednn") == "onednn" and chosen_form(cpu, torch.float32, "gemv") == "gemv"
    assert chosen_form(torch.device("meta"), torch.float32) is None


def test_the_vendor_comes_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n\n"
                       "processor\t: 1\nvendor_id\t: AuthenticAMD\n")
    assert prepack.cpu_vendor(str(cpuinfo)) == "AuthenticAMD"
    assert prepack.cpu_vendor(str(tmp_path / "missing")) == ""


def test_fp16_and_training_weights_stay_plain():
    assert prepack_linears(model_in(torch.float16)) == 0
    trainable = CPMModel(TINY)
    assert prepack_linears(trainable) == 0


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rows", [1, 3, 4, 5])  # 5: past the GEMV's rows, a matrix product (F.linear's at this size)
def test_the_gemv_takes_any_shape_and_any_thread_count(rows, dtype, tolerance):
    """Sizes off its 4-row groups and 8-wide loads; up to 4 rows, the same bits at 1 and 2 threads
    (more rows go to F.linear, whose matrix product may split its sums by thread)."""
    if not kernels.loaded():
        pytest.skip("the kernel library is not built")
    g = torch.Generator().manual_seed(5)
    weight, bias, x = torch.randn(13, 37, generator=g), torch.randn(13, generator=g), torch.randn(rows, 1, 37, generator=g)
    weight, bias, x = weight.to(dtype), bias.to(dtype), x.to(dtype)
    gemv = kernels.op("gemv_linear")
    outputs = at_thread_counts(lambda: gemv(x, weight, bias), (1, 2))
    assert outputs[0].shape == (rows, 1, 13) and outputs[0].dtype == dtype
    assert rows > 4 or torch.equal(outputs[0], outputs[1])
    torch.testing.assert_close(outputs[0], torch.nn.functional.linear(x, weight, bias), rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(gemv(x, weight, None), torch.nn.functional.linear(x, weight), rtol=tolerance, atol=tolerance)


def onednn_linear_runs() -> bool:
    """Where gemv.cpp's matrix_linear takes oneDNN's product: x86 with oneDNN, torch 2.13 or later."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (torch.backends.mkldnn.is_available() and platform.machine() in ("x86_64", "AMD64")
            and (major, minor) >= (2, 13))


# a CPM-Small linear at 40 rows, CPM-Large ones at a short prompt's 17 rows and at 64
@pytest.mark.parametrize("n,k,rows", [(3072, 768, 40), (7680, 2560, 17), (2560, 10240, 64)])
def test_an_fp32_prefill_through_the_gemv_runs_onednn_on_the_weight_as_it_is(n, k, rows):
    """A window's prefill (many rows of a real model's linear) goes to oneDNN's fp32 matrix
    product on x86 where torch has it (2.13 on), on the plain weight (no packed copy is kept), with
    the same bits at any thread count; a small product (a tiny model's few rows) stays with F.linear."""
    if not kernels.loaded():
        pytest.skip("the kernel library is not built")
    g = torch.Generator().manual_seed(7)
    weight, bias, x = torch.randn(n, k, generator=g), torch.randn(n, generator=g), torch.randn(1, rows, k, generator=g)
    gemv = kernels.op("gemv_linear")
    onednn = "mkldnn::_linear_pointwise" in ops_run(lambda: gemv(x, weight, bias))
    assert onednn == onednn_linear_runs()
    outputs = at_thread_counts(lambda: gemv(x, weight, bias))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    torch.testing.assert_close(outputs[0], torch.nn.functional.linear(x, weight, bias), rtol=1e-4, atol=1e-3)
    small_weight, small_x = weight[:24, :40].contiguous(), x[:, :9, :40].contiguous()
    assert "mkldnn::_linear_pointwise" not in ops_run(lambda: gemv(small_x, small_weight, None))
    assert torch.equal(gemv(small_x, small_weight, None), torch.nn.functional.linear(small_x, small_weight))


def test_a_bf16_prefill_through_the_gemv_runs_in_fp32_unless_the_cpu_multiplies_bf16():
    """More rows than the GEMV takes (a window's prefill) go to a matrix product: for bf16 weights
    in bf16 where the CPU has bf16 dot products (AVX-512 BF16), else in fp32 copies rounded to
    bf16 once at the end (torch's emulated bf16 product ran several times slower)."""
    if not kernels.loaded():
        pytest.skip("the kernel library is not built")
    g = torch.Generator().manual_seed(6)
    weight, bias = torch.randn(24, 40, generator=g).bfloat16(), torch.randn(24, generator=g).bfloat16()
    x = torch.randn(2, 9, 40, generator=g).bfloat16()
    gemv = kernels.op("gemv_linear")
    native = torch.ops.cpmgen.native_bf16_products()
    assert native == ("avx512_bf16" in Path("/proc/cpuinfo").read_text())
    for b in (bias, None):
        if native:
            expected = torch.nn.functional.linear(x, weight, b)
        else:
            expected = torch.nn.functional.linear(x.float(), weight.float(), None if b is None else b.float()).bfloat16()
        assert torch.equal(gemv(x, weight, b), expected)
