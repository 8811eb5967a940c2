"""The library's sampling ops (cpmgen/kernels/sampling.cpp) against torch's operations: a sampled
token must not depend on whether the library is built, and the generator must end where torch's
would, so that every later token is the same too."""

from __future__ import annotations

import pytest
import torch

from cpmgen import kernels, sampling
from cpmgen.config import SamplingParams
from cpmgen.sampling import race_argmax, sample, top_k_top_p_filter


@pytest.fixture
def torch_only(monkeypatch):
    """Runs the sampling functions on torch's operations alone, as where the library is not built."""
    def without(f):
        def call(*args, **kwargs):
            with monkeypatch.context() as m:
                m.setattr(sampling, "library_op", lambda name, *rows, **kwargs: None)
                return f(*args, **kwargs)
        return call
    return without


def logits_rows(seed: int, rows: int, n: int) -> torch.Tensor:
    """Logits with what a vocabulary's row can hold: spread values, many equal ones (bf16 logits
    widened), -inf (after top-k), +0 and -0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * (1 + seed % 4)
    if seed % 2:
        x = x.to(torch.bfloat16).float()
    if seed % 3 == 0:
        x[:, ::5] = float("-inf")
    if seed % 5 == 0:
        x[:, ::11], x[:, 1::11] = -0.0, 0.0
    return x


def test_the_library_is_used():
    assert kernels.op("descending_values") is not None and kernels.op("top_p_keep") is not None
    assert sampling.library_race_is_torchs()


@pytest.mark.parametrize("seed", range(24))
def test_descending_values_are_torchs_sorted_values(seed):
    x = logits_rows(seed, 1 + seed % 3, [30000, 1000, 7, 1][seed % 4])
    assert torch.equal(kernels.op("descending_values")(x), torch.sort(x, descending=True, dim=-1).values)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (0, 0.5), (40, 0.9), (0, 0.999999), (3, 0.1), (0, 1e-9)])
@pytest.mark.parametrize("seed", range(8))
def test_the_librarys_top_p_filter_is_torchs(seed, top_k, top_p, torch_only):
    x = logits_rows(seed, 2, [30000, 1000, 7, 2][seed % 4])
    assert torch.equal(top_k_top_p_filter(x, top_k, top_p), torch_only(top_k_top_p_filter)(x, top_k, top_p))


@pytest.mark.parametrize("library", [True, False])
def test_top_p_keeps_the_lower_ids_of_equal_logits(library, torch_only):
    # sorted probabilities 0.4, 0.2, 0.2, 0.2: the running total crosses 0.5 at the second token,
    # one of three equal ones: the one with the lowest id stays
    logits = torch.log(torch.tensor([[0.2, 0.2, 0.4, 0.2]]))
    f = top_k_top_p_filter if library else torch_only(top_k_top_p_filter)
    assert torch.isinf(f(logits, top_p=0.5)).tolist() == [[False, True, False, True]]


@pytest.mark.parametrize("seed", range(16))
def test_the_librarys_race_draws_torchs_token_and_leaves_the_generator_where_torchs_does(seed, torch_only):
    probs = torch.softmax(logits_rows(seed, 3, [30000, 997, 5, 1][seed % 4]), dim=-1)
    if seed % 4 == 1:
        probs[1, 500] = float("nan")  # argmax takes the first NaN, as torch's does
    ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    assert torch.equal(race_argmax(probs, ours), torch_only(race_argmax)(probs, theirs))
    assert torch.equal(ours.get_state(), theirs.get_state())


@pytest.mark.parametrize("consumed", [0, 1, 3, 623, 624, 1247])
@pytest.mark.parametrize("scale", [0.5, 8.0, 40.0])
def test_the_librarys_race_is_torchs_from_any_point_of_the_generators_stream(consumed, scale, torch_only):
    # The library draws the engine's words in bulk: from a generator part way through its state
    # (an odd number of words taken: an entry's two words fall on either side of a twist), over
    # flat and peaked rows (few entries computed) and rows with zero probabilities.
    probs = torch.softmax(logits_rows(consumed, 2, 3001) * scale, dim=-1)
    probs[1, : 3001 // 2] = 0.0
    ours, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for g in (ours, theirs):
        torch.randint(0, 100, (consumed,), generator=g)  # one 32-bit word each
    for _ in range(3):
        assert torch.equal(race_argmax(probs, ours), torch_only(race_argmax)(probs, theirs))
    assert torch.equal(ours.get_state(), theirs.get_state())


@pytest.mark.parametrize("library", [True, False])
def test_the_race_of_an_all_zero_row_takes_the_first_entry(library, torch_only):
    f = race_argmax if library else torch_only(race_argmax)
    assert f(torch.zeros(1, 50), torch.Generator().manual_seed(0)).tolist() == [0]


def test_the_librarys_race_is_torchs_on_rows_no_softmax_gives(torch_only):
    # negative, tiny (subnormal quotients), infinite and NaN values: argmax of the quotients all the same
    g = torch.Generator().manual_seed(3)
    rows = torch.stack([-torch.rand(3000, generator=g), torch.rand(3000, generator=g) * 1e-36,
                        torch.rand(3000, generator=g) * 1e-44, torch.rand(3000, generator=g)])
    rows[3, [7, 2000]] = float("inf")
    rows[2, 2500] = float("nan")
    ours, theirs = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(race_argmax(rows, ours), torch_only(race_argmax)(rows, theirs))
    assert torch.equal(ours.get_state(), theirs.get_state())


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(top_k=40, top_p=1.0),
                                    SamplingParams(temperature=0.7, top_k=100, top_p=0.8),
                                    SamplingParams(temperature=1.3, top_p=0.95, repetition_penalty=1.2)])
def test_sampled_tokens_do_not_depend_on_the_library(params, torch_only):
    ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    contexts = [[1, 2, 3], [4, 4, 5]]
    for step in range(20):
        logits = logits_rows(100 + step, 2, 30000)
        logits[logits == float("-inf")] = -30.0  # a model's logits are finite
        assert torch.equal(sample(logits, params, ours, contexts), torch_only(sample)(logits, params, theirs, contexts))
    assert torch.equal(ours.get_state(), theirs.get_state())
