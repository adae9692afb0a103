"""verl's SFT configs in verlite's schema: verl key -> SFTConfig field.

Two dialects. The legacy one (`verl.trainer.fsdp_sft_trainer`, `sft_trainer.yaml`) is
verlite's own layout with a few renamed or deprecated keys. The engine one
(`verl.trainer.sft_trainer`, verl >= 0.8, `sft_trainer_engine.yaml`) composes the groups
`model=hf_model`, `engine=fsdp`, `optim=fsdp` and is first mapped onto the legacy layout.
verlite's schema (schema.py) stays the one truth: nothing here is a config field.

Defaults are verl's, so `python -m verlite.trainer.fsdp_sft_trainer key=value ...` with no
YAML means what the same command means to verl.
"""

from __future__ import annotations

import copy
import logging
import os
from typing import Any

from verlite.errors import VerliteError

log = logging.getLogger("verlite.config")

# ---- verl's defaults (values of sft_trainer.yaml, sft_trainer_engine.yaml and their groups) ----

OPTIM_FSDP = {
    "optimizer": "AdamW", "optimizer_impl": "torch.optim", "lr": 1e-3, "lr_warmup_steps_ratio": 0.0,
    "total_training_steps": -1, "weight_decay": 0.01, "lr_warmup_steps": -1, "betas": [0.9, 0.999],
    "clip_grad": 1.0, "min_lr_ratio": 0.0, "num_cycles": 0.5, "lr_scheduler_type": "constant",
    "warmup_style": None, "override_optimizer_config": None,
}
ENGINE_FSDP = {
    "wrap_policy": {"min_num_params": 0}, "param_offload": False, "optimizer_offload": False,
    "offload_policy": False, "reshard_after_forward": True, "fsdp_size": -1, "forward_prefetch": False,
    "model_dtype": "fp32", "use_orig_params": False, "seed": 42, "full_determinism": False,
    "ulysses_sequence_parallel_size": 1, "entropy_from_logits_with_chunking": False, "use_torch_compile": True,
    "entropy_checkpointing": False, "forward_only": False, "strategy": "fsdp", "dtype": "bfloat16",
}
MODEL_HF = {
    "path": None, "hf_config_path": None, "tokenizer_path": None, "use_shm": False, "trust_remote_code": False,
    "custom_chat_template": None, "external_lib": None, "override_config": {},
    "enable_gradient_checkpointing": True, "enable_activation_offload": False, "use_remove_padding": True,
    "lora_rank": 0, "lora_alpha": 16, "target_modules": "all-linear", "exclude_modules": None,
    "lora_adapter_path": None, "use_liger": False, "use_fused_kernels": False,
    "fused_kernel_options": {"impl_backend": "torch"}, "tiled_mlp": {"enabled": False, "num_shards": 4},
}
# (group, choice) -> the group's values; a config's `defaults:` list and `group=choice` pick them.
GROUPS = {("optim", "fsdp"): OPTIM_FSDP, ("engine", "fsdp"): ENGINE_FSDP, ("model", "hf_model"): MODEL_HF,
          ("profiler", "profiler"): {}}

_TRAINER = {
    "default_local_dir": "checkpoints/${trainer.project_name}/${trainer.experiment_name}",
    "default_hdfs_dir": None, "project_name": "gsm8k-sft", "experiment_name": "test", "total_epochs": 4,
    "total_training_steps": None, "logger": ["console", "wandb"], "seed": 1, "save_freq": -1, "test_freq": -1,
    "max_ckpt_to_keep": None, "resume_mode": "auto", "resume_from_path": None, "device": "cuda",
}
_SAVE_CONTENTS = ["model", "optimizer", "extra"]

LEGACY_DEFAULTS = {
    "defaults": [{"optim": "fsdp"}, "_self_"],
    "data": {
        "train_batch_size": 256, "micro_batch_size": None, "micro_batch_size_per_gpu": 4,
        "train_files": "~/data/gsm8k/train.parquet", "val_files": "~/data/gsm8k/test.parquet",
        "train_max_samples": -1, "val_max_samples": -1, "prompt_key": "question", "response_key": "answer",
        "prompt_dict_keys": None, "response_dict_keys": None,
        "multiturn": {"enable": False, "messages_key": "messages", "tools_key": "tools",
                      "enable_thinking_key": "enable_thinking"},
        "max_length": 1024, "truncation": "error", "balance_dp_token": False, "chat_template": None,
        "custom_cls": {"path": None, "name": None}, "use_shm": False, "apply_chat_template_kwargs": {},
    },
    "model": {
        "partial_pretrain": "~/models/gemma-1.1-7b-it", "use_shm": False,
        "fsdp_config": {"model_dtype": "fp32", "wrap_policy": {"min_num_params": 0}, "cpu_offload": False,
                        "offload_params": False},
        "external_lib": None, "enable_gradient_checkpointing": True, "trust_remote_code": False, "lora_rank": 0,
        "lora_alpha": 16, "target_modules": "all-linear", "use_liger": False, "strategy": "fsdp2",
    },
    "optim": {"lr": 1e-5, "betas": [0.9, 0.95], "weight_decay": 0.01, "lr_warmup_steps_ratio": 0.1,
              "clip_grad": 1.0, "lr_scheduler": "cosine"},
    "ulysses_sequence_parallel_size": 1,
    "use_remove_padding": False,
    "trainer": {**_TRAINER, "nnodes": 1, "n_gpus_per_node": 8,
                "checkpoint": {"save_contents": list(_SAVE_CONTENTS),
                               "load_contents": "${trainer.checkpoint.save_contents}"}},
}

ENGINE_DEFAULTS = {
    "defaults": [{"model@model": "hf_model"}, {"engine@engine": "fsdp"}, {"optim@optim": "fsdp"},
                 {"profiler@profiler": "profiler"}, "_self_"],
    "data": {
        "train_batch_size": 256, "micro_batch_size_per_gpu": 4, "max_token_len_per_gpu": 8192,
        "use_dynamic_bsz": True, "train_files": "~/data/gsm8k/train.parquet", "val_files": None,
        "train_max_samples": -1, "val_max_samples": -1, "messages_key": "messages", "tools_key": "tools",
        "enable_thinking_key": "enable_thinking", "pad_mode": "no_padding", "max_length": 1024,
        "truncation": "error", "balance_dp_token": False, "custom_cls": {"path": None, "name": None},
        "use_shm": False, "apply_chat_template_kwargs": {}, "ignore_input_ids_mismatch": False,
    },
    "checkpoint": {"_target_": "verl.trainer.config.CheckpointConfig", "save_contents": list(_SAVE_CONTENTS),
                   "load_contents": "${checkpoint.save_contents}"},
    "trainer": {**_TRAINER, "nnodes": 1, "n_gpus_per_node": 1, "profile_interval": [-1, -1]},
}

# ---- keys that mean nothing on this machine: accepted, named once in one warning -------------

IGNORED = {
    "use_shm", "data.use_shm", "model.use_shm", "model.fsdp_config.wrap_policy", "model.fsdp_config.offload_policy",
    "trainer.nnodes", "trainer.n_gpus_per_node", "trainer.default_hdfs_dir", "trainer.max_ckpt_to_keep_hdfs",
    "trainer.profile_interval", "profiler", "optim.total_training_steps",
    "optim.override_optimizer_config", "model.hf_config_path", "model.tokenizer_path", "model.use_fused_kernels",
    "model.fused_kernel_options", "model.mtp", "engine.wrap_policy", "engine.offload_policy", "engine.fsdp_size",
    "engine.forward_prefetch", "engine.use_orig_params", "engine.seed", "engine.full_determinism",
    "engine.entropy_from_logits_with_chunking", "engine.entropy_checkpointing", "engine.forward_only",
    "model.tiled_mlp.num_shards", "_target_",
}
CHECKPOINT_CONTENTS = ("model", "optimizer", "extra", "hf_model")


def compose(cfg: dict, choices: dict[str, str], source: str) -> dict:
    """Expand a Hydra `defaults:` list: the chosen groups first, the file's own keys on top."""
    defaults = cfg.pop("defaults", None)
    if defaults is None:
        return cfg
    out: dict = {}
    for entry in defaults:
        if entry == "_self_" or not isinstance(entry, dict):
            continue
        for spec, choice in entry.items():
            group, _, package = str(spec).partition("@")
            package = package or group
            choice = choices.get(group, choice)
            if (group, choice) not in GROUPS:
                known = sorted(c for g, c in GROUPS if g == group)
                raise VerliteError(f"{source}: config group {group}={choice} is not available in verlite; "
                                   f"use {group}={' or '.join(known) or '(remove it)'}")
            merge_into(out, {package: copy.deepcopy(GROUPS[(group, choice)])})
    merge_into(out, cfg)
    return out


def group_names(cfg: dict) -> set[str]:
    names = set()
    for entry in cfg.get("defaults") or []:
        if isinstance(entry, dict):
            names.update(str(k).partition("@")[0] for k in entry)
    return names


def merge_into(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge_into(dst[k], v)
        else:
            dst[k] = v
    return dst


def _pop(d: dict, dotted: str, default: Any = None) -> Any:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.get(p)
        if not isinstance(d, dict):
            return default
    return d.pop(parts[-1], default) if isinstance(d, dict) else default


def _set(d: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def _has(d: dict, dotted: str) -> bool:
    for p in dotted.split("."):
        if not isinstance(d, dict) or p not in d:
            return False
        d = d[p]
    return True


def _move(d: dict, src: str, dst: str, convert=lambda v: v) -> None:
    if _has(d, src):
        _set(d, dst, convert(_pop(d, src)))


def from_engine(raw: dict, source: str) -> dict:
    """verl >= 0.8's layout (model.path, engine.*, top-level checkpoint) -> the legacy layout."""
    _move(raw, "model.path", "model.partial_pretrain")
    _move(raw, "model.custom_chat_template", "data.chat_template")
    tiled = _pop(raw, "model.tiled_mlp")
    if isinstance(tiled, dict):
        _set(raw, "model.tiled_mlp", bool(tiled.get("enabled", False)))
    elif tiled is not None:
        _set(raw, "model.tiled_mlp", tiled)
    _move(raw, "model.use_remove_padding", "use_remove_padding")
    engine = raw.pop("engine", None) or {}
    renames = {"param_offload": "model.fsdp_config.offload_params",
               "optimizer_offload": "model.fsdp_config.optimizer_offload",
               "reshard_after_forward": "model.fsdp_config.reshard_after_forward",
               "model_dtype": "model.fsdp_config.model_dtype",
               "dtype": "model.fsdp_config.mixed_precision.param_dtype",
               "ulysses_sequence_parallel_size": "ulysses_sequence_parallel_size",
               "use_torch_compile": "model.compile", "strategy": "model.strategy"}
    for key, value in engine.items():
        if key not in ENGINE_FSDP:
            import difflib

            close = difflib.get_close_matches(key, list(ENGINE_FSDP), n=1)
            hint = f"; did you mean 'engine.{close[0]}'?" if close else ""
            raise VerliteError(f"{source}: unknown config key 'engine.{key}'{hint}")
        if key in renames:
            _set(raw, renames[key], value)
        elif value is not None and value != ENGINE_FSDP[key]:
            _set(raw, f"engine.{key}", value)  # listed as ignored only when the user changed it
    data = raw.setdefault("data", {})
    _set(raw, "data.multiturn.enable", True)  # the engine trainer reads conversations only
    for key in ("messages_key", "tools_key", "enable_thinking_key"):
        _move(raw, f"data.{key}", f"data.multiturn.{key}")
    if data.pop("use_dynamic_bsz", True) is False:
        data["max_token_len_per_gpu"] = None  # fixed micro-batches of micro_batch_size_per_gpu samples
    # no_padding and right padding give the same numbers; verlite lays micro-batches out
    # padding-free wherever the attention kernel allows, so the choice is made for the user.
    data.pop("pad_mode", None)
    _move(raw, "checkpoint", "trainer.checkpoint")
    return raw


def from_legacy(raw: dict, source: str, verl_defaults: bool = False) -> tuple[dict, list[str]]:
    """verl's renamed / deprecated keys -> verlite's; returns the accepted-but-ignored keys found."""
    if raw.get("engine") == {}:
        raw.pop("engine")
    ignored = sorted({k for k in IGNORED if k != "_target_" and _has(raw, k) and _pop(raw, k, 0) is not None}
                     | ({"_target_"} if _strip_targets(raw) else set()))
    for old, new in (("optim.lr_warmup_steps_ratio", "optim.warmup_steps_ratio"),
                     ("optim.lr_warmup_steps", "optim.warmup_steps")):
        _move(raw, old, new)
    # The legacy trainer reads optim.lr_scheduler, the engine trainer lr_scheduler_type (or
    # its older name warmup_style); the optim=fsdp group brings the latter into legacy configs.
    kind = _pop(raw, "optim.warmup_style")
    kind_type = _pop(raw, "optim.lr_scheduler_type")
    if not _has(raw, "optim.lr_scheduler") and (kind or kind_type):
        _set(raw, "optim.lr_scheduler", kind or kind_type)
    override = _pop(raw, "model.override_config")
    if override:
        if not isinstance(override, dict):
            raise VerliteError(f"{source}: 'model.override_config' must be a mapping of HF config fields")
        raw["model"].setdefault("config_overrides", {}).update(override)
    _pop(raw, "use_remove_padding")  # verlite always computes padding-free where attention allows
    mbs = _pop(raw, "data.micro_batch_size")
    if mbs is not None:  # verl's deprecated global micro batch: split over the data-parallel ranks
        sp = int(raw.get("ulysses_sequence_parallel_size") or 1)
        dp = max(1, int(os.environ.get("WORLD_SIZE", "1")) // max(1, sp))
        per_gpu = max(1, int(mbs) // dp)
        if os.environ.get("RANK", "0") == "0":
            log.warning("data.micro_batch_size is deprecated (verl); using data.micro_batch_size_per_gpu=%d", per_gpu)
        _set(raw, "data.micro_batch_size_per_gpu", per_gpu)
    if verl_defaults:  # verl's SFTDataset: response text + eos token (not the template's turn end)
        raw.setdefault("data", {}).setdefault("response_end", "eos")
    if verl_defaults and _has(raw, "trainer.device"):
        # verl's "cuda" names the accelerator, whatever the machine; verlite picks it when present
        _set(raw, "trainer.device", "cpu" if _pop(raw, "trainer.device") == "cpu" else "auto")
    return raw, ignored


def _strip_targets(d: Any) -> bool:
    found = False
    if isinstance(d, dict):
        found = d.pop("_target_", None) is not None
        for v in d.values():
            found = _strip_targets(v) or found
    return found


def check_checkpoint_contents(contents: list[str], key: str, source: str) -> None:
    bad = [c for c in contents if c not in CHECKPOINT_CONTENTS]
    if bad:
        raise VerliteError(f"{source}: '{key}' has {bad}; use any of {', '.join(CHECKPOINT_CONTENTS)}")


def warn_ignored(keys: list[str]) -> None:
    if keys and os.environ.get("RANK", "0") == "0":  # every torchrun rank reads the config; one line is enough
        log.warning("verl keys with no effect in verlite (accepted, ignored): %s", ", ".join(keys))
