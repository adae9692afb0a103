"""One optimizer step over this rank's micro-batches.

The loss is the mean over every loss token of the whole step, across micro-batches and
ranks: each micro-batch's summed loss is divided by the step's global token count before
backward. (A mean of per-micro-batch means would weight short responses more.) FSDP
averages gradients over ranks, so the world size is multiplied back in.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from verlite.data.batching import MicroBatch
from verlite.engine.distributed import all_reduce_sum


@dataclass
class StepResult:
    """Device tensors, so the step needs no host sync; the trainer reads them at log steps."""

    loss: torch.Tensor  # mean loss per loss token over the global step
    grad_norm: torch.Tensor
    skipped: torch.Tensor  # 1.0 when the loss or gradient was NaN/inf and nothing was updated


def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Total gradient norm across all shards; gradients scaled down to max_norm (<= 0: no clipping)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if hasattr(norm, "full_tensor"):  # a DTensor: each rank holds a partial norm of its shards
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, norm, foreach=True)
    return norm


@contextlib.contextmanager
def no_retry_after_oom(where: str):
    """An OOM here is not the micro-batches' doing (their activations are freed) and may have
    left weights or optimizer state half-updated (foreach kernels update in place, AdamW builds
    its state lazily): it ends the run with one line instead of the trainer's halve-and-retry."""
    from verlite.errors import VerliteError

    try:
        yield
    except torch.OutOfMemoryError:
        raise VerliteError(f"out of GPU memory in {where} (halving the micro-batches frees nothing there, and the "
                           "step may be half-applied, so it is not retried); use a smaller optimizer state "
                           "(optim.optimizer=AdamW8bit) or optim.fused_backward=true, or a larger card, then run "
                           "again to resume from the last checkpoint") from None


def train_step(model, optimizer, scheduler, micro_batches: list[MicroBatch], device: torch.device,
               params: list[torch.nn.Parameter], clip_grad: float, autocast: bool, world_size: int) -> StepResult:
    local = sum(mb.num_loss_tokens for mb in micro_batches)
    # A fill kernel, not a host-to-device copy from pageable memory (which may wait for the GPU).
    count = all_reduce_sum(torch.full((1,), float(local), device=device))
    scale = world_size / count.clamp(min=1.0)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    fused = getattr(optimizer, "fused_backward", None)
    if fused is not None:
        return _fused_step(fused, model, optimizer, scheduler, micro_batches, device, scale, count, amp)
    loss_sum = torch.zeros(1, device=device)
    for mb in micro_batches:
        with amp:
            loss = model(mb.to(device))
        (loss * scale).backward()
        loss_sum += loss.detach()
    grad_norm = clip_grad_norm(params, clip_grad).to(device).reshape(())
    # `count` is already the global token count; only the loss sums still differ per rank.
    mean_loss = (all_reduce_sum(loss_sum) / count.clamp(min=1.0)).reshape(())
    bad = (~(torch.isfinite(mean_loss) & torch.isfinite(grad_norm))).float()
    with no_retry_after_oom("the optimizer step"):
        if optimizer.defaults.get("fused"):
            # Fused AdamW skips the update (and un-counts the step) where found_inf is set, on the
            # device: a NaN never touches weights or moments, and the host never waits here.
            # found_inf must be 0-dim: the kernel subtracts it in place from the 0-dim step counts.
            optimizer.found_inf = bad
            optimizer.step()
        elif bad.item() == 0:  # host-side optimizers (CPU, offload): this read costs no GPU sync
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return StepResult(mean_loss.detach(), grad_norm.detach(), bad)


def _fused_step(fused, model, optimizer, scheduler, micro_batches, device, scale, count, amp) -> StepResult:
    """The step with the update inside the last backward (engine/fused_backward.py says what
    that changes): earlier micro-batches accumulate, the last one updates as it goes."""
    from verlite.errors import VerliteError

    loss_sum = torch.zeros(1, device=device)
    last = len(micro_batches) - 1
    bad = torch.zeros((), device=device)
    grad_norm = torch.full((), float("nan"), device=device)
    for i, mb in enumerate(micro_batches):
        with amp:
            loss = model(mb.to(device))
        loss_sum += loss.detach()
        if i < last:
            (loss * scale).backward()
            continue
        # The one host read of the step: a NaN loss must be known before any weight moves.
        if not bool(torch.isfinite(loss_sum).all()):
            bad = torch.ones((), device=device)
            break
        fused.arm(device)
        try:
            (loss * scale).backward()
            grad_norm = fused.finish()  # leftover weights are updated here: inside the guard too
        except torch.OutOfMemoryError:
            updated = fused.abandon()
            if updated:
                raise VerliteError(f"out of GPU memory in a fused-backward step after {updated} weights were "
                                   "updated, so the step cannot be retried; set optim.fused_backward=false or a "
                                   "lower data.max_token_len_per_gpu, then run again to resume") from None
            raise
        except BaseException:
            fused.abandon()
            raise
        bad = fused.bad.float()
    mean_loss = (loss_sum / count.clamp(min=1.0)).reshape(())
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return StepResult(mean_loss.detach(), grad_norm.detach().reshape(()), bad.reshape(()))
