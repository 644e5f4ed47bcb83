"""The process's memory: its peak resident size, and freed tensor memory reused instead of mapped afresh.

glibc serves every allocation above its mmap threshold (at most 32 MiB, however it is set) from a fresh ``mmap``
and unmaps it when freed, so each such tensor is zero-filled by the kernel page by page the next time it is
needed. A batch-16 step of this package's work makes several: the 51864-wide logits of teacher forcing (120 MB),
the cross-attention K/V of a decode (37 MB per layer and tensor for tiny.en), their copies when finished rows
are dropped. :func:`reuse_heap_memory` turns ``mmap`` off for the main arena (``M_MMAP_MAX`` 0) so every block
comes from the heap and a freed one is reused, and lets the heap keep up to 1 GiB of free top before returning
it (``M_TRIM_THRESHOLD``). Measured on 2 cores, tiny.en, batch 16 (second pass of each): teacher-forced logits
over 40 tokens 750-830 -> 620-670 ms, 96,000-204,000 -> 0 minor page faults; a 30-step greedy decode
1220-1370 -> 1100-1130 ms, 63,000-144,000 -> 4 faults; the encoder, whose blocks were already below the
threshold, unchanged (about 3.7 s). Peak RSS of evaluating 24, 200 and 600 utterances on a 256-wide Whisper
(a 16 MiB encoder-output budget): 851, 892, 914 MiB (the previous setting, a 32 MiB mmap threshold and 64 MiB
trim threshold: 849, 863, 883): it levels off, it does not grow with the test set. The earlier 1 MiB mmap
threshold mapped even the encoder's buffers afresh (2.1 million page faults per 32 clips).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
TRIM_THRESHOLD_BYTES = 1 << 30


@functools.cache
def reuse_heap_memory() -> bool:
    """Serve large blocks from glibc's heap, reused once freed, rather than from fresh mappings, and keep up to
    1 GiB of free heap (once per process, for the whole process; a no-op where the C library is not glibc).
    Threads other than the main one still map blocks their own arenas cannot hold."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far.

    On Linux this is ``VmHWM`` of ``/proc/self/status``: the high-water mark of this process's own memory.
    ``getrusage``'s ``ru_maxrss`` is not: it survives ``exec``, so a program started by a large parent (pytest
    after a few hundred tests, say) reports the parent's peak as its own. Elsewhere ``ru_maxrss`` (macOS: bytes)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
