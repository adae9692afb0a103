"""Resume checks what it resumes.

A checkpoint records the settings that give its weights and optimizer state their meaning
(`settings` in trainer_state.pt): the base model (path, weight files, config shape), the
vocabulary, LoRA rank / alpha / targets, quantization, the optimizer kind, and the
checkpoint format (full unsharded state dicts, so the number of GPUs is free to change).
Resuming with any of those changed would crash deep in PyTorch or, worse, silently train
something else: it stops in one line instead. Every other config key (lr, epochs, total
steps, save/log frequencies, logger, ...) may change; the changes are listed once. A
changed training file is allowed with a warning saying how the data order continues.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Optional

from verlite.config import SFTConfig
from verlite.errors import VerliteError

log = logging.getLogger("verlite.trainer")

FORMAT = "full-state-dict-v1"  # weights and optimizer gathered unsharded: any world size can resume
# Config keys whose change makes the saved weights or optimizer state mean something else.
INCOMPATIBLE = ("model.lora_rank", "model.lora_alpha", "model.target_modules", "model.quantization",
                "optim.optimizer", "optim.optimizer_impl")
# Config keys that name a run rather than describe it, and keys checked through `settings`.
_NOT_LISTED = {"trainer.resume_mode", "trainer.resume_from_path", "model.partial_pretrain", "data.train_files"}
# The parts of a model's HF config that fix its parameter shapes.
_SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")


def run_settings(cfg: SFTConfig, tokenizer, train_ds) -> dict:
    """What a checkpoint of this run records about itself (plain JSON-able data)."""
    flat = flatten(cfg)
    model = cfg.model.partial_pretrain
    return {
        "format": FORMAT,
        **{key: flat[key] for key in INCOMPATIBLE},
        "model.partial_pretrain": _model_facts(model, cfg.model.trust_remote_code),
        "tokenizer.vocab_size": len(tokenizer),
        "data.train_files": data_fingerprint(cfg.data.train_files, train_ds),
    }


def check_resume(state: dict, now: dict, cfg: SFTConfig, ckpt: Path, steps_per_epoch: int) -> None:
    """Raise VerliteError for an incompatible change; log the allowed ones."""
    saved: Optional[dict] = state.get("settings")
    if not isinstance(saved, dict):
        log.warning("%s records no settings (written by an older verlite): resuming without checking that the "
                    "model and LoRA settings match", ckpt)
        return
    problems = [_describe(key, saved.get(key), now[key]) for key in now
                if key not in ("data.train_files", "model.partial_pretrain") and saved.get(key) != now[key]]
    model_problem = _model_change(saved.get("model.partial_pretrain"), now["model.partial_pretrain"])
    if model_problem:
        problems.insert(0, model_problem)
    if problems:
        raise VerliteError(f"cannot resume from {ckpt}: {'; '.join(problems)}; run again with the saved settings, "
                           "or start anew with another trainer.default_local_dir (or trainer.resume_mode=disable)")
    changed = config_changes(state.get("config") or {}, flatten(cfg))
    if saved.get("model.partial_pretrain", {}).get("path") != now["model.partial_pretrain"]["path"]:
        changed.insert(0, f"model.partial_pretrain {saved['model.partial_pretrain']['path']} -> "
                          f"{now['model.partial_pretrain']['path']} (same config and weight files)")
    if changed:
        log.info("resuming with changed settings: %s", ", ".join(changed))
    _warn_data_change(saved.get("data.train_files"), now["data.train_files"], int(state.get("global_step", 0)),
                      steps_per_epoch, cfg.trainer.seed)


def flatten(cfg: Any) -> dict:
    import dataclasses

    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", data)
    return out


def config_changes(saved_config: dict, now_flat: dict) -> list[str]:
    saved_flat = flatten(saved_config)
    return [f"{key} {saved_flat.get(key)!r} -> {now_flat.get(key)!r}"
            for key in sorted(set(saved_flat) | set(now_flat))
            if key not in _NOT_LISTED and key not in INCOMPATIBLE and saved_flat.get(key) != now_flat.get(key)]


def data_fingerprint(train_files, train_ds) -> dict:
    """Sizes of the training files and a hash of the tokenized sample lengths: cheap, and any
    edit that changes what the steps see changes one of them."""
    files = []
    if train_files:
        for f in [train_files] if isinstance(train_files, str) else list(train_files):
            full = os.path.expandvars(os.path.expanduser(str(f)))
            files.append([str(f), os.path.getsize(full) if os.path.isfile(full) else None])
    lengths = train_ds.lengths
    digest = hashlib.blake2b(lengths.astype("int64").tobytes(), digest_size=8).hexdigest()
    return {"files": files, "samples": int(len(lengths)), "lengths_hash": digest}


def _model_facts(name: Optional[str], trust_remote_code: bool) -> dict:
    """Path, weight files (name and size) and shape-giving config of the base model."""
    from verlite.models.load import resolve_model_path

    facts: dict = {"path": name, "weights": [], "config": {}}
    if not name:
        return facts
    try:
        path = resolve_model_path(name)
    except VerliteError:
        return facts  # loading the model reports it
    folder = Path(path)
    if folder.is_dir():
        facts["path"] = str(folder.resolve())
        facts["weights"] = sorted([p.name, p.stat().st_size] for p in folder.iterdir()
                                  if p.suffix in (".safetensors", ".bin") and p.is_file())
    try:
        from verlite.models.load import read_hf_config

        hf = read_hf_config(path, trust_remote_code).to_dict()
        facts["config"] = {k: hf[k] for k in _SHAPE_KEYS if k in hf}
    except (OSError, ValueError):
        pass
    return facts


def _model_change(saved: Optional[dict], now: dict) -> Optional[str]:
    if not isinstance(saved, dict):
        return None
    shape = [f"{k} {saved['config'].get(k)} vs {now['config'].get(k)}"
             for k in _SHAPE_KEYS if saved.get("config", {}).get(k) != now["config"].get(k)]
    if shape:
        return (f"model.partial_pretrain: saved {saved['path']}, now {now['path']} "
                f"(another architecture: {', '.join(shape[:3])})")
    if saved.get("path") != now["path"] and saved.get("weights") != now["weights"]:
        return f"model.partial_pretrain: saved {saved['path']}, now {now['path']} (other weight files)"
    return None


def _describe(key: str, saved: Any, now: Any) -> str:
    return f"{key}: saved {saved!r}, now {now!r}"


def _warn_data_change(saved: Optional[dict], now: dict, step: int, steps_per_epoch: int, seed: int) -> None:
    def content(fp: dict) -> tuple:  # file names may change (a moved copy); sizes and samples may not
        return fp.get("samples"), fp.get("lengths_hash"), [f[1] for f in fp.get("files", [])]

    if not isinstance(saved, dict) or content(saved) == content(now):
        return
    epoch, within = divmod(step, max(1, steps_per_epoch))
    log.warning("data.train_files changed since the checkpoint (%s samples, %s bytes then; %d samples, %s bytes now): "
                "training continues at step %d with the new data's order (epoch %d, batch %d of %d, trainer.seed=%d), "
                "so this epoch may repeat or skip some samples", saved.get("samples"), _total(saved.get("files")),
                now["samples"], _total(now["files"]), step + 1, epoch, within + 1, steps_per_epoch, seed)


def _total(files) -> str:
    sizes = [f[1] for f in files or [] if f[1] is not None]
    return f"{sum(sizes):,}" if sizes else "?"
