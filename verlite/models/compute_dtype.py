"""Activations in the compute dtype from the embedding on: one GPU computes as several do.

On several GPUs FSDP computes with bf16 copies of the weights
(`model.fsdp_config.mixed_precision.param_dtype`), so the embedding's output, and with it the
residual stream that runs through every decoder layer, is bf16. One GPU runs the plain module
under autocast instead (engine/sharding.py: FSDP's hooks cost 10 % of a step there), and
autocast leaves an fp32 embedding's output fp32: every residual add, norm and their backward
then moves twice the bytes, and each linear casts its input to bf16 again (q, k and v each
their own copy). Casting the embedding's output to autocast's dtype gives one GPU the
numerics of several (and of verl, whose FSDP trainer computes the same way) and takes those
passes off an eager step that is bound by its element-wise kernels (bench/RESULTS.md, ninth
session). The weights stay fp32 masters; only what flows between the layers changes.

`VERLITE_FP32_STREAM=1` keeps the fp32 stream (to measure one against the other).
"""

from __future__ import annotations

import os

import torch


def _to_autocast_dtype(module: torch.nn.Module, args, output):
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return output
    device = output.device.type
    if not torch.is_autocast_enabled(device):
        return output  # CPU steps, FSDP steps and evaluation outside autocast keep their dtype
    dtype = torch.get_autocast_dtype(device)
    return output if output.dtype == dtype else output.to(dtype)


def fp32_stream_requested() -> bool:
    """VERLITE_FP32_STREAM=1: leave an fp32 embedding's output fp32 (no hook)."""
    return os.environ.get("VERLITE_FP32_STREAM", "").strip() in ("1", "true")


def stream_in_compute_dtype(model: torch.nn.Module) -> bool:
    """Cast the input embedding's output to autocast's dtype whenever autocast is on; True
    when the hook was added."""
    if fp32_stream_requested():
        return False
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None or getattr(embed, "_verlite_compute_stream", False):
        return False
    embed.register_forward_hook(_to_autocast_dtype)
    embed._verlite_compute_stream = True
    return True
