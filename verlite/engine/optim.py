"""The optimizer (verl's optim.optimizer from optim.optimizer_impl) and the learning-rate
schedule (warmup, then cosine / linear / constant).

Low-memory full fine-tuning lives here too. What each choice stores per trained weight:

- torch.optim AdamW: two fp32 moments, 8 bytes; exact.
- torchao.optim AdamW8bit: two moments as 8-bit codes with one scale per 256 values,
  ~2 bytes (dynamic-tree quantization as in bitsandbytes: the update follows fp32 AdamW's
  to about 1e-3 relative). AdamW4bit: ~1 byte, coarser (4-bit first moment, 4-bit second
  moment with zero-point handling); _AdamW: torchao's fp32 AdamW with bf16 stochastic rounding.
- bitsandbytes.optim AdamW8bit / PagedAdamW8bit: the same 8-bit scheme as CUDA kernels (GPU only).
- bf16 master weights (model.fsdp_config.model_dtype=bf16) with a torchao optimizer: the
  update is rounded stochastically to bf16, so small updates survive on average instead of
  vanishing below bf16's 8-bit mantissa (2 bytes a weight instead of 4).
- model.fsdp_config.optimizer_offload: the moments (and an fp32 copy of each weight for the
  update) live in host memory; the GPU keeps only weights and gradients. Exact fp32 AdamW,
  paid with a host round trip of weights and gradients each step.
"""

from __future__ import annotations

import importlib
import logging
import math
import warnings

import torch

from verlite.config.schema import OptimConfig
from verlite.errors import VerliteError

log = logging.getLogger("verlite.optim")

# Bytes of optimizer state per trained weight, for the memory planner.
STATE_BYTES = {"AdamW": 8, "_AdamW": 8, "AdamW32bit": 8, "PagedAdamW": 8, "PagedAdamW32bit": 8,
               "AdamW8bit": 2, "PagedAdamW8bit": 2, "AdamW4bit": 1, "AdamWFp8": 2}


def state_bytes(cfg: OptimConfig) -> int:
    return STATE_BYTES.get(cfg.optimizer, 8)


def use_fused(device: torch.device, offloaded: bool) -> bool:
    # Fused AdamW is one kernel for all parameters on GPU; with offload the state is on the host.
    return device.type == "cuda" and not offloaded


def build_optimizer(params, cfg: OptimConfig, device: torch.device, offloaded: bool,
                    optimizer_offload: bool = False, buckets=None) -> torch.optim.Optimizer:
    """`buckets`: lists of weights updated together when the step is fused into backward
    (a decoder layer's; engine/fused_backward.py)."""
    params = [p for p in params if p.requires_grad]
    optimizer = _build(params, cfg, device, offloaded, optimizer_offload)
    if cfg.fused_backward is True:  # auto is resolved by the plan (engine/memory.py) before this
        if optimizer_offload or offloaded:
            raise VerliteError("optim.fused_backward=true needs the optimizer state on the GPU: drop "
                               "model.fsdp_config.optimizer_offload / cpu_offload or set optim.fused_backward=false")
        from verlite.engine.fused_backward import attach

        attach(optimizer, params, cfg.clip_grad, buckets)
        log.info("optimizer step fused into backward (optim.fused_backward): each gradient applied and freed as "
                 "soon as it is complete")
    return optimizer


def _build(params, cfg: OptimConfig, device: torch.device, offloaded: bool,
           optimizer_offload: bool) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if optimizer_offload and not offloaded:  # (cpu_offload keeps everything in host memory already)
        if any(hasattr(p, "to_local") for p in params):
            raise VerliteError("model.fsdp_config.optimizer_offload runs on one process for now; with several "
                               "ranks use model.fsdp_config.cpu_offload=true or an 8-bit optim.optimizer")
        log.info("optimizer state in host memory (model.fsdp_config.optimizer_offload): exact fp32 AdamW")
        return HostAdamW(params, **kwargs)
    if cfg.optimizer_impl == "torch.optim":
        fused = use_fused(device, offloaded)
        return torch.optim.AdamW(params, fused=fused, foreach=None if fused else True, **kwargs)
    if cfg.optimizer_impl == "torchao.optim":
        from verlite.models.quant import quiet_torchao_import

        quiet_torchao_import()
        warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
        cls = getattr(importlib.import_module("torchao.optim"), cfg.optimizer)
        if any(p.dtype == torch.bfloat16 for p in params):
            # Without it an update smaller than a bf16 weight's last bit is lost every step.
            kwargs["bf16_stochastic_round"] = True
        log.info("optimizer: torchao.optim.%s%s", cfg.optimizer,
                 " with bf16 stochastic rounding" if kwargs.get("bf16_stochastic_round") else "")
        if device.type != "cuda":
            # torchao compiles its per-parameter update; on a CPU that is minutes of C++ builds
            # for a step that takes milliseconds eagerly (the same code, uncompiled).
            cls = type(cls.__name__, (cls,), {"step": _eager(cls.step)})
        else:
            # torchao builds a new torch.compile wrapper for every parameter at every step
            # (~0.2-1 ms of host time each, 338 a step for a 1.5B model): build each once.
            cls = type(cls.__name__, (cls,), {"step": _compiled_once(cls.step)})
        return cls(params, **kwargs)
    if device.type != "cuda":
        raise VerliteError(f"optim.optimizer_impl=bitsandbytes.optim needs a CUDA GPU; on {device.type} use "
                           "optim.optimizer_impl=torchao.optim (same optimizer names)")
    cls = getattr(importlib.import_module("bitsandbytes.optim"), cfg.optimizer)
    log.info("optimizer: bitsandbytes.optim.%s", cfg.optimizer)
    return cls(params, **kwargs)


def _eager(step):
    """`step` with torch.compile(fn, ...) answering fn itself while it runs (torchao calls
    torch.compile(..., fullgraph=True) inside its step, which no dynamo switch skips)."""
    def run(self, *args, **kwargs):
        compile_ = torch.compile
        torch.compile = lambda fn=None, **_: fn if fn is not None else (lambda f: f)
        try:
            return step(self, *args, **kwargs)
        finally:
            torch.compile = compile_

    return run


_COMPILED: dict = {}


def _compiled_once(step):
    """`step` with torch.compile(fn, **options) answering the same compiled callable for the
    same fn and options every time (the compiled code and its guards are the same anyway)."""
    def run(self, *args, **kwargs):
        compile_ = torch.compile

        def once(fn=None, **options):
            if fn is None:
                return lambda f: once(f, **options)
            key = (fn, tuple(sorted(options.items())))
            if key not in _COMPILED:
                _COMPILED[key] = compile_(fn, **options)
            return _COMPILED[key]

        torch.compile = once
        try:
            return step(self, *args, **kwargs)
        finally:
            torch.compile = compile_

    return run


class HostAdamW(torch.optim.AdamW):
    """AdamW whose moments live in host memory, with an fp32 host copy of every weight.

    Each step copies the gradients to pinned host buffers, runs torch's multi-tensor AdamW
    there, and copies the updated weights back: the GPU holds weights and gradients only,
    and with bf16 weights on the GPU the host copy is still an exact fp32 master. The state dict is torch's AdamW one (moments keyed by the GPU parameters), so
    checkpoints and resume go through the usual path."""

    def __init__(self, params, **kwargs):
        super().__init__(params, foreach=True, **kwargs)
        self._host: dict[torch.nn.Parameter, tuple[torch.Tensor, torch.Tensor]] = {}

    def _host_pair(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pair = self._host.get(p)
        if pair is None:
            pin = p.is_cuda
            weight = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin)
            grad = torch.empty(p.shape, dtype=torch.float32, pin_memory=pin)
            weight.copy_(p.detach())
            pair = self._host[p] = (weight, grad)
        return pair

    @torch.no_grad()
    def step(self, closure=None):
        from torch.optim.adamw import adamw

        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            if not live:
                continue
            grads = [p.grad for p in live]
            pairs = [self._host_pair(p) for p in live]
            for (_, g_host), g in zip(pairs, grads):
                g_host.copy_(g, non_blocking=True)
            if torch.cuda.is_available():
                torch.cuda.current_stream().synchronize()
            states = [self._state_for(p) for p in live]
            adamw(
                [w for w, _ in pairs], [g for _, g in pairs], [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], foreach=True,
                amsgrad=False, beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=False, capturable=False,
                differentiable=False, fused=None, grad_scale=None, found_inf=None, has_complex=False)
            for (w_host, _), p in zip(pairs, live):
                p.copy_(w_host, non_blocking=True)
        return None

    def _state_for(self, p) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, pin_memory=p.is_cuda)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, pin_memory=p.is_cuda)
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch moves loaded state next to its parameter (the GPU): bring the moments home.
        for state in self.state.values():
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in state and state[key].device.type != "cpu":
                    state[key] = state[key].cpu()
        self._host.clear()


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


class Schedule(torch.optim.lr_scheduler.LambdaLR):
    def get_last_lr(self) -> list[float]:
        # torchao's optimizers keep lr as a tensor (no recompile when it changes): report numbers.
        return [float(lr) for lr in super().get_last_lr()]

    # The fused-backward step clips with the previous step's gradient norm: it travels with the
    # schedule's state (the optimizer's state dict holds per-weight entries only).
    def state_dict(self):
        sd = super().state_dict()
        fused = getattr(self.optimizer, "fused_backward", None)
        if fused is not None and fused.prev_norm is not None:
            from verlite.engine.fused_backward import PREV_NORM

            sd[PREV_NORM] = fused.prev_norm.detach().cpu().clone()
        return sd

    def load_state_dict(self, state_dict):
        from verlite.engine.fused_backward import PREV_NORM

        state_dict = dict(state_dict)
        prev = state_dict.pop(PREV_NORM, None)
        super().load_state_dict(state_dict)
        fused = getattr(self.optimizer, "fused_backward", None)
        if fused is not None and prev is not None:
            device = next((p.device for p in fused.params), torch.device("cpu"))
            fused.prev_norm = prev.to(device)


def build_scheduler(optimizer, total_steps: int, cfg: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return Schedule(optimizer, lambda step: lr_factor(step, total_steps, cfg))
