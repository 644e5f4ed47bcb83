"""The heap settings of process_memory: buffers reused rather than mapped and zero-filled afresh by every
operation (page faults counted, not timed), and the peak RSS of a run (test_encoder_cache checks it stays flat)."""

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import ctypes, ctypes.util, json, resource, sys, torch
from mla_registry import model_refs, process_memory, whisper
mode, work = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
if mode == "reuse":
    assert process_memory.reuse_heap_memory()
elif mode == "1mib":  # the first setting, for comparison
    libc.mallopt(process_memory.M_MMAP_THRESHOLD, 1 << 20)
elif mode == "32mib":  # the second: blocks above 32 MiB mapped afresh
    libc.mallopt(process_memory.M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(process_memory.M_TRIM_THRESHOLD, 64 << 20)
torch.set_num_threads(1)
model = model_refs.load_model("bundled:whisper-tiny.en").eval()
if work == "encode":  # every buffer below 32 MiB
    feats = torch.randn(4, model.config.num_mel_bins, 3000)
    run = lambda: whisper.encode(model, feats)
else:  # teacher forcing at batch 16: 37 MB cross-attention K/V per layer, 120 MB of logits
    hidden = torch.randn(16, 1500, model.config.d_model)
    ids = torch.randint(0, 50000, (16, 40))
    def run():
        out = model.model.decoder(input_ids=ids, encoder_hidden_states=hidden, use_cache=False)
        return torch.log_softmax(model.proj_out(out.last_hidden_state), -1)
with torch.inference_mode():
    for _ in range(2):  # warm: the heap grows to the passes' working set (one pass can leave it short of it)
        run()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run()
    print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def faults(mode: str, work: str) -> int:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode, work], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["faults"]


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")


@linux_only
def test_encoder_buffers_are_reused_not_faulted_in_again():
    reused, one_mib = faults("reuse", "encode"), faults("1mib", "encode")
    print(f"minor page faults, an encoder pass over 4 clips after two: {reused} reused, {one_mib} with a 1 MiB "
          "threshold")
    # a third pass over 4 clips: the 1 MiB threshold maps and zero-fills each buffer again (~65k faults a clip)
    assert one_mib > 100_000, one_mib
    assert reused < one_mib / 10, (reused, one_mib)


@linux_only
def test_blocks_above_32_mib_are_reused_too():
    reused, mapped = faults("reuse", "logits"), faults("32mib", "logits")
    print(f"minor page faults, a teacher-forced pass at batch 16 after two: {reused} reused, {mapped} with a 32 MiB "
          "mmap threshold")
    # the logits alone are 16 x 40 x 51864 floats (~32,000 pages of 4 KiB), mapped afresh above the threshold
    assert mapped > 30_000, mapped
    assert reused < mapped / 10, (reused, mapped)
