"""Where and how the run computes: the device, the seeds, the backend flags and autocast."""
from __future__ import annotations

import contextlib
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdrun import distributed as D
from kdrun.config import ConfigError, TrainerConfig


def pick_device(accelerator: str) -> torch.device:
    """This process's device: under DDP, LOCAL_RANK picks the GPU (one GPU per process)."""
    if D.device_type(accelerator) == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("trainer.accelerator=cuda but no CUDA device is visible; use "
                              "trainer.accelerator=cpu or auto.")
        return torch.device("cuda", D.cuda_index(int(os.environ.get("LOCAL_RANK", 0))))
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_backend_flags(t: TrainerConfig, device: torch.device) -> None:
    """``trainer.deterministic``: deterministic kernels (resume is then bit-identical on GPUs too);
    otherwise cuDNN autotuning and TF32 matmuls on CUDA, as the papers' training code runs."""
    if t.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


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
