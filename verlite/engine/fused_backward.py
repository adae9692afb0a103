"""The optimizer step fused into backward (optim.fused_backward): each trained weight is
updated, and its gradient freed, as soon as backward has finished that gradient, so the
step never holds every gradient at once. On a small card that is the gradient buffer's
memory (3 GiB for a 1.5B model in bf16) given to activations instead: one micro-batch per
step where the plain step needs several.

What it changes, decided here once:
- Gradient accumulation still works: the step's earlier micro-batches accumulate as usual
  and only the last backward updates (the memory saving then is only the last backward's
  working set; the planner picks fused mode where a step is one micro-batch).
- Clipping (optim.clip_grad > 0) cannot use this step's global norm: no weight may wait for
  it. Step 1 clips each gradient to its share of the limit, clip * sqrt(n_p / n_total)
  (so the global norm is <= clip, as promised); every later step scales all gradients by
  min(1, clip / previous step's global norm). The reported grad_norm is this step's exact
  global norm before clipping, as in the plain step. The previous norm is saved with the
  LR schedule's state (engine/optim.py), so a resumed run clips exactly as the uninterrupted one.
- NaN/inf: a non-finite loss (one host read after the forward passes) skips the whole step
  before any weight is touched. A non-finite gradient with a finite loss skips that weight's
  update with torch's AdamW (found_inf, on the device) and zeroes its non-finite entries with
  the other optimizers; the step counts as skipped either way.
- One process, no FSDP sharding, optimizer state on the GPU: FSDP2 writes sharded gradients
  itself (no accumulation hook fires) and a host-side optimizer would wait on every weight.
"""

from __future__ import annotations

import math

import torch

from verlite.errors import VerliteError

PREV_NORM = "fused_backward_prev_grad_norm"  # its key in the schedule's state dict


class FusedBackward:
    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], clip_grad: float):
        if any(hasattr(p, "to_local") for p in params):
            raise VerliteError("optim.fused_backward=true runs on one GPU without FSDP sharding (no cpu_offload, one "
                               "process); set optim.fused_backward=false")
        self.optimizer = optimizer
        self.params = params
        self.clip = clip_grad
        self.total = max(1, sum(p.numel() for p in params))
        self.group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
        self.found_inf_ok = bool(optimizer.defaults.get("fused"))  # torch's fused AdamW skips on the device
        self.armed = False
        self.updated = 0  # weights updated in the current backward
        self.prev_norm: torch.Tensor | None = None  # the last step's global norm, on the device
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    # ---- one step ------------------------------------------------------------------------
    def arm(self, device: torch.device) -> None:
        """The next backward updates the weights."""
        self.sq = torch.zeros((), device=device, dtype=torch.float32)
        self.bad = torch.zeros((), device=device, dtype=torch.bool)
        prev = self.prev_norm
        self.scale = None if prev is None or self.clip <= 0 else \
            (self.clip / (prev.to(device, torch.float32) + 1e-6)).clamp(max=1.0)
        self.updated = 0
        self.armed = True

    def finish(self) -> torch.Tensor:
        """This step's global gradient norm (before clipping), kept for the next step's clip."""
        self.armed = False
        norm = self.sq.sqrt()
        if self.updated:
            self.prev_norm = norm
        return norm

    def _hook(self, p: torch.nn.Parameter) -> None:
        if not self.armed:
            return  # an earlier micro-batch of the step: gradients accumulate as usual
        g = p.grad
        sq = g.detach().float().square().sum()
        self.sq += sq
        finite = torch.isfinite(sq)
        self.bad |= ~finite
        if self.clip > 0:
            if self.scale is None:  # first step: each gradient to its share of the limit
                limit = self.clip * math.sqrt(p.numel() / self.total)
                g.mul_((limit / (sq.sqrt() + 1e-6)).clamp(max=1.0).to(g.dtype))
            else:
                g.mul_(self.scale.to(g.dtype))
        if self.found_inf_ok:
            self.optimizer.found_inf = (~finite).float()
        else:
            torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        self._step_one(p)
        p.grad = None
        self.updated += 1

    def _step_one(self, p: torch.nn.Parameter) -> None:
        """optimizer.step() for `p` alone: its group, narrowed to it, is the only group."""
        opt, group = self.optimizer, self.group_of[p]
        groups, params = opt.param_groups, group["params"]
        opt.param_groups, group["params"] = [group], [p]
        try:
            opt.step()
        finally:
            opt.param_groups, group["params"] = groups, params

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def attach(optimizer: torch.optim.Optimizer, params, clip_grad: float) -> FusedBackward:
    fused = FusedBackward(optimizer, [p for p in params if p.requires_grad], clip_grad)
    optimizer.fused_backward = fused  # train_step finds it here
    return fused
