"""The C++ CPU kernels, built by `make install` into one library and loaded on demand:

- qlinear.cpp: the int8/int4 linears (`op("qlinear")`); where the library is missing,
  cpmgen/quantize.py computes the same values with torch operations, more slowly.
- gemv.cpp: the fp32 and bf16 GEMV of decode steps (`op("gemv_linear")`, cpmgen/prepack.py's "gemv"
  form); where the library is missing, prepack uses oneDNN's packed weights.
- attention.cpp, gelu.cpp, layernorm.cpp, block.cpp: a decode step's attention in one op
  (`op("decode_attention")`), a window's causal attention (`op("causal_attention")`), the tanh GELU
  in place (`op("gelu_tanh_")`), the layer norm (`op("layer_norm")`), a whole block with any of
  those linears in one call (`block_step(...)`, an object holding the block's tensors), the blocks
  of a model (`stack_step`) and its whole one-token step (`model_step`); where they are missing,
  cpmgen/fused_decode.py leaves the model's plain PyTorch modules in place.
- argmax.cpp, sampling.cpp: the greedy token (`op("argmax_rows")`), and a sampled token's top-p
  sort, top-p mask and exponential race (`op("descending_values")`, `op("top_p_keep")`,
  `op("race_argmax")`), each what torch's operations give; where they are missing,
  cpmgen/sampling.py runs those, more slowly.

`build()` compiles them with the system C++ compiler against the installed torch, with no
-march: the library holds versions of its loops for AVX-512 VNNI, AVX2 and plain C++ and picks
the best one the CPU runs when it loads, so one built on one machine runs on another.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Optional

import torch

SOURCES = [Path(__file__).with_name(name) for name in
           ("qlinear.cpp", "gemv.cpp", "attention.cpp", "block.cpp", "argmax.cpp", "gelu.cpp", "layernorm.cpp",
            "sampling.cpp")]
LIBRARY = Path(__file__).with_name("_kernels.so")
INPUT_DTYPES = (torch.float32, torch.bfloat16)  # the activations qlinear, decode_attention and BlockStep take


# The C++ standards to build as, in turn until one builds: C++20, what torch's own extension
# builder passes (torch 2.14's headers refuse anything older), then C++17, for older torch
# releases whose headers C++20 might not take. A compiler without C++20 fails the first at once.
LANGUAGE_STANDARDS = ("c++20", "c++17")


def compile_command(output: Path = LIBRARY, standard: str = LANGUAGE_STANDARDS[0]) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -ffp-contract=off: the epilogue must round as the torch reference does (no fused multiply-add).
    # -fno-trapping-math: no floating point traps, so loops with a select (attention's exp) vectorize;
    # it changes no value (no reassociation, no contraction).
    # -Wno-psabi: the vector types argmax.cpp passes between its inline functions never cross the
    # library's boundary, so gcc's note on their calling convention is noise in the install log.
    flags = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp", f"-std={standard}", "-shared",
             "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w", "-Wno-psabi"]
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    libs = [f"-L{p}" for p in library_paths()] + [f"-Wl,-rpath,{p}" for p in library_paths()]
    return ["c++", *flags, *includes, *map(str, SOURCES), "-o", str(output), *libs, "-lc10", "-ltorch_cpu"]


def build() -> int:
    """Compile the library next to its source, as each of LANGUAGE_STANDARDS in turn until one
    builds; where none does, say so and leave none behind."""
    tmp = LIBRARY.with_suffix(".so.partial")
    for standard in LANGUAGE_STANDARDS:
        try:
            subprocess.run(compile_command(tmp, standard), check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            tmp.unlink(missing_ok=True)
            error = e
            continue
        tmp.replace(LIBRARY)
        return 0
    LIBRARY.unlink(missing_ok=True)
    print(f"cpmgen: the CPU kernels did not build ({error}); --quantize and CPU decode steps will run on "
          "slower torch operations", file=sys.stderr)
    return 0  # an optional speed-up: the install goes on


@functools.cache
def loaded() -> bool:
    """Whether the library is loaded (warning once where it is not built or does not load)."""
    if not LIBRARY.is_file():
        warnings.warn(f"{LIBRARY} is not built (run `make install`): int8/int4 linears and CPU decode steps "
                      "run on slower torch operations", stacklevel=3)
        return False
    try:
        torch.ops.load_library(str(LIBRARY))
    except OSError as e:
        warnings.warn(f"{LIBRARY} does not load ({e}); rebuild it with `make install`: int8/int4 linears and "
                      "CPU decode steps run on slower torch operations", stacklevel=3)
        return False
    return True


@functools.cache
def op(name: str):
    """torch.ops.cpmgen.<name> ("qlinear", "decode_attention", "gemv_linear"), or None where the
    library is not available."""
    return getattr(torch.ops.cpmgen, name) if loaded() else None


def block_step(kind: str, *, norms: list, weights: list, gparams: list, scales: list, biases: list,
               out_features: list, bits: int, group: int, eps: float, heads: int):
    """block.cpp's BlockStep for one block (see there for the arguments); its `forward(x, k_cache,
    v_cache, pos)` runs the block's one-token step. Needs the library (`loaded()`)."""
    return torch.classes.cpmgen.BlockStep(kind, norms, weights, gparams, scales, biases, out_features, bits, group,
                                          eps, heads)


def stack_step(steps: list):
    """block.cpp's StackStep over the blocks' BlockSteps, in order: its `forward(x, k_caches,
    v_caches, pos)` runs their one-token steps one after the other in one call."""
    return torch.classes.cpmgen.StackStep(steps)


def model_step(word, position, stack, *, norm_weight, norm_bias, eps: float, head_kind: str, head_weight,
               head_gparams, head_scale, vocab: int, bits: int, group: int):
    """block.cpp's ModelStep: a model's embedding tables, its StackStep, the final layer norm and
    the output layer (kind as a BlockStep's linears, no bias; gparams and scale empty unless
    quantized). Its `forward(ids, pos, k_caches, v_caches)` runs a whole one-token step -> logits."""
    return torch.classes.cpmgen.ModelStep(word, position, stack, norm_weight, norm_bias, eps, head_kind, head_weight,
                                          head_gparams, head_scale, vocab, bits, group)


def isas() -> list[str]:
    """The versions of the int8/int4 loops this CPU runs, best first ("avx512vnni", "avx2",
    "generic"); the first one is used unless `use_isa` picks another."""
    return list(torch.ops.cpmgen.qlinear_isas()) if loaded() else []


def isa() -> Optional[str]:
    """The version of the int8/int4 loops in use, or None without the library."""
    return str(torch.ops.cpmgen.qlinear_isa()) if loaded() else None


def use_isa(name: str):
    """Run the int8/int4 kernels with the loops called `name` inside a `with` block (they all give
    the same bits)."""
    return switched(torch.ops.cpmgen.qlinear_use, name)


def gemv_forms() -> list[str]:
    """The forms of the fp32/bf16 GEMV loops this CPU runs, best first ("avx512bf16": bf16 weights
    on bf16 dot products, "avx2", "generic"); the first is used unless `use_gemv` picks another."""
    return list(torch.ops.cpmgen.gemv_forms()) if loaded() else []


def use_gemv(name: str):
    """Run the GEMV with the loops called `name` inside a `with` block (the forms round
    differently; within one form every path that runs the GEMV gives the same bits)."""
    return switched(torch.ops.cpmgen.gemv_use, name)


@contextlib.contextmanager
def switched(use, name: str):
    """`use(name)` (an op that switches loops and returns the previous choice's name) for the
    block, then the previous choice back."""
    previous = use(name)
    try:
        yield
    finally:
        use(previous)
