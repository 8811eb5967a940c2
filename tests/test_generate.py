"""Generation: the fast path equals the slow path token for token, far past the window."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from cpmgen.fused_decode import fuse_decode
from cpmgen.generate import Stats, generate, recompute
from cpmgen import prepack
from cpmgen.model import CPMModel, decode_step
from cpmgen.prepack import prepack_linears
from cpmgen.sampling import SamplingParams, sample
from cpmgen.synthetic import random_state_dict
from cpmgen.window import Window

from helpers import TINY

EOD = 7
MAX_POS = TINY.max_positions


def make_model(vocab_size: int = TINY.vocab_size, seed: int = 0, kernels: str = "plain") -> CPMModel:
    args = dataclasses.replace(TINY, vocab_size=vocab_size)
    model = CPMModel(args)
    model.load_state_dict(random_state_dict(args, seed))
    model.eval().requires_grad_(False)
    if kernels == "cpu":
        if prepack.chosen_form(torch.device("cpu"), torch.float32) is None:
            pytest.skip("neither oneDNN nor cpmgen's kernels are available here")
        assert prepack_linears(model) == 4 * args.num_layers + 1
        assert fuse_decode(model) == args.num_layers
    return model


# Every generation test runs on the plain PyTorch model and on what the CLI runs on a CPU:
# the CPU's faster linears (prepack.py) and the decode step in one op a layer (fused_decode.py).
KERNELS = ["plain", "cpu"]


@pytest.fixture(scope="module", params=KERNELS)
def novel_model(request):
    return make_model(kernels=request.param)


@pytest.fixture(scope="module", params=KERNELS)
def lyric_model(request):
    # A 16-token vocab makes <eod> common, so windows hold many lines of a few tokens.
    return make_model(16, seed=1, kernels=request.param)


def run(model, prompt, window, params, n, fast, samples=1, seed=1234, decode=decode_step):
    stats = Stats()
    steps = generate(model, prompt, window, params, n, samples, fast, torch.Generator().manual_seed(seed), stats,
                     decode=decode)
    return list(steps), stats


# stride 8 in the quick loop; the edge strides (1: the exact rule at every step, 32: half the window) are slow
STRIDES = [pytest.param(1, marks=pytest.mark.slow), 8, pytest.param(32, marks=pytest.mark.slow)]
GREEDY = SamplingParams(greedy=True)
SAMPLED = SamplingParams(temperature=1.0, top_k=0, top_p=0.95)


@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_novel_fast_equals_slow_past_many_slides(novel_model, stride, params):
    window = Window(MAX_POS - 1, stride)
    prompt = list(range(20, 40))
    new = 3 * MAX_POS + 2 * stride + 10
    fast, fast_stats = run(novel_model, prompt, window, params, new, fast=True)
    slow, slow_stats = run(novel_model, prompt, window, params, new, fast=False)
    assert fast == slow
    assert fast_stats.slides >= 3 and fast_stats.slides == slow_stats.slides


@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_lyric_fast_equals_slow_past_many_slides(lyric_model, stride, params):
    window = Window(MAX_POS - 1, stride, line_end=EOD)
    prompt = [11, 12, EOD, 13, 14, 15, EOD]
    fast, stats = run(lyric_model, prompt, window, params, 4 * MAX_POS, fast=True, samples=3)
    slow, _ = run(lyric_model, prompt, window, params, 4 * MAX_POS, fast=False, samples=3)
    assert fast == slow
    assert stats.slides >= 3 * 3
    if params is SAMPLED:
        assert sum(row.count(EOD) for row in fast) > 20  # lines really were dropped whole


def test_keep_holds_the_first_tokens_and_fast_equals_slow(novel_model):
    window = Window(MAX_POS - 1, 8, keep=5)
    prompt = list(range(50, 70))
    fast, _ = run(novel_model, prompt, window, SAMPLED, 3 * MAX_POS, fast=True, samples=2)
    slow, _ = run(novel_model, prompt, window, SAMPLED, 3 * MAX_POS, fast=False, samples=2)
    assert fast == slow


def older_slide_by_one(model, prompt, n, params, generator):
    """The older generate_novel.py rule, written directly: once the text reaches the model's
    positions, the model sees its last max_positions - 1 tokens at positions 0..max_positions - 2."""
    tokens = list(prompt)
    out = []
    for _ in range(n):
        context = tokens[-(model.args.max_positions - 1):]
        logits = model(torch.tensor([context]), torch.arange(len(context)))[0, -1]
        token = int(sample(logits[None], params, generator, [context])[0])
        tokens.append(token)
        out.append([token])
    return out


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_stride_one_slow_novel_is_the_older_rule(novel_model, params):
    prompt = list(range(30, 45))
    window = Window(MAX_POS - 1, 1)
    slow, _ = run(novel_model, prompt, window, params, 2 * MAX_POS, fast=False, seed=7)
    with torch.inference_mode():
        older = older_slide_by_one(novel_model, prompt, 2 * MAX_POS, params, torch.Generator().manual_seed(7))
    assert slow == older


@pytest.mark.parametrize("fast", [True, False])
def test_positions_stay_in_range(novel_model, monkeypatch, fast):
    seen = []
    forward = CPMModel.forward

    def recording(self, ids, input_pos, *args, **kwargs):
        seen.append(int(input_pos.max()))
        return forward(self, ids, input_pos, *args, **kwargs)

    monkeypatch.setattr(CPMModel, "forward", recording)
    run(novel_model, list(range(10)), Window(MAX_POS - 1, 8), GREEDY, 3 * MAX_POS, fast=fast)
    assert max(seen) == MAX_POS - 2  # the window is max_positions - 1 tokens: positions 0..62


def test_prompt_longer_than_window_keeps_its_last_part(novel_model):
    window = Window(MAX_POS - 1, 8)
    prompt = list(range(100, 100 + 2 * MAX_POS))
    fast, _ = run(novel_model, prompt, window, GREEDY, 20, fast=True)
    direct, _ = run(novel_model, prompt[-(MAX_POS - 1):], window, GREEDY, 20, fast=False)
    assert fast == direct


def test_recompute_matches_last_logits(novel_model):
    ids = list(range(5, 25))
    with torch.inference_mode():
        full = novel_model(torch.tensor([ids]), torch.arange(len(ids)))[0, -1]
        torch.testing.assert_close(recompute(novel_model, ids), full)


def test_a_window_encoded_for_its_next_token_runs_the_last_block_for_that_token_alone(novel_model):
    """A prefill or a recompute wants the next token's logits only: the last block computes every
    token's keys and values (bitwise those of the whole forward) but attends, projects and runs
    its MLP for the last token alone; the blocks before run every token."""
    ids = list(range(5, 25))
    layers = novel_model.transformer.layers
    rows = {}
    hooks = [layer.mlp.register_forward_hook(lambda module, args, out, i=i: rows.__setitem__(i, args[0].shape[1]))
             for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            whole_cache, last_cache = novel_model.new_kv_cache(1, MAX_POS), novel_model.new_kv_cache(1, MAX_POS)
            whole = novel_model(torch.tensor([ids]), torch.arange(len(ids)), whole_cache)[0, -1]
            assert set(rows.values()) == {len(ids)}
            last = novel_model(torch.tensor([ids]), torch.arange(len(ids)), last_cache, last_only=True)[0, -1]
    finally:
        for hook in hooks:
            hook.remove()
    assert rows == {**{i: len(ids) for i in range(len(layers) - 1)}, len(layers) - 1: 1}
    for kept, expected in zip(last_cache.k + last_cache.v, whole_cache.k + whole_cache.v):
        assert torch.equal(kept, expected)
    torch.testing.assert_close(last, whole)


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_tokens():
    """--compile (loading.compile_decode): a static-shape step over every cache slot, same tokens."""
    from cpmgen.loading import compile_decode

    model = make_model()  # plain linears: inductor packs its own weights
    fuse_decode(model)  # as the loader does: the compiled step runs the modules' own code
    window = Window(MAX_POS - 1, 16)
    prompt = list(range(20, 40))
    eager, _ = run(model, prompt, window, SAMPLED, MAX_POS + 40, fast=True)
    compiled, stats = run(model, prompt, window, SAMPLED, MAX_POS + 40, fast=True, decode=compile_decode(model))
    assert compiled == eager and stats.slides >= 2


class FakeClock:
    """A step costs `cost[threads]` seconds of this clock: the tuner's choices without timing noise."""

    def __init__(self, cost: dict[int, float]):
        self.now, self.cost = 0.0, cost

    def __call__(self) -> float:
        return self.now

    def step(self, *args):
        self.now += self.cost[torch.get_num_threads()]


@pytest.mark.parametrize("faster", [1, 2])
def test_the_thread_tuner_settles_on_the_faster_count_and_tries_again_later(faster):
    from cpmgen.threads import ThreadTuner

    before = torch.get_num_threads()
    clock = FakeClock({faster: 1.0, 3 - faster: 2.0})
    try:
        tuner = ThreadTuner(2, 2, clock)
        step = tuner.wrap(clock.step)
        counts = []
        for _ in range(400):
            step()
            counts.append(torch.get_num_threads())
        assert tuner.current == faster and counts[-1] == faster
        tries = sum(1 for a, b in zip(counts, counts[1:]) if a == faster and b != faster)
        # a losing try after 8, 32, 128, 128 ... steps, each PROBE + 1 steps long
        assert 3 <= tries <= 5 and tuner.period == ThreadTuner.MAX_PERIOD
        clock.cost = {faster: 2.0, 3 - faster: 1.0}  # the machine's load changed: the other count wins now
        for _ in range(ThreadTuner.MAX_PERIOD + ThreadTuner.PROBE + 2):
            step()
        assert tuner.current == 3 - faster and torch.get_num_threads() == 3 - faster
    finally:
        torch.set_num_threads(before)


def test_the_thread_count_changes_no_value():
    """Every kernel splits a step's work by output rows, so 1 and 2 threads give bitwise the same
    logits: the tuner may move between them mid-text without changing a token."""
    from cpmgen.quantize import quantize_model

    args = dataclasses.replace(TINY, hidden_size=256, num_heads=4, vocab_size=4000, num_layers=2)
    before = torch.get_num_threads()
    ids = torch.randint(0, args.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    try:
        for kernels, fused in itertools.product(("plain", "onednn", "gemv", "gemv-bf16", "int8", "int4"), (False, True)):
            model = CPMModel(args)
            model.load_state_dict(random_state_dict(args, 0))
            model.eval().requires_grad_(False)
            if kernels == "gemv-bf16":
                prepack_linears(model.to(torch.bfloat16), form="gemv")
            elif kernels in ("onednn", "gemv"):
                prepack_linears(model, form=kernels)
            elif kernels != "plain":
                quantize_model(model, kernels)
            if fused:
                assert fuse_decode(model) == args.num_layers
            outputs = []
            for threads in (1, 2):
                torch.set_num_threads(threads)
                with torch.inference_mode():
                    cache = model.new_kv_cache(1, 32)
                    logits = [model(ids[:, :16], torch.arange(16), cache)[0]]
                    logits += [decode_step(model, ids[:, i], torch.tensor([i]), cache) for i in range(16, 24)]
                outputs.append(torch.cat(logits))
            assert torch.equal(outputs[0], outputs[1]), (kernels, fused)
    finally:
        torch.set_num_threads(before)


def test_positions_outside_the_model_or_the_cache_are_refused_by_name():
    """A forward checks every position it is given (one index for all rows, or a row each) against
    the model's positions and the cache's slots, and names the one that does not fit."""
    model = make_model()
    ids = torch.zeros(2, 1, dtype=torch.long)
    cache = model.new_kv_cache(2, 8)
    refused = [(torch.tensor([MAX_POS]), None, f"position {MAX_POS} outside the model's 0..{MAX_POS - 1}"),
               (torch.tensor([[3], [-1]]), None, f"position -1 outside the model's 0..{MAX_POS - 1}"),
               (torch.tensor([[3], [8]]), cache, "position 8 does not fit a KV cache of 8 slots"),
               (torch.tensor([8]), cache, "position 8 does not fit a KV cache of 8 slots")]
    with torch.inference_mode():
        for positions, kv_cache, message in refused:
            with pytest.raises(ValueError, match=f"^{message}$"):
                model(ids, positions, kv_cache)
        # the same rows at positions that fit: each row's logits are its own one-row step's (the
        # rows attend to different numbers of slots, masked, so equal within rounding)
        both = model(ids, torch.tensor([[3], [7]]), cache)[:, -1]
        for row, position in enumerate((3, 7)):
            alone = model(ids[row:row + 1], torch.tensor([position]), cache.rows(slice(row, row + 1)))[:, -1]
            torch.testing.assert_close(alone[0], both[row], rtol=1e-5, atol=1e-5)
