"""Settings of the host process a training run asks for (no framework, no NumPy rule: the process itself).

`retain_freed_memory()`: glibc's malloc hands every allocation above 32 MB to the kernel as fresh pages
(mmap) and returns it on free, so a training step that allocates the same large buffers every update
(activations, gradients, XLA's block of temporaries) faults in every page of them again each time: the
125m bf16 update on a 2-core CPU took 340k-410k page faults and 0.7-1.0 s of system time per step in TF and
Flax, 90k-200k in PyTorch, 570k in the Hugging Face loop (`bench/bench_train.py` counts them per row).
Retained, freed memory stays in the process and the next step reuses those pages: no faults, no system
time; the price is memory not handed back to the system between steps (peak RSS of the TF trainer 4.3 ->
5.5 GB). glibc's knobs (mallopt): no mmap for large blocks, one arena for all threads (a thread's own arena
could not hold them), free memory at the top of the heap kept up to 2 GB. Linux with glibc only; elsewhere
nothing changes. `optkit train` calls it unless given --no-retain-memory; library users call it themselves
(it changes the whole process, so no trainer does it on its own).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's malloc.h


def retain_freed_memory() -> bool:
    """Keeps freed memory in this process for reuse (see the module docstring); True when glibc took it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in
               [(_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)])
