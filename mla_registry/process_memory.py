"""The process's memory: its peak resident size, and keeping freed tensor memory from piling up.

glibc serves large allocations from ``mmap`` (returned to the system when freed) only above a threshold that it
raises every time such a block is freed, and returns the top of its heap to the system beyond a trim threshold it
raises with it; the result depends on the history of the process. :func:`limit_heap_growth` fixes both: blocks
up to 32 MiB (every per-operation buffer of the encoder and of a decoding step) come from the heap and are reused
without new page faults, larger ones (a batch's encoder output) are mapped and returned when freed, and the heap
keeps up to 64 MiB of free top. Measured on 2 cores (tiny.en encoder, 8 clips in slices of 2): 230-240 ms per
clip with glibc's defaults or these thresholds, 316-336 ms with a 1 MiB mmap threshold (the earlier setting: it
mapped and zero-filled every buffer afresh, 2.1 million page faults, 4-5 s of system time per 32 clips). Peak
RSS of evaluating 24, 200 and 600 utterances on a 256-wide Whisper (a 16 MiB encoder-output budget): 841, 880,
880 MiB (glibc's defaults 835, 873, 884; a 1 MiB threshold 775, 777, 781): it levels off, it does not grow
with the test set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import resource
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
MMAP_THRESHOLD_BYTES = 32 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


@functools.cache
def limit_heap_growth() -> bool:
    """Fix glibc's mmap and trim thresholds (once per process; a no-op where the C library is not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
                    and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
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
