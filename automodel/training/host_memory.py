"""Handing freed host memory back to the system, so peak RSS tracks the tensors actually alive.

glibc serves an allocation below its mmap threshold from the heap and keeps the freed space for
reuse; the threshold also rises to the size of every large block freed, up to 32 MB. A training
step frees many tensors of a few MB (activations, logits chunks, optimizer temporaries), so the
process keeps that memory after each step and its resident size grows well past what is in use.
A fixed threshold makes every block of at least ``mmap_threshold`` bytes its own mapping,
returned to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def return_freed_memory(mmap_threshold: int = 1 << 20) -> bool:
    """Sets glibc's mmap and trim thresholds for this process (other C libraries: no change).

    Args:
        mmap_threshold: the smallest allocation, in bytes, served by its own mapping.

    Returns:
        Whether the thresholds were set.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, mmap_threshold)
    )
