"""Random-weight CPM-1 checkpoints written in the real release layouts.

No real weights can be downloaded where cpmgen is tested, so tests, `make demo` and the
benchmarks write small (or CPM-Small-sized) checkpoints with the real tensor names, splits
and file layout, and load them through the same code as a release.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from cpmgen.checkpoint import megatron, splits
from cpmgen.checkpoint.writer import megatron_args
from cpmgen.config import ModelArgs
from cpmgen.model import state_shapes


def random_state_dict(args: ModelArgs, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """GPT-2-style initialisation, with non-trivial biases and LayerNorm weights so that a
    loader which drops or misplaces any tensor changes the logits."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in state_shapes(args).items():
        if "layernorm" in name and name.endswith("weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:  # weights and biases alike
            t = 0.02 * torch.randn(shape, generator=generator)
        state[name] = t.to(dtype)
    return state


def write_megatron_checkpoint(path: Union[str, Path], args: ModelArgs, mp: int = 1,
                              iteration: Union[int, str] = "release", seed: int = 0,
                              dtype: torch.dtype = torch.float32,
                              state: Optional[dict[str, torch.Tensor]] = None, *,
                              with_args: bool = True) -> Path:
    """MODEL_DIR/latest_checkpointed_iteration.txt + <iteration>/mp_rank_XX_model_states.pt.

    Every rank file holds Megatron's training `args` (an argparse Namespace), as a release
    does, so the head count of a non-preset size is known; `with_args=False` leaves them out,
    for checking what happens when only --set model.num_heads can tell it."""
    path = Path(path)
    state = state if state is not None else random_state_dict(args, seed, dtype)
    folder = path / str(iteration)
    folder.mkdir(parents=True, exist_ok=True)
    (path / megatron.LATEST_FILE).write_text(f"{iteration}\n")
    for rank in range(mp):
        module = {name: splits.shard(name, t, mp, rank).clone() for name, t in state.items()}
        file_state = {
            "iteration": iteration if isinstance(iteration, int) else 0,
            "mp_world_size": mp,
            "module": module,
            "optimizer": None,
            "lr_scheduler": {"num_iters": 1},
            "random_rng_state": (3, tuple(range(4)), None),
            "np_rng_state": np.random.RandomState(rank).get_state(),
            "torch_rng_state": torch.manual_seed(rank).get_state(),
        }
        if with_args:
            file_state["args"] = argparse.Namespace(**megatron_args(args, mp))
        torch.save(file_state, folder / megatron.rank_file_name(rank))
    return path
