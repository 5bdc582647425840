"""Which device a worker process has, found out without initialising CUDA.

A process that initialises CUDA and then forks leaves children that cannot use it
("CUDA initialization error" in a pool process forked after a kill or an OOM). The
Celery main process forks every pool process, so it must never touch CUDA: it does not
import torch, and what it reports comes from ``CUDA_VISIBLE_DEVICES`` and the settings.
Only a pool process, once its model is on a GPU, reports the CUDA device itself.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.config import Settings

#: Environment every worker process starts with (``setdefault``: an operator's own wins).
#: NVML-based ``torch.cuda.is_available()`` does not initialise CUDA, so even a stray
#: check before a fork is harmless; PCI bus order makes CUDA's device N the card that
#: ``nvidia-smi`` (and so ``gpuN`` in a worker's name) calls N, not the fastest first.
CUDA_ENV = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def apply_cuda_env(env: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Add :data:`CUDA_ENV` to ``env`` (os.environ, or a child's environment) where unset."""
    for key, value in CUDA_ENV.items():
        env.setdefault(key, value)
    return env


def device_info(settings: Settings) -> dict[str, str]:
    """This process's device, for metrics: never imports torch nor initialises CUDA.

    From ``CUDA_VISIBLE_DEVICES`` and ``RAGQ_DEVICE`` alone, unless torch is already
    loaded and has initialised CUDA here (a pool process after warm-up): then the CUDA
    device, its name and memory (peak allocated, reserved) are reported.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    info = {"gpu": visible or ""}
    if settings.device != "auto":
        info["device"] = settings.device
    elif visible is not None and visible.strip() in ("", "-1"):
        info["device"] = "cpu"
    elif visible:
        info["device"] = "cuda:0"  # the one card this process sees (as planned by the launcher)
    torch = sys.modules.get("torch")
    try:
        # is_initialized() only reads a flag: it never initialises CUDA itself
        if torch is not None and torch.cuda.is_initialized():
            index = torch.cuda.current_device()
            info.update(device=f"cuda:{index}", gpu_name=torch.cuda.get_device_name(index),
                        gpu_memory_peak_bytes=str(torch.cuda.max_memory_allocated(index)),
                        gpu_memory_reserved_bytes=str(torch.cuda.memory_reserved(index)))
        elif (torch is not None and "device" not in info
              and os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and not torch.cuda.is_available()):
            info["device"] = "cpu"  # asked through NVML: CUDA stays uninitialised
    except Exception:  # metrics never break a task
        pass
    return info
