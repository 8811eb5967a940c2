"""The C++ int8/int4 linear kernels (qlinear.cpp): built by `make install`, loaded on demand.

`build()` compiles qlinear.cpp with the system C++ compiler against the installed torch. The
library holds AVX-512 VNNI, AVX2 and plain C++ versions of its loops and picks the best one the
CPU runs when it loads, so one built on one machine runs on another. `qlinear()` is the op,
or None where the library was not built or does not load;
cpmgen/quantize.py then computes the same values with torch operations, more slowly.
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

SOURCE = Path(__file__).with_name("qlinear.cpp")
LIBRARY = Path(__file__).with_name("_qlinear.so")


def compile_command(output: Path = LIBRARY) -> list[str]:
    from torch.utils.cpp_extension import include_paths, library_paths

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    # -ffp-contract=off: the epilogue must round as the torch reference does (no fused multiply-add).
    flags = ["-O3", "-ffp-contract=off", "-fopenmp", "-std=c++17", "-shared", "-fPIC",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-w"]
    includes = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    libs = [f"-L{p}" for p in library_paths()] + [f"-Wl,-rpath,{p}" for p in library_paths()]
    return ["c++", *flags, *includes, str(SOURCE), "-o", str(output), *libs, "-lc10", "-ltorch_cpu"]


def build() -> int:
    """Compile the library next to its source; on failure say so and leave none behind."""
    tmp = LIBRARY.with_suffix(".so.partial")
    try:
        subprocess.run(compile_command(tmp), check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        tmp.unlink(missing_ok=True)
        LIBRARY.unlink(missing_ok=True)
        print(f"cpmgen: the int8/int4 CPU kernels did not build ({e}); --quantize will run on slower "
              "torch operations", file=sys.stderr)
        return 0  # an optional speed-up: the install goes on
    tmp.replace(LIBRARY)
    return 0


@functools.cache
def qlinear():
    """torch.ops.cpmgen.qlinear, or None (with a warning once) where it is not available."""
    if not LIBRARY.is_file():
        warnings.warn(f"{LIBRARY} is not built (run `make install`): int8/int4 linears run on slower torch "
                      "operations", stacklevel=2)
        return None
    try:
        torch.ops.load_library(str(LIBRARY))
    except OSError as e:
        warnings.warn(f"{LIBRARY} does not load ({e}); rebuild it with `make install`: int8/int4 linears run "
                      "on slower torch operations", stacklevel=2)
        return None
    return torch.ops.cpmgen.qlinear


def isas() -> list[str]:
    """The versions of the loops this CPU runs, best first ("avx512vnni", "avx2", "generic"); the
    first one is used unless `use_isa` picks another."""
    return list(torch.ops.cpmgen.qlinear_isas()) if qlinear() is not None else []


def isa() -> Optional[str]:
    """The version of the loops in use, or None without the library."""
    return str(torch.ops.cpmgen.qlinear_isa()) if qlinear() is not None else None


@contextlib.contextmanager
def use_isa(name: str):
    """Run the kernels with the loops called `name` inside the block (they all give the same bits)."""
    previous = torch.ops.cpmgen.qlinear_use(name)
    try:
        yield
    finally:
        torch.ops.cpmgen.qlinear_use(previous)
