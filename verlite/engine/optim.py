"""AdamW and the learning-rate schedule (warmup, then cosine / linear / constant)."""

from __future__ import annotations

import math

import torch

from verlite.config.schema import OptimConfig


def use_fused(device: torch.device, offloaded: bool) -> bool:
    # Fused AdamW is one kernel for all parameters on GPU; with offload the state is on the host.
    return device.type == "cuda" and not offloaded


def build_optimizer(params, cfg: OptimConfig, device: torch.device, offloaded: bool) -> torch.optim.AdamW:
    params = [p for p in params if p.requires_grad]
    fused = use_fused(device, offloaded)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                             fused=fused, foreach=None if fused else True)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier on optim.lr for the update made at 0-based `step`."""
    warmup = int(cfg.warmup_steps_ratio * total_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_scheduler == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    floor = cfg.min_lr_ratio
    if cfg.lr_scheduler == "linear":
        return floor + (1 - floor) * max(0.0, 1 - progress)
    if cfg.lr_scheduler == "wsd":  # warmup, stable, then a linear decay over the last 10%
        return 1.0 if progress < 0.9 else floor + (1 - floor) * max(0.0, (1 - progress) / 0.1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer, total_steps: int, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
