"""Where and how the run computes: the device, the seeds, the backend flags and autocast."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import random
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdrun.runtime import distributed
from kdrun.config import ConfigError, TrainerConfig


def pick_device(accelerator: str) -> torch.device:
    """This process's device: under DDP, LOCAL_RANK picks the GPU (one GPU per process)."""
    if distributed.device_type(accelerator) == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator=cuda but no CUDA device is visible; use "
                              "trainer.accelerator=cpu or auto.")
        return torch.device("cuda", distributed.cuda_index(int(os.environ.get("LOCAL_RANK", 0))))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_backend_flags(trainer: TrainerConfig, device: torch.device) -> None:
    """``trainer.deterministic``: deterministic kernels (resume is then bit-identical on GPUs too);
    otherwise cuDNN autotuning and TF32 matmuls on CUDA, as the papers' training code runs.
    ``trainer.host_memory=keep`` on the CPU: :func:`keep_host_memory` (measured: no page faults per step
    instead of thousands; benchmarks/RESULTS.md). GPU runs keep the C library's defaults (unmeasured)."""
    if device.type == "cpu" and trainer.host_memory == "keep":
        keep_host_memory()
    if trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# glibc mallopt(3) parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_MMAP_THRESHOLD = 256 * 2**20  # host buffers below this come from the heap and are reused
KEEP_TRIM_THRESHOLD = 1 << 30      # free heap top kept up to this size instead of returned to the OS


def keep_host_memory() -> bool:
    """``trainer.host_memory=keep``: make glibc's malloc keep freed host memory for reuse. True when applied.

    A CPU training step allocates and frees the same activation buffers (megabytes each) every step.
    With glibc's defaults a buffer above the mmap threshold is its own mapping, unmapped when freed, and a
    free heap top above the trim threshold is returned to the OS, so the next step faults the same pages
    in again and the kernel zeroes them: thousands of page faults per step, which the PyTorch CPU tuning
    guide names as the reason to swap in jemalloc/TCMalloc ("reusing memory as much as possible", "holding
    such caches even after deallocation also helps avoid costly system calls": pytorch/tutorials@09d930d
    ``recipes_source/recipes/tuning_guide.py``, section "Switch Memory allocator"). Raising the
    two thresholds (``mallopt(M_MMAP_THRESHOLD)``/``M_TRIM_THRESHOLD``, which also switches off glibc's
    dynamic adjustment of both) gets the same reuse from the C library the process already has. The cost
    is that the process keeps its peak host memory until it exits, as those allocators do.
    Linux/glibc only; elsewhere nothing changes and False is returned."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                   KEEP_TRIM_THRESHOLD))


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``trainer.precision``: fp32 (no autocast), bf16 or fp16 autocast on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """``trainer.sync_batchnorm``: BatchNorm statistics over the global batch (all ranks) instead of each
    rank's slice. Only meaningful under DDP; PyTorch's SyncBatchNorm runs on GPUs only."""
    if device.type == "cpu":
        raise ConfigError("trainer.sync_batchnorm=true needs CUDA (PyTorch's SyncBatchNorm has no CPU "
                          "kernel); set trainer.sync_batchnorm=false or trainer.accelerator=cuda.")
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


def git_commit() -> str | None:
    """The commit of the kdrun checkout that ran (for results.json), or ``None`` outside git."""
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None
