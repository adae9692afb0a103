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

import importlib.util
import logging
import os
import threading
import time
from typing import Optional, Union

import torch

from verlite.errors import VerliteError

log = logging.getLogger("verlite.models")

KINDS = ("rope", "swiglu", "rms_norm")
# `auto`'s kernels: RMSNorm stays PyTorch's fused kernel (models/fused_norm.py), one kernel a
# direction too, measured with these two on the H100 (bench/RESULTS.md, tenth session: +13 %).
AUTO_KINDS = ("rope", "swiglu")
_ENTRY = "liger_kernel.transformers.monkey_patch"


def installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def wanted_kinds(use_liger: Union[bool, str], device: torch.device) -> tuple[str, ...]:
    """The kernels to patch in on `device`: all of KINDS for `model.use_liger=true`; for `auto`,
    AUTO_KINDS where liger-kernel is installed; none for false. VERLITE_LIGER_KERNELS
    ("rope,swiglu", a bench knob) names them instead for auto and false. None off CUDA GPUs;
    where auto finds no use for Liger, the log says why."""
    raw = os.environ.get("VERLITE_LIGER_KERNELS") if use_liger is not True else None
    if raw is not None:
        kinds = tuple(k.strip() for k in raw.split(",") if k.strip())
        unknown = [k for k in kinds if k not in KINDS]
        if unknown:
            raise VerliteError(f"VERLITE_LIGER_KERNELS: unknown kernel(s) {unknown}; use any of {', '.join(KINDS)}")
    else:
        kinds = KINDS if use_liger is True else AUTO_KINDS if use_liger == "auto" else ()
    if not kinds:
        return ()
    if device.type != "cuda":
        (log.warning if use_liger is True else log.info)(
            "model.use_liger=%s: Liger's kernels run on CUDA GPUs only; off on %s",
            str(use_liger).lower(), device.type)
        return ()
    if use_liger == "auto" and raw is None and not installed():
        log.info("model.use_liger=auto: off, liger-kernel is not installed (pip install liger-kernel: its RoPE "
                 "and SwiGLU kernels made GSM8K-sized steps 13 %% faster on an H100)")
        return ()
    return kinds


# Importing Liger takes ~1.2 s on the H100 machine (triton, and transformers' modules of every
# model family Liger patches). The trainer starts it on a side thread once the tokenizer is
# loaded, and the model read (on its own side thread, models/early_read.py) waits for it
# just before building the model, so that it overlaps reading and tokenizing the data
# (tokenizers encode with the GIL released): one importer of the model's modules at a time.
_import_thread: Optional[threading.Thread] = None
_import_error: Optional[BaseException] = None
_import_s = 0.0
_finish_lock = threading.Lock()


def _import() -> None:
    global _import_error, _import_s
    start = time.perf_counter()
    try:
        importlib.import_module(_ENTRY)
    except BaseException as e:  # noqa: BLE001 - handed to the thread that waits (finish_import)
        _import_error = e
    _import_s = time.perf_counter() - start


def start_import(kinds: tuple[str, ...]) -> None:
    global _import_thread
    if kinds and _import_thread is None and installed():
        _import_thread = threading.Thread(target=_import, name="verlite-liger-import", daemon=True)
        _import_thread.start()


def finish_import() -> None:
    """Wait for start_import's thread; every thread that calls it waits (the model read and
    the memory plan's weightless model both build transformers models). An import that failed
    there is not raised here: Python forgets a module whose import failed, so
    use_liger_kernels imports it again and meets the error where it decides what a missing
    Liger means."""
    global _import_thread, _import_error
    thread = _import_thread
    if thread is None:
        return
    waited = time.perf_counter()
    thread.join()
    with _finish_lock:
        if _import_thread is not thread:  # another waiter got here first and logged it
            return
        _import_thread, error, _import_error = None, _import_error, None
    log.debug("Liger's import: %.2f s on a side thread, %.2f s waited for%s", _import_s,
              time.perf_counter() - waited, f" (failed: {error!r})" if error is not None else "")


def use_liger_kernels(model: torch.nn.Module, kinds: tuple[str, ...], required: bool = True) -> bool:
    """Patch `model` (a transformers model on a GPU) with Liger's kernels of `kinds`; False
    when Liger has none for this model type. Liger's RoPE replaces the model family's
    `apply_rotary_pos_emb` for the whole process, as Liger always does. Not `required`
    (model.use_liger=auto): a missing or broken liger-kernel leaves the layers as they are."""
    if not kinds:
        return False
    try:
        finish_import()
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except Exception as e:  # noqa: BLE001 - auto goes on without Liger whatever broke its import
        if required and isinstance(e, ImportError):
            raise VerliteError("model.use_liger=true needs liger-kernel: pip install liger-kernel "
                               "(or set model.use_liger=false)") from None
        if required:
            raise
        log.warning("model.use_liger=auto: liger-kernel did not import (%s: %s); layers stay transformers' own",
                    type(e).__name__, e)
        return False
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        (log.warning if required else log.info)(
            "model.use_liger: Liger has no kernels for model type %r; its layers stay as they are", model_type)
        return False
    _apply_liger_kernel_to_instance(model, rope="rope" in kinds, swiglu="swiglu" in kinds,
                                    rms_norm="rms_norm" in kinds, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    log.info("Liger kernels in the decoder layers: %s", ", ".join(kinds))
    return True
