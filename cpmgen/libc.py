"""The C library this process runs on (Linux only; None elsewhere), for the calls Python does not
wrap: renameat2 (fileio), madvise and malloc_trim (memory). One handle, errno kept for errors."""

from __future__ import annotations

import ctypes
import sys

LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
