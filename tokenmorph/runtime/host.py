"""The host memory allocator during training.

torch's CPU tensors come from the C library's ``malloc``. glibc serves large blocks (above a
threshold that adapts up to 32 MB) with fresh ``mmap`` pages and hands freed ones back to the
kernel, so every step of a CPU training loop page-faults its activations in again: the kernel
zeroes each page (measured on the demo: a third of the process's time was system time, the
EfficientNet teacher's forward 1.7x slower). Keeping freed memory in the heap makes the
process reuse it. This is what Intel's and PyTorch's CPU tuning guides get by preloading
jemalloc or tcmalloc; ``mallopt`` does it in-process, with no library to install.

The cost: the process keeps its peak heap until it exits (what a training process needs
again at the next step anyway). ``TOKENMORPH_MALLOC=default`` leaves glibc's behaviour as it
is; other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["tune_host_allocator"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_state: dict = {}


def tune_host_allocator() -> str:
    """Keep freed memory in the process (no ``mmap`` for large blocks, no trimming of the
    heap) when the C library is glibc; once per process. Returns what was done: ``"retain"``,
    ``"default"`` (``TOKENMORPH_MALLOC=default``) or ``"unsupported"`` (not glibc)."""
    if "mode" in _state:
        return _state["mode"]
    mode = "unsupported"
    if os.environ.get("TOKENMORPH_MALLOC", "").strip().lower() == "default":
        mode = "default"
    elif sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            mallopt = None
        # M_MMAP_MAX=0: large blocks come from the heap too (an arena that cannot grow still
        # falls back to mmap); trim only above 2 GiB of free heap top (mallopt takes a C int)
        if (
            mallopt is not None
            and mallopt(_M_MMAP_MAX, 0)
            and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
        ):
            mode = "retain"
    _state["mode"] = mode
    return mode
