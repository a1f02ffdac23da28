"""Host allocator tuning: keep freed temporaries in the heap instead of returning them to the OS.

Why: a decode step allocates and frees the same few-MiB temporaries in every layer (gathered pages, unpacked KIVI
codes, attention scores). glibc serves blocks above its mmap threshold (128 KiB, raised dynamically up to the size
of the largest block freed) with a fresh ``mmap`` and gives them back with ``munmap``, and trims the heap's free
top above twice that; either way the next step touches new pages, and the kernel zeroes every 4 KiB page on its
first touch. Measured on the 2-core EPYC (1 thread, one SmolLM2 layer's 2-bit KIVI decode attention over 7,936
tokens): 2,498 page faults and 17.8 ms per call with glibc's defaults, 74 faults and 9.5 ms with a fixed 32 MiB mmap
threshold and a large trim threshold; a full-cache decode step at depth 8000 went from 148 to 117 ms.

``configure_host_allocator`` sets both through ``mallopt`` once per process (glibc only; elsewhere it does nothing).
The cost is memory the process keeps after a peak: at most ``LONGFIT_MALLOC_KEEP`` bytes of free heap top (default
``256MiB``; ``0`` leaves glibc's defaults untouched). Blocks above 32 MiB (prefill logits, the KV pool itself) are
still mapped and unmapped on their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform

from longfit.config import parse_bytes

logger = logging.getLogger("longfit")

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's maximum (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
DEFAULT_KEEP = 256 << 20


def keep_bytes() -> int:
    """``$LONGFIT_MALLOC_KEEP`` in bytes (``256MiB`` style units allowed), else 256 MiB."""
    value = os.environ.get("LONGFIT_MALLOC_KEEP", "").strip()
    if not value:
        return DEFAULT_KEEP
    if value == "0":
        return 0
    return parse_bytes(value, "LONGFIT_MALLOC_KEEP")


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2`` (2.33+): ``fordblks`` is the free bytes the heap holds."""

    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (Linux), loaded once; None elsewhere."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018  (present, or AttributeError)
    except (OSError, AttributeError):
        return None
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
    return libc


@functools.lru_cache(maxsize=1)
def configure_host_allocator() -> bool:
    """Apply the thresholds once per process; True when glibc accepted them."""
    keep = keep_bytes()
    libc = _glibc()
    if keep == 0 or libc is None:
        return False
    try:
        ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(keep, 2**31 - 1))) == 1 and ok
    except AttributeError:  # no mallopt in this libc
        return False
    if not ok:
        logger.debug("mallopt refused the host allocator thresholds; glibc defaults stay")
    return ok


# Free heap the loader tolerates before it trims: one trim per ~32 MiB freed, not one per layer (a trim costs the
# page faults of refilling the heap: trimming after every SmolLM2 bf16 layer added ~1.5 s to a 2 s load).
LOADING_SLACK = 32 << 20


def release_free_heap(min_free: int = 0) -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``; elsewhere nothing) when it holds at least
    ``min_free`` free bytes (glibc 2.33+ reports them; older ones trim whenever asked). True when it trimmed.

    The loader calls it as it goes: loading frees many temporaries of a few MiB (dequantized row blocks, unpacked
    codes, plain weights replaced by packed ones) that the retained-top policy above would otherwise keep resident,
    and that pile up beside the weights being built (SmolLM2 ``--weights auto``: 721 MiB peak before, 429 after).
    The thresholds are not changed, so decode steps keep their warm heap. A trim costs its page faults later, hence
    ``min_free`` while loading.
    """
    libc = _glibc()
    if libc is None:
        return False
    if min_free > 0 and hasattr(libc, "mallinfo2") and libc.mallinfo2().fordblks < min_free:
        return False
    libc.malloc_trim(ctypes.c_size_t(0))
    return True
