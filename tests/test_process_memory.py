"""The heap settings of process_memory: buffers reused rather than mapped and zero-filled afresh by every
operation (page faults counted, not timed), and the peak RSS of a run (test_encoder_cache checks it stays flat)."""

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, resource, sys, torch
from mla_registry import model_refs, process_memory, whisper
if sys.argv[1] == "limit":
    process_memory.limit_heap_growth()
elif sys.argv[1] == "1mib":  # the earlier setting, for comparison
    import ctypes, ctypes.util
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(process_memory.M_MMAP_THRESHOLD, 1 << 20)
torch.set_num_threads(1)
model = model_refs.load_model("bundled:whisper-tiny.en").eval()
feats = torch.randn(4, model.config.num_mel_bins, 3000)
with torch.inference_mode():
    whisper.encode(model, feats)  # warm: the buffers of one pass are allocated once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    whisper.encode(model, feats)
    print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def faults(mode: str) -> int:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["faults"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_encoder_buffers_are_reused_not_faulted_in_again():
    limited, one_mib = faults("limit"), faults("1mib")
    print(f"minor page faults, second encoder pass over 4 clips: {limited} limited, {one_mib} with a 1 MiB threshold")
    # a second pass over 4 clips: the 1 MiB threshold maps and zero-fills each buffer again (~65k faults a clip)
    assert one_mib > 100_000, one_mib
    assert limited < one_mib / 10, (limited, one_mib)
