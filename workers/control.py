"""A remote-control command answered by the Celery main process itself.

``celery inspect ragq_main_process`` (or ``app.control.broadcast(..., reply=True)``)
says what the process that forks the pool has loaded: it must not have imported torch
nor initialised CUDA, or a pool process forked after a kill or an OOM cannot use the
GPU (see ``common/devices.py``). Remote-control commands run in the main process's
consumer, never in a pool process, so this observes the process that matters.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from celery.worker.control import inspect_command

from common.devices import CUDA_ENV

#: Modules whose presence in the main process would mean a model library was loaded there.
HEAVY_MODULES = ("torch", "transformers", "llama_cpp")


@inspect_command()
def ragq_main_process(state: Any) -> dict[str, Any]:
    """pid, heavy modules loaded, whether CUDA is initialised, and the CUDA environment."""
    torch = sys.modules.get("torch")
    return {
        "pid": os.getpid(),
        "loaded": sorted(m for m in HEAVY_MODULES if m in sys.modules),
        "cuda_initialized": bool(torch is not None and torch.cuda.is_initialized()),
        "env": {key: os.environ.get(key) for key in CUDA_ENV},
    }
