"""Give the C heap's free pages back to the kernel once start-up (or a reload) is over.

Start-up allocates and frees a lot (imports, compiling YARA rules, reading config and hash
lists); glibc keeps freed heap pages mapped, and every reader process would carry them for
its whole life: measured here, 2.1 MiB of 29 MiB per process at READY. `malloc_trim(0)`
returns them (MADV_DONTNEED on free chunks). Where the C library has no malloc_trim (musl),
this does nothing.
"""

from __future__ import annotations

import ctypes
import gc

try:
    _trim = ctypes.CDLL(None).malloc_trim
    _trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _trim = None


def release_free_memory() -> bool:
    """Collect Python's garbage, then return the C heap's free pages; False if unsupported."""
    gc.collect()
    if _trim is None:
        return False
    _trim(0)
    return True
