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
  LR schedule's state (engine/optim.py), so a resumed run clips exactly as the uninterrupted one
  (a load without that state clips its first step by shares again). A step whose gradient is
  not finite keeps the previous norm; after a bad first step the next one clips by shares.
- NaN/inf: a non-finite loss (one host read after the forward passes) skips the whole step
  before any weight is touched. A non-finite gradient with a finite loss skips that weight's
  update with torch's AdamW (found_inf, on the device) and zeroes its non-finite entries with
  the other optimizers; the step counts as skipped either way.
- One process, no FSDP sharding, optimizer state on the GPU: FSDP2 writes sharded gradients
  itself (no accumulation hook fires) and a host-side optimizer would wait on every weight.
- Updates go by bucket, a decoder layer's weights together (`buckets`; any other weight on
  its own): a layer's gradients all complete within its backward, so holding them until the
  last one costs no memory the plan does not count, and the layer costs one norm, one scale
  and one optimizer call instead of a dozen of each. Per-weight host work was on the step's
  critical path: on the H100 the 1.5B full fine-tune ran 0.38 s a step with bitsandbytes'
  update and 0.50 s with torchao's, whose per-weight call costs more host time.
"""

from __future__ import annotations

import math

import torch

from verlite.errors import VerliteError

PREV_NORM = "fused_backward_prev_grad_norm"  # its key in the schedule's state dict


class FusedBackward:
    def __init__(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], clip_grad: float,
                 buckets: list[list[torch.nn.Parameter]] | None = None):
        if any(hasattr(p, "to_local") for p in params):
            raise VerliteError("optim.fused_backward=true runs on one GPU without FSDP sharding (no cpu_offload, one "
                               "process); set optim.fused_backward=false")
        self.optimizer = optimizer
        self.params = params
        self.clip = clip_grad
        self.total = max(1, sum(p.numel() for p in params))
        self.found_inf_ok = bool(optimizer.defaults.get("fused"))  # torch's fused AdamW skips on the device
        trained = set(params)
        grouped: list[list[torch.nn.Parameter]] = []
        seen: set = set()
        for bucket in buckets or []:
            mine = [p for p in bucket if p in trained and p not in seen]
            seen.update(mine)
            if mine:
                grouped.append(mine)
        self._set_buckets(grouped + [[p] for p in params if p not in seen])
        self.armed = False
        self.updated = 0  # weights updated in the current backward
        self._prev_norm: torch.Tensor | None = None  # the last step's global norm, on the device
        self._finite_seen = False  # whether prev_norm is known finite (read once on the host)
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    @property
    def prev_norm(self) -> torch.Tensor | None:
        return self._prev_norm

    @prev_norm.setter
    def prev_norm(self, norm: torch.Tensor | None) -> None:  # a resumed run's, from the schedule state
        self._prev_norm = norm
        self._finite_seen = False

    # ---- one step ------------------------------------------------------------------------
    def arm(self, device: torch.device) -> None:
        """The next backward updates the weights."""
        self.sq = torch.zeros((), device=device, dtype=torch.float32)
        self.bad = torch.zeros((), device=device, dtype=torch.bool)
        prev = self._prev_norm
        if prev is not None and self.clip > 0 and not self._finite_seen:
            # Only a bad first step leaves a non-finite norm here (later bad steps keep the last
            # finite one), and that must not turn clipping off for the next step. One host read
            # until a finite norm is seen: free, as the step's loss check has already waited
            # for the previous backward.
            self._finite_seen = bool(torch.isfinite(prev))
        if prev is None or self.clip <= 0 or not self._finite_seen:
            self.scale = None  # clipped by shares, as a first step
        else:
            self.scale = (self.clip / (prev.to(device, torch.float32) + 1e-6)).clamp(max=1.0)
        self.arrived: list[list[torch.nn.Parameter]] = [[] for _ in self.buckets]
        # Looked up each step: loading a checkpoint's optimizer state replaces the group dicts
        # (and the LR schedule writes to the new ones).
        self.group_of = {p: g for g in self.optimizer.param_groups for p in g["params"]}
        self.updated = 0
        self.armed = True

    def finish(self) -> torch.Tensor:
        """After a backward that completed: what is still waiting is updated, and this step's
        global gradient norm (before clipping) is returned and kept for the next step's clip
        (a step with a non-finite gradient keeps the previous one)."""
        self._learn_buckets()
        # Weights with a gradient not yet applied: a bucket some of whose weights got no
        # gradient this step, or a weight that got one only in an earlier micro-batch.
        waiting = [p for p in self.params if p.grad is not None]
        if waiting:
            self._apply(waiting)
        self.armed = False
        norm = self.sq.sqrt()
        if self.updated:
            prev = self._prev_norm
            # A norm that overflowed (every bucket finite, their sum not) is kept out like a bad
            # step's: the next step would otherwise scale every gradient by clip / inf = 0.
            bad = self.bad | ~torch.isfinite(norm)
            self._prev_norm = norm if prev is None else torch.where(bad & torch.isfinite(prev), prev, norm)
        return norm

    def abandon(self) -> int:
        """After a backward that raised (an OOM): nothing more is applied (no memory is asked
        for) and the hooks are disarmed, so a retry starts clean. Returns how many weights had
        already been updated in it (a step that moved weights cannot be retried)."""
        self.armed = False
        self.arrived = [[] for _ in self.buckets]
        return self.updated

    def _learn_buckets(self) -> None:
        """A bucket some of whose weights got no gradient would hold the others' until the end
        of backward (memory the plan does not count): those weights go to buckets of their own."""
        partial = [i for i, got in enumerate(self.arrived) if got]
        if not partial:
            return
        buckets = list(self.buckets)
        for i in partial:
            got = set(self.arrived[i])
            buckets += [[p] for p in buckets[i] if p not in got]
            buckets[i] = [p for p in buckets[i] if p in got]
            self.arrived[i] = []
        self._set_buckets(buckets)

    def _set_buckets(self, buckets: list[list[torch.nn.Parameter]]) -> None:
        self.buckets = buckets
        self.bucket_of = {p: i for i, b in enumerate(buckets) for p in b}

    def _hook(self, p: torch.nn.Parameter) -> None:
        if not self.armed:
            return  # an earlier micro-batch of the step: gradients accumulate as usual
        i = self.bucket_of[p]
        arrived = self.arrived[i]
        arrived.append(p)
        if len(arrived) == len(self.buckets[i]):
            self.arrived[i] = []
            self._apply(arrived)

    def _apply(self, bucket: list[torch.nn.Parameter]) -> None:
        """Norm, clip, NaN guard and update of a bucket's gradients, then free them."""
        grads = [p.grad for p in bucket]
        norms = torch._foreach_norm(grads, 2, dtype=torch.float32)
        sq = torch.stack(norms).square().sum()
        self.sq += sq
        finite = torch.isfinite(sq)
        self.bad |= ~finite
        if self.clip > 0 and self.scale is None:  # first step: each gradient to its share of the limit
            for p, g, norm in zip(bucket, grads, norms):
                limit = self.clip * math.sqrt(p.numel() / self.total)
                g.mul_((limit / (norm + 1e-6)).clamp(max=1.0).to(g.dtype))
        elif self.clip > 0:
            # One foreach call per dtype, the factor in the gradients' dtype: what torch's own
            # clip_grads_with_norm_ computes on CUDA (a 0-dim CUDA factor is cast to the common
            # dtype), and the fast foreach path (a factor of another dtype takes one kernel per
            # tensor).
            for dtype in {g.dtype for g in grads}:
                torch._foreach_mul_([g for g in grads if g.dtype == dtype], self.scale.to(dtype))
        if self.found_inf_ok:
            self.optimizer.found_inf = (~finite).float()
        else:
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
        # Counted before the call: an optimizer that raises part-way (an OOM) may already have
        # changed moments, step counts or weights in place, so the step must not be retried.
        self.updated += len(bucket)
        self._step(bucket)
        for p in bucket:
            p.grad = None

    def _step(self, bucket: list[torch.nn.Parameter]) -> None:
        """optimizer.step() for `bucket` alone: each of its groups narrowed to the bucket's weights."""
        opt = self.optimizer
        narrowed: dict[int, list[torch.nn.Parameter]] = {}
        for p in bucket:
            narrowed.setdefault(id(self.group_of[p]), []).append(p)
        groups = opt.param_groups
        saved = [(g, g["params"]) for g in groups if id(g) in narrowed]
        opt.param_groups = [g for g, _ in saved]
        for g, _ in saved:
            g["params"] = narrowed[id(g)]
        try:
            opt.step()
        finally:
            opt.param_groups = groups
            for g, params in saved:
                g["params"] = params

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def attach(optimizer: torch.optim.Optimizer, params, clip_grad: float,
           buckets: list[list[torch.nn.Parameter]] | None = None) -> FusedBackward:
    fused = FusedBackward(optimizer, [p for p in params if p.requires_grad], clip_grad, buckets)
    optimizer.fused_backward = fused  # train_step finds it here
    return fused
