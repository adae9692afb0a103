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
    # verl: lr_warmup_steps > 0 wins over lr_warmup_steps_ratio
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_steps_ratio * total_steps)
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
    # num_cycles waves over the decay (0.5: one half wave, lr down to the floor); never below the floor
    wave = 0.5 * (1 + math.cos(2 * math.pi * cfg.num_cycles * min(1.0, progress)))
    return max(floor, floor + (1 - floor) * wave)


def build_scheduler(optimizer, total_steps: int, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
