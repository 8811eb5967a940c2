"""The window policy and the sampling helpers, on plain lists and logits."""

from __future__ import annotations

import pytest
import torch

from cpmgen import kernels
from cpmgen.config import WindowSection
from cpmgen.errors import UserError
from cpmgen.sampling import SamplingParams, apply_repetition_penalty, argmax, sample, top_k_top_p_filter
from cpmgen.window import Window

E = 7  # <eod>


def test_novel_drops_stride_oldest_tokens():
    window = Window(size=10, stride=3)
    ctx = list(range(11))
    assert window.overflows(len(ctx)) and not window.overflows(10)
    assert window.slide(ctx) == list(range(3, 11))


def test_slide_by_one_keeps_the_last_size_tokens():
    assert Window(size=10, stride=1).slide(list(range(11))) == list(range(1, 11))


def test_keep_pins_the_first_tokens():
    assert Window(size=10, stride=3, keep=2).slide(list(range(11))) == [0, 1, 5, 6, 7, 8, 9, 10]


def test_lyric_drops_whole_lines_until_stride_freed():
    ctx = [1, 2, E, 3, 4, 5, E, 6, 7 + 1, E, 9]  # lines of 3, 4, 3 tokens, then an open line
    window = Window(size=10, stride=2, line_end=E)
    assert window.slide(ctx) == [3, 4, 5, E, 6, 8, E, 9]  # the first line, through its <eod>
    window = Window(size=10, stride=3, line_end=E)
    two_short_lines = [1, E, 2, E, 3, 4, 5, E, 6, 8, 9]
    assert window.slide(two_short_lines) == [3, 4, 5, E, 6, 8, 9]  # two lines free 4 >= 3 tokens


def test_lyric_falls_back_to_tokens_when_a_line_is_too_long():
    ctx = list(range(10, 21))  # one line longer than the window: no <eod> to cut at
    assert Window(size=10, stride=3, line_end=E).slide(ctx) == list(range(13, 21))
    long_line = [1] * 8 + [E, 2, 3]  # cutting at the <eod> would drop 9 > size // 2 tokens
    assert Window(size=10, stride=2, line_end=E).slide(long_line) == [1] * 6 + [E, 2, 3]
    lines = [1, 2, E, 3, 4, 5, E, 6, 8, E, 9]  # two lines would free 7 > size // 2
    assert Window(size=10, stride=4, line_end=E).slide(lines) == [4, 5, E, 6, 8, E, 9]


def test_lyric_keep_and_lines():
    ctx = [1, E, 2, 2, E, 3, 3, E, 4, 4, E]
    assert Window(size=10, stride=1, keep=2, line_end=E).slide(ctx) == [1, E, 3, 3, E, 4, 4, E]


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 10, "stride": 0}, "--stride 0: must be between 1 and window.size - keep (10)"),
    ({"size": 10, "stride": 11}, "--stride 11: must be between 1 and window.size - keep (10)"),
    ({"size": 10, "stride": 8, "keep": 3}, "--stride 8: must be between 1 and window.size - keep (7)"),
    ({"size": 10, "stride": 1, "keep": 9}, "--keep 9: must be at least 0 and below window.size - 1 (9)"),
])
def test_bad_window(kwargs, message):
    with pytest.raises(UserError) as e:
        Window.from_settings(WindowSection(**kwargs), max_positions=64)
    assert str(e.value) == message


def test_top_k_then_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert torch.isinf(top_k_top_p_filter(logits, top_k=2)).tolist() == [[False, False, True, True, True]]
    # top-p keeps the smallest set whose probability exceeds p, including the token that crosses it
    assert torch.isinf(top_k_top_p_filter(logits, top_p=0.6)).tolist() == [[False, False, True, True, True]]
    assert torch.isinf(top_k_top_p_filter(logits, top_p=0.7)).tolist() == [[False, False, False, True, True]]
    shuffled = logits[:, [3, 0, 4, 2, 1]]
    assert torch.isinf(top_k_top_p_filter(shuffled, top_p=0.6)).tolist() == [[True, False, True, True, False]]


def test_repetition_penalty_is_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, [[0, 1, 1]], 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_sampling_is_seeded_and_follows_probabilities():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(20000, 3)
    params = SamplingParams(temperature=1.0, top_p=1.0)
    a = sample(logits, params, torch.Generator().manual_seed(3), [[]] * 20000)
    b = sample(logits, params, torch.Generator().manual_seed(3), [[]] * 20000)
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.02, rtol=0)


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0]])
    assert sample(logits, SamplingParams(greedy=True), None, [[], []]).tolist() == [1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 32, 33, 100, 30000])
def test_the_librarys_argmax_picks_torchs_index_among_ties_nans_and_infinities(n, dtype):
    """Greedy and sampled tokens must not depend on whether the library is built: its loop picks
    what torch.argmax picks (the first of equal greatest values, the first NaN where there is one),
    on fp32 rows and on a bf16 model's logits as they are."""
    assert kernels.op("argmax_rows") is not None
    x = torch.randn(7, n, generator=torch.Generator().manual_seed(n)).to(dtype)
    x[1] = x[1].round()  # ties
    x[2, n // 2], x[2, -1] = float("nan"), float("nan")
    x[3] = float("-inf")
    x[4, n // 3], x[4, -1] = float("inf"), float("inf")
    x[5] = x[5].clamp(max=-0.5)  # many equal maxima
    x[6, -1] = x[6].max() + 1  # the last one
    assert torch.equal(argmax(x), x.argmax(dim=-1))
    assert torch.equal(kernels.op("argmax_rows")(x), x.float().argmax(dim=-1))  # the library's own loop
    finite = kernels.op("finite_argmax_rows")(x)
    assert torch.equal(finite[[0, 1, 5, 6]], x[[0, 1, 5, 6]].float().argmax(dim=-1))
    assert finite[[2, 3, 4]].tolist() == [-1, -1, -1]  # a NaN, -inf, +inf
    columns = torch.randn(n, 3, generator=torch.Generator().manual_seed(n + 1)).to(dtype)
    assert torch.equal(argmax(columns.t()), columns.t().argmax(dim=-1))  # not contiguous


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 30000])
def test_a_nan_or_an_infinity_anywhere_stops_sampling_with_the_cause(dtype, n):
    """A NaN, +inf or -inf at any index stops the step with the cause, in the check sampling runs
    and in a greedy step's one pass (the library's finite_argmax_rows on fp32 or bf16 logits); the largest
    finite values do not, and the greedy token is then torch's argmax."""
    from cpmgen.sampling import require_finite

    greedy = SamplingParams(greedy=True)
    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n)).to(dtype)
    x[1, 0] = torch.finfo(dtype).max
    x[2, -1] = -torch.finfo(dtype).max
    for logits in (x, x.t().contiguous().t()):  # contiguous or not
        require_finite(logits)
        assert torch.equal(sample(logits, greedy, None, [[]] * 3), logits.float().argmax(dim=-1))
        for bad in (float("nan"), float("inf"), float("-inf")):
            for index in {0, n // 2, n - 1, 3 * n - 1}:
                spoiled = logits.clone()  # with the same strides
                spoiled[index // n, index % n] = bad
                with pytest.raises(UserError, match="the model computed NaN or Inf logits"):
                    require_finite(spoiled)
                with pytest.raises(UserError, match="the model computed NaN or Inf logits"):
                    sample(spoiled, greedy, None, [[]] * 3)


@pytest.mark.parametrize("kwargs, message", [
    ({"top_p": 0.0}, "--top-p 0.0: must be in (0, 1]; 1 turns nucleus sampling off"),
    ({"top_p": 1.5}, "--top-p 1.5: must be in (0, 1]; 1 turns nucleus sampling off"),
    ({"temperature": -1.0}, "--temperature -1.0: must be 0 (greedy) or more"),
    ({"top_k": -1}, "--top-k -1: must be 0 (off) or a positive number of tokens"),
])
def test_bad_sampling(kwargs, message):
    with pytest.raises(UserError) as e:
        SamplingParams(**kwargs)
    assert str(e.value) == message


def test_frequency_and_presence_penalties():
    from cpmgen.sampling import apply_count_penalties

    logits = torch.zeros(2, 4)
    out = apply_count_penalties(logits, [[1, 1, 1, 2], []], frequency=0.5, presence=2.0)
    assert out.tolist() == [[0.0, -3.5, -2.5, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert apply_count_penalties(logits, [[1]], 0.0, 0.0) is logits


def test_penalties_shift_the_sampled_distribution():
    logits = torch.zeros(20000, 3)
    contexts = [[0, 0]] * 20000
    params = SamplingParams(temperature=1.0, top_p=1.0, presence_penalty=100.0)  # the largest allowed
    drawn = sample(logits, params, torch.Generator().manual_seed(0), contexts)
    assert 0 not in drawn.tolist()  # a present token is never drawn again
    params = SamplingParams(temperature=1.0, top_p=1.0, frequency_penalty=0.5)  # token 0: logit -1
    freq = torch.bincount(sample(logits, params, torch.Generator().manual_seed(0), contexts), minlength=3) / 20000
    expected = torch.softmax(torch.tensor([-1.0, 0.0, 0.0]), dim=0)
    torch.testing.assert_close(freq, expected, atol=0.02, rtol=0)
