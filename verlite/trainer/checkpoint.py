"""Checkpoints: `global_step_N/` with `huggingface/` (model or PEFT adapter + tokenizer, the
only copy of the weights, kept at master precision so resuming is exact) and
`trainer_state.pt` (optimizer, scheduler, step, RNG).

A checkpoint is written into `global_step_N.tmp` and renamed into place, and
`latest_checkpointed_iteration.txt` moves only after that: a run killed at any moment
leaves every earlier checkpoint whole, and a folder named `global_step_N` is complete.
Weights are gathered to rank 0 one parameter at a time, so the format is the same for
any number of GPUs and a run can resume on a different number.
"""

from __future__ import annotations

import importlib
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from verlite.errors import VerliteError
from verlite.layout import HF_DIR, LATEST, STATE, latest_checkpoint, step_dirs  # noqa: F401 (re-exported)
from verlite.outputs import replace_dir

log = logging.getLogger("verlite.checkpoint")


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | Path, step: int, sft_model, tokenizer, optimizer, scheduler, extra: dict,
                    is_lora: bool, is_main: bool) -> Optional[Path]:
    """Write global_step_{step}; returns its path, or None when writing failed (reported).
    The same snapshot + atomic write as the background writer (async_checkpoint.py), in line."""
    from verlite.trainer.async_checkpoint import agree, take_snapshot, write_snapshot

    snap = take_snapshot(root, step, sft_model, tokenizer, optimizer, scheduler, extra, is_lora, is_main)
    ok = agree(write_snapshot(snap) is not None if is_main else False)
    return snap.final if ok else None


def _replace_dir(tmp: Path, final: Path) -> None:
    replace_dir(tmp, final)  # re-saving the same step (e.g. after a resume) swaps the old one out
    _fsync_dir(final.parent)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune_checkpoints(root: str | Path, keep: Optional[int]) -> None:
    if not keep or keep < 1:
        return
    for step, path in step_dirs(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed old checkpoint %s (trainer.max_ckpt_to_keep=%d)", path, keep)


def load_weights_into(model, ckpt: Path, is_lora: bool) -> None:
    """Put a checkpoint's weights into the freshly loaded (unsharded) HF or PEFT model."""
    from safetensors.torch import load_file

    hf_dir = ckpt / HF_DIR
    if is_lora:
        from peft import set_peft_model_state_dict

        path = hf_dir / "adapter_model.safetensors"
        if not path.is_file():
            raise VerliteError(f"{ckpt} holds no LoRA adapter ({path} missing) but model.lora_rank > 0; "
                               "resume with the same model settings or set trainer.resume_mode=disable")
        result = set_peft_model_state_dict(model, load_file(path))
        if getattr(result, "unexpected_keys", None):
            raise VerliteError(f"{path} does not match the LoRA settings (unexpected {result.unexpected_keys[:3]}); "
                               "resume with the same model.target_modules / lora_rank")
        return
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files or (hf_dir / "adapter_model.safetensors").exists():
        raise VerliteError(f"{ckpt} holds no full model weights (a LoRA checkpoint?) but model.lora_rank is 0; "
                           "resume with the same model settings or set trainer.resume_mode=disable")
    sd = {}
    for f in files:
        sd.update(load_file(f))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) | {"lm_head.weight"}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise VerliteError(f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}); resume with the same model.partial_pretrain")


# Packages whose tensor types may sit in an optimizer state (torchao's low-bit AdamW states);
# importing them registers exactly those types with torch.load's weights-only unpickler.
_STATE_TYPE_PACKAGES = ("torchao.optim",)


def load_trainer_state(ckpt: Path) -> dict:
    """trainer_state.pt as data only (tensors, numbers, strings, lists, dicts): unpickling
    never runs code from the file, so a checkpoint from someone else cannot run code here."""
    path = ckpt / STATE
    for attempt in range(2):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            break
        except pickle.UnpicklingError as e:
            name = _refused_global(str(e))
            package = next((p for p in _STATE_TYPE_PACKAGES if name.startswith(p + ".")), None)
            if attempt == 0 and package and _import_quietly(package):
                continue
            raise VerliteError(f"{path} holds more than data (it names {name or 'a Python object'}, which loading "
                               "would run): refused; resume only from checkpoints you trust, or set "
                               "trainer.resume_mode=disable") from None
        except Exception as e:
            raise VerliteError(f"{path} cannot be read ({' '.join(str(e).split())[:200]}); resume from another "
                               "checkpoint or set trainer.resume_mode=disable") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng", "global_step"} <= set(state):
        raise VerliteError(f"{path} is not a verlite trainer state; resume from another checkpoint "
                           "or set trainer.resume_mode=disable")
    return state


def _refused_global(message: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else ""


def _import_quietly(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def restore_optimizer(sft_model, optimizer, osd: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(sft_model, optimizer, osd,
                             options=StateDictOptions(full_state_dict=True))
