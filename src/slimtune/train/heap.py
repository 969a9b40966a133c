"""The C heap under CPU tensors: where large blocks come from, and handing free pages back.

PyTorch allocates CPU tensors with plain `malloc`. On glibc, a block larger than the mmap threshold
gets its own mapping and is unmapped on free; smaller ones come from the heap, whose free holes stay
resident. glibc raises that threshold on its own (up to 32 MiB) each time a mapped block is freed, so
after the first step the per-step temporaries of a few MiB to tens of MiB (the LM head's logits
chunks, for one) all come from the heap, and their holes fragment it: on the bundled model ~350-420 MB of
a ~770 MB heap was free at steady state, yet resident.

Two explicit, process-wide levers (both are no-ops where the C library is not glibc):
- `set_mmap_threshold(n)`: fix the threshold at n bytes (which also stops glibc moving it), so blocks
  of n bytes and more are mapped and unmapped each time they are used; costs page faults per use.
- `release_free_memory()`: `malloc_trim(0)`, which returns the free pages inside the heap to the
  kernel (madvise), not only its top; the next step faults them in again.
"""

from __future__ import annotations

import ctypes
import functools

_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (has mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def heap_control_available() -> bool:
    """Whether this process's allocator can be tuned and trimmed here (glibc)."""
    return _glibc() is not None


def set_mmap_threshold(size_bytes: int) -> bool:
    """Serve every allocation of `size_bytes` or more with its own mapping, freed to the kernel at once.

    Returns False (and changes nothing) where the C library is not glibc or refuses the value.
    """
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, int(size_bytes)) == 1)


def release_free_memory() -> bool:
    """Return the heap's free pages to the kernel; True when glibc released some."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0) == 1)
