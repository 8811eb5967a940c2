"""`python -m cpmgen.kernels`: build the C++ kernels (what `make install` runs)."""

import sys

from cpmgen.kernels import build

sys.exit(build())
