"""oneDNN-prepacked linears (the CPU default): the same model up to rounding, with no plain linear left."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from cpmgen.model import CPMModel
from cpmgen.prepack import PackedLinear, prepack_linears, supported
from cpmgen.synthetic import random_state_dict

from helpers import TINY


def model_in(dtype: torch.dtype) -> CPMModel:
    model = CPMModel(TINY)
    model.load_state_dict(random_state_dict(TINY, 0))
    return model.to(dtype).eval().requires_grad_(False)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
def test_prepacked_model_matches_plain(dtype, tolerance):
    if not supported(torch.device("cpu"), dtype):
        pytest.skip(f"no oneDNN {dtype} linear on this CPU")
    plain, packed = model_in(dtype), model_in(dtype)
    assert prepack_linears(packed) == 4 * TINY.num_layers + 1
    assert not any(type(m) is nn.Linear for m in packed.modules())
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 4 * TINY.num_layers
    ids = torch.randint(0, TINY.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(40)
    with torch.inference_mode():
        want, got = plain(ids, positions).float(), packed(ids, positions).float()
    assert (got - want).abs().max() <= tolerance * want.abs().max()
    # the state dict is still the checkpoint's names minus the packed weights (nothing opaque in it)
    assert not any(t.is_mkldnn for t in packed.state_dict().values())


def test_fp16_and_training_weights_stay_plain():
    assert prepack_linears(model_in(torch.float16)) == 0
    trainable = CPMModel(TINY)
    assert prepack_linears(trainable) == 0
