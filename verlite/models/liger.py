"""Liger's Triton kernels inside the decoder layers: RoPE and SwiGLU (and its RMSNorm).

Where an eager step is bound by its element-wise kernels (CUDA graphs took the launches
away, engine/graph_step.py), HF's RoPE runs about ten small kernels for q and k forward and
as many backward (rotate_half's slices, neg and cat, two multiplies, an add), and the SwiGLU
MLP writes silu(gate) before multiplying it by up; Liger does each in one kernel a direction.
Liger's own `_apply_liger_kernel_to_instance` (the call verl makes for `model.use_liger`)
patches them per model type; verlite's loss stays its own (bench/RESULTS.md: Liger's fused
linear cross-entropy was 35 % slower here).
"""

from __future__ import annotations

import logging
import os

import torch

from verlite.errors import VerliteError

log = logging.getLogger("verlite.models")

KINDS = ("rope", "swiglu", "rms_norm")


def wanted_kinds(use_liger: bool) -> tuple[str, ...]:
    """The kernels to patch in: all of KINDS for `model.use_liger`, else those named in
    VERLITE_LIGER_KERNELS (a bench knob: "rope,swiglu")."""
    if use_liger:
        return KINDS
    raw = os.environ.get("VERLITE_LIGER_KERNELS", "")
    kinds = tuple(k.strip() for k in raw.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise VerliteError(f"VERLITE_LIGER_KERNELS: unknown kernel(s) {unknown}; use any of {', '.join(KINDS)}")
    return kinds


def use_liger_kernels(model: torch.nn.Module, kinds: tuple[str, ...]) -> bool:
    """Patch `model` (a transformers model on a GPU) with Liger's kernels of `kinds`; False
    when Liger has none for this model type. Liger's RoPE replaces the model family's
    `apply_rotary_pos_emb` for the whole process, as Liger always does."""
    if not kinds:
        return False
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError:
        raise VerliteError("model.use_liger=true needs liger-kernel: pip install liger-kernel "
                           "(or set model.use_liger=false)") from None
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        log.warning("model.use_liger: Liger has no kernels for model type %r; its layers stay as they are", model_type)
        return False
    _apply_liger_kernel_to_instance(model, rope="rope" in kinds, swiglu="swiglu" in kinds,
                                    rms_norm="rms_norm" in kinds, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    log.info("Liger kernels in the decoder layers: %s", ", ".join(kinds))
    return True
