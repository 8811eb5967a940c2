"""How much memory a run will take, checked against what the machine has before the work."""

from __future__ import annotations

import torch

from cpmgen.config import ModelArgs
from cpmgen.errors import UserError

# Sampling holds a handful of [samples, vocab] temporaries at once (logits, probabilities,
# a sort and its order, the cumulative sum, the random race): bytes per vocab entry, generously.
SAMPLING_BYTES_PER_ENTRY = 64


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation can take without swapping: MemAvailable on Linux, the free
    memory of a CUDA device."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not refuse


def generation_bytes(args: ModelArgs, samples: int, window: int, dtype: torch.dtype, world: int = 1) -> int:
    """The KV cache of `samples` rows of `window` slots (this rank's heads), plus sampling temporaries."""
    element = torch.empty((), dtype=dtype).element_size()
    kv_cache = 2 * args.num_layers * samples * window * (args.hidden_size // world) * element
    return kv_cache + samples * args.vocab_size * SAMPLING_BYTES_PER_ENTRY


def check_generation_memory(args: ModelArgs, samples: int, window: int, dtype: torch.dtype,
                            device: torch.device, world: int = 1) -> None:
    need = generation_bytes(args, samples, window, dtype, world)
    free = available_bytes(device)
    if need > free:
        most = max(1, samples * free // need)
        raise UserError(f"--num-samples {samples}: needs about {need / 1e9:.1f} GB for the KV cache and sampling, "
                        f"but {free / 1e9:.1f} GB are available; ask for at most {most} samples")
