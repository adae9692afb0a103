"""Set up the GPU's libraries on a side thread while the model is read on the host.

The first matmul of a process creates cuBLAS/cuBLASLt handles and workspaces and loads
its kernels, and the first backward starts autograd's device thread: a few hundred
milliseconds that otherwise land in the first training step. They run in C++ with the GIL
released, so they overlap the model build (from_pretrained on the CPU) at no cost. Handles
go back to PyTorch's per-device pool when the thread ends, and the training thread takes
them from there. Started by the trainer's model read (models/early_read.py), which no worker
process fork crosses: none is forked while the thread is in the CUDA driver.
"""

from __future__ import annotations

import logging
import threading
from typing import Optional

import torch

log = logging.getLogger("verlite.engine")


def _warm(device: torch.device) -> None:
    try:
        torch.cuda.set_device(device)  # the current device is per thread
        for dtype in (torch.bfloat16, torch.float32):
            a = torch.randn(256, 256, device=device, dtype=dtype, requires_grad=True)
            (a @ a).float().square().sum().backward()
        torch.cuda.synchronize(device)
    except Exception as e:  # a warm-up only saves time; the training thread meets any real problem itself
        log.debug("GPU warm-up skipped: %s", e)


def start(device: torch.device) -> Optional[threading.Thread]:
    if device.type != "cuda":
        return None
    thread = threading.Thread(target=_warm, args=(device,), name="verlite-gpu-warmup", daemon=True)
    thread.start()
    return thread


def finish(thread: Optional[threading.Thread]) -> None:
    if thread is not None:
        thread.join()
