"""``trainer.host_memory=keep`` (kdrun.engine.environment.keep_host_memory): freed host buffers are reused, so a
repeated step's allocations fault no pages in, and train() applies it on the CPU only when asked."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kdrun.engine.environment as R
from kdrun.config import TrainerConfig

# Allocates and frees six 40 MB buffers six times with glibc's defaults, then six times after
# keep_host_memory() (mallopt is process-wide: one process, defaults first), and prints the minor page
# faults of each round: two lines. 40 MB is above the largest mmap threshold glibc's dynamic adjustment
# reaches (32 MiB on 64-bit), so with the defaults every such buffer is always a fresh mapping; smaller
# ones (a CIFAR step's 4 MB activations) fault in some steps and not others, depending on what else the
# process allocated (0-14 300 faults per step, benchmarks/RESULTS.md).
CYCLES = """
import resource, torch
from kdrun.engine.environment import keep_host_memory

def rounds():
    out = []
    for _ in range(6):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ts = [torch.ones(10 * 2**20 + 1024 * k) for k in range(6)]
        del ts
        out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(" ".join(map(str, out)))

rounds()
assert keep_host_memory()
rounds()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_reused_without_page_faults() -> None:
    out = subprocess.run([sys.executable, "-c", CYCLES], capture_output=True, text=True, check=True)
    default, keep = ([int(v) for v in line.split()] for line in out.stdout.splitlines())
    pages = 6 * (40 * 2**20) // 4096  # one round's buffers, in 4 KiB pages
    # glibc's defaults: each round maps its buffers afresh (their first touch faults every page in) ...
    assert min(default[2:]) > pages // 2, default
    # ... kept: once warm (the heap grows to the peak in the first rounds), the same memory is handed out
    # again, already mapped.
    assert max(keep[3:]) < pages // 100, keep


@pytest.mark.parametrize("device, mode, applied", [("cpu", "keep", True), ("cpu", "release", False),
                                                     ("cuda", "keep", False)])
def test_set_backend_flags_applies_it_on_the_cpu_when_asked(monkeypatch: pytest.MonkeyPatch, device: str,
                                                             mode: str, applied: bool) -> None:
    calls: list[int] = []
    monkeypatch.setattr(R, "keep_host_memory", lambda: calls.append(1) or True)
    # The backend flags are saved and restored by hand: `torch.backends.cuda.matmul.allow_tf32` is served by
    # the module's __getattr__/__setattr__, which monkeypatch cannot restore (pytest 9: teardown fails with
    # "'cuBLASModule' object has no attribute 'allow_tf32'").
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    try:
        R.set_backend_flags(TrainerConfig(host_memory=mode), torch.device(device))
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved
    assert calls == ([1] if applied else [])
