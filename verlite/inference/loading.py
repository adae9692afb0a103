"""Load a model for inference from whatever a user points at: a `global_step_N` folder, its
`huggingface/` folder, a PEFT adapter folder, or a plain HF model path or hub id."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from verlite.errors import VerliteError
from verlite.models.load import DTYPES, load_tokenizer, resolve_model_path
from verlite.layout import HF_DIR, latest_checkpoint

log = logging.getLogger("verlite.inference")

ADAPTER_CONFIG = "adapter_config.json"


def resolve_checkpoint(path: str) -> Path | str:
    """The folder holding the HF files: `global_step_N` -> `global_step_N/huggingface`; a
    run directory -> its newest checkpoint; a hub id is returned unchanged."""
    local = Path(resolve_model_path(path)) if Path(path).expanduser().exists() else None
    if local is None:
        if path.startswith((".", "/", "~")):
            raise VerliteError(f"checkpoint {path} does not exist; pass a global_step_N folder, a model folder or an id")
        return path
    if (local / HF_DIR).is_dir():
        return local / HF_DIR
    if (local / "config.json").is_file() or (local / ADAPTER_CONFIG).is_file():
        return local
    newest = latest_checkpoint(local)
    if newest is not None:
        log.info("using the newest checkpoint in %s: %s", local, newest.name)
        return newest / HF_DIR
    raise VerliteError(f"{path} is not a checkpoint: no huggingface/, config.json or adapter_config.json inside; "
                       "pass a global_step_N folder, its huggingface/ folder, an adapter folder or a model folder")


def adapter_base_candidates(folder: Path, model_name: Optional[str]) -> list[str]:
    """Where the adapter's base may be: the caller's `model_name` first (the article passes the
    hub id), then the base recorded in adapter_config.json (the path it was trained from)."""
    with open(folder / ADAPTER_CONFIG, encoding="utf-8") as f:
        recorded = json.load(f).get("base_model_name_or_path")
    candidates = [c for c in (model_name, recorded) if c]
    if not candidates:
        raise VerliteError(f"{folder / ADAPTER_CONFIG} names no base model; pass model_name= (or --base_model)")
    return list(dict.fromkeys(candidates))


def load_base_model(candidates: list[str], dtype: torch.dtype, what: str):
    """The first candidate that loads; a one-line error naming all of them otherwise."""
    from transformers import AutoModelForCausalLM

    reasons = []
    for i, name in enumerate(candidates):
        try:
            model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=dtype)
        except (OSError, ValueError, VerliteError) as e:
            reasons.append(f"'{name}': {' '.join(str(e).split())[:120]}")
            continue
        if i:
            log.info("%s %s could not be loaded; using %s", what, candidates[0], name)
        return model, name
    raise VerliteError(f"cannot load the {what} ({'; '.join(reasons)}); pass a local model folder "
                       "(model_name= in Python, --base_model on the command line)")


def pick_dtype(device: torch.device, dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype:
        return DTYPES[dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_model_and_tokenizer(model_path: str, model_name: Optional[str] = None, device=None, dtype=None,
                             merge: bool = False):
    """(model, tokenizer) ready for `generate`, in eval mode, on `device` (default: GPU if any).

    `model_name` is the base model of an adapter (the article passes the hub id): tried
    first, then the adapter's own `base_model_name_or_path`. With merge=True a LoRA is
    folded into the base weights.
    """
    loaded = load_checkpoint(model_path, model_name, device, dtype, merge=merge)
    return loaded.model, loaded.tokenizer


@dataclass
class Loaded:
    model: object
    tokenizer: object
    base_id: str  # the base model as named (an adapter's base, else the folder)
    adapter: Optional[Path]  # the adapter folder when the checkpoint is one


def load_checkpoint(model_path: str, model_name: Optional[str] = None, device=None, dtype=None,
                    merge: bool = False, attach: bool = True) -> Loaded:
    """load_model_and_tokenizer's work, with what it found. attach=False leaves an adapter
    checkpoint's LoRA off the returned base model (`verlite serve` applies it per request)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = pick_dtype(device, dtype)
    folder = resolve_checkpoint(str(model_path))
    adapter = folder if is_adapter(folder) else None
    if adapter is not None:
        model, base_id = load_base_model(adapter_base_candidates(folder, model_name), dtype,
                                         "base model of the adapter")
        if attach:
            model = attach_adapter(model, folder, base_id, merge)
    else:
        model, base_id = load_base_model([str(folder)], dtype, "model")
    tokenizer = load_tokenizer(str(folder) if has_tokenizer(folder) else base_id)
    tokenizer.padding_side = "left"
    model.to(device).eval()
    return Loaded(model, tokenizer, base_id, adapter)


def is_adapter(folder) -> bool:
    return isinstance(folder, Path) and (folder / ADAPTER_CONFIG).is_file()


def attach_adapter(model, folder: Path, base_id: str, merge: bool):
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(folder))
    except RuntimeError as e:  # size mismatch: the adapter was trained on another base
        raise VerliteError(f"the adapter in {folder} does not fit base model '{base_id}' (shapes differ: "
                           f"{' '.join(str(e).split())[:160]}); pass the base it was trained on") from None
    return model.merge_and_unload() if merge else model


def has_tokenizer(folder) -> bool:
    return isinstance(folder, Path) and any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
