"""YAML -> OmegaConf (interpolation) -> command-line overrides -> typed dataclasses.

Validation is done by hand rather than with OmegaConf structured configs so that every
error is one line naming the key, the file and the closest known key.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import os
import types
import typing
from pathlib import Path
from typing import Any, Union

from verlite.config.schema import ModelConfig, SFTConfig
from verlite.errors import VerliteError

log = logging.getLogger("verlite.config")

CHOICES = {
    "data.truncation": ("error", "left", "right", "drop"),
    "data.response_end": ("template", "eos"),
    "model.strategy": ("fsdp2", "fsdp", "none"),
    "optim.lr_scheduler": ("cosine", "constant", "linear", "wsd"),
    "trainer.resume_mode": ("auto", "disable", "resume_path"),
    "trainer.device": ("auto", "cuda", "cpu"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2", "flex_attention"),
}
DTYPES = ("fp32", "float32", "bf16", "bfloat16", "fp16", "float16")
EACH_EPOCH = "after_each_epoch"  # verl's save_freq / test_freq value: at the end of every epoch
LOGGERS = ("console", "tensorboard", "jsonl", "wandb")


DIALECTS = ("verlite", "verl", "verl_engine")


def load_config(config_path: str | None, overrides: list[str] = (), dialect: str = "verlite") -> SFTConfig:
    """Read `config_path` (None: the dialect's defaults), apply Hydra-style overrides.

    `dialect` names whose defaults apply without a YAML and how keys are read: "verlite"
    (verlite's schema defaults), "verl" (verl's legacy sft_trainer.yaml) or "verl_engine"
    (verl >= 0.8's sft_trainer_engine.yaml). verl's key names are accepted in every dialect.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from verlite.config import overrides as ov
    from verlite.config import verl

    source = config_path or "<defaults>"
    if config_path is not None:
        path = Path(os.path.expanduser(config_path))
        if not path.is_file():
            raise VerliteError(f"config file {config_path} does not exist; pass --config_path PATH_TO_YAML")
        try:
            base = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        except Exception as e:  # yaml.YAMLError carries the line in its text
            first = " ".join(str(e).split())
            raise VerliteError(f"{config_path}: not valid YAML: {first}") from None
        if not isinstance(base, dict):
            raise VerliteError(f"{config_path}: the top level must be a mapping of sections (data:, model:, ...)")
    else:
        base = copy.deepcopy({"verl": verl.LEGACY_DEFAULTS, "verl_engine": verl.ENGINE_DEFAULTS}.get(dialect, {}))
    parsed = ov.parse(list(overrides), verl.group_names(base))
    try:
        merged = OmegaConf.create(verl.compose(base, parsed.groups, source))
        ov.apply(merged, parsed.edits)
        raw = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as e:
        msg = " ".join(str(e).split("\n")[0].split())
        raise VerliteError(f"{source}: {msg}") from None
    raw = raw or {}
    if dialect == "verl_engine" or isinstance(raw.get("engine"), dict):
        raw = verl.from_engine(raw, source)
    raw, ignored = verl.from_legacy(raw, source, verl_defaults=dialect != "verlite")
    verl.warn_ignored(ignored)
    cfg = _build(SFTConfig, raw, "", source)
    _check_values(cfg, source)
    return cfg


def _known_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        sub = _dataclass_of(typing.get_type_hints(cls)[f.name])
        if sub is not None:
            keys.extend(_known_keys(sub, name + "."))
    return keys


def _dataclass_of(tp: Any) -> type | None:
    return tp if dataclasses.is_dataclass(tp) else None


def _unknown_key(key: str, source: str) -> VerliteError:
    close = difflib.get_close_matches(key, _known_keys(SFTConfig), n=1, cutoff=0.5)
    if not close:  # a misplaced key: compare its last part with every key's last part
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in _known_keys(SFTConfig) if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f"; did you mean '{close[0]}'?" if close else "; see examples/sft_single.yaml for the known keys"
    return VerliteError(f"{source}: unknown config key '{key}'{hint}")


def _build(cls: type, values: Any, prefix: str, source: str):
    if not isinstance(values, dict):
        raise VerliteError(f"{source}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs, extras = {}, {}
    for key, value in values.items():
        dotted = prefix + str(key)
        if key not in names:
            if cls is ModelConfig:
                extras[key] = value  # an HF config override such as rope_theta; checked at model load
            else:
                raise _unknown_key(dotted, source)
            continue
        sub = _dataclass_of(hints[key])
        if sub is not None:
            kwargs[key] = _build(sub, value if value is not None else {}, dotted + ".", source)
        elif key == "config_overrides":
            extras.update(value or {})
        else:
            kwargs[key] = _coerce(value, hints[key], dotted, source)
    obj = cls(**kwargs)
    if cls is ModelConfig:
        obj.config_overrides = extras
    return obj


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert `value` to the annotated type `tp`, or fail naming the key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        # Try str last so "512" becomes an int where int is allowed.
        for arg in sorted((a for a in args if a is not type(None)), key=lambda a: a is str):
            try:
                return _coerce(value, arg, key, source)
            except VerliteError as e:
                errors.append(e)
        raise errors[-1]
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            raise VerliteError(f"{source}: '{key}' must be a list, got {value!r}")
        if not isinstance(value, (list, tuple)):
            raise VerliteError(f"{source}: '{key}' must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is typing.Any or tp is dict or origin is dict:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise VerliteError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise VerliteError(f"{source}: '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise VerliteError(f"{source}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise VerliteError(f"{source}: '{key}' must be a number, got {value!r}")
        try:
            return float(value)  # also "2e-5", which YAML 1.1 reads as a string
        except (TypeError, ValueError):
            raise VerliteError(f"{source}: '{key}' must be a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise VerliteError(f"{source}: '{key}' must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in schema.py, not user error


def get_key(cfg: SFTConfig, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_values(cfg: SFTConfig, source: str) -> None:
    for key, allowed in CHOICES.items():
        value = get_key(cfg, key)
        if value not in allowed:
            raise VerliteError(f"{source}: '{key}' is {value!r}; use one of {', '.join(allowed)}")
    for key in ("model.fsdp_config.model_dtype", "model.fsdp_config.mixed_precision.param_dtype",
                "model.fsdp_config.mixed_precision.reduce_dtype", "model.fsdp_config.mixed_precision.buffer_dtype"):
        value = get_key(cfg, key)
        if value is not None and value not in DTYPES:
            raise VerliteError(f"{source}: '{key}' is {value!r}; use one of fp32, bf16, fp16")
    for key in ("model.enable_gradient_checkpointing", "optim.fused_backward", "model.use_liger"):
        if get_key(cfg, key) not in (True, False, "auto"):
            raise VerliteError(f"{source}: '{key}' is {get_key(cfg, key)!r}; use true, false or auto")
    mb = cfg.data.micro_batch_size_per_gpu
    if mb != "auto" and (not isinstance(mb, int) or mb < 1):
        raise VerliteError(f"{source}: 'data.micro_batch_size_per_gpu' must be a positive integer or auto, got {mb!r}")
    budget = cfg.data.max_token_len_per_gpu
    if budget is not None and budget != "auto" and (not isinstance(budget, int) or budget < 1):
        raise VerliteError(f"{source}: 'data.max_token_len_per_gpu' must be a positive integer or auto, got {budget!r}")
    positive = {"data.max_length": cfg.data.max_length, "trainer.log_interval": cfg.trainer.log_interval,
                "trainer.total_epochs": cfg.trainer.total_epochs, "trainer.max_bad_steps": cfg.trainer.max_bad_steps}
    for key, value in positive.items():
        if value < 1:
            raise VerliteError(f"{source}: '{key}' must be at least 1, got {value}")
    if cfg.data.train_batch_size is not None and cfg.data.train_batch_size < 1:
        raise VerliteError(f"{source}: 'data.train_batch_size' must be at least 1, got {cfg.data.train_batch_size}")
    if cfg.trainer.total_training_steps is not None and cfg.trainer.total_training_steps < 1:
        raise VerliteError(f"{source}: 'trainer.total_training_steps' must be at least 1")
    if cfg.model.lora_rank < 0:
        raise VerliteError(f"{source}: 'model.lora_rank' must be 0 (full fine-tune) or positive, got {cfg.model.lora_rank}")
    if len(cfg.optim.betas) != 2:
        raise VerliteError(f"{source}: 'optim.betas' must be two numbers like [0.9, 0.95]")
    for name in loggers(cfg):
        if name not in LOGGERS:
            raise VerliteError(f"{source}: 'trainer.logger' has {name!r}; use console, tensorboard, jsonl or wandb")
    if cfg.trainer.resume_mode == "resume_path" and not cfg.trainer.resume_from_path:
        raise VerliteError(f"{source}: trainer.resume_mode is resume_path but trainer.resume_from_path is not set")
    for key in ("save_freq", "test_freq"):
        value = getattr(cfg.trainer, key)
        if isinstance(value, str) and value != EACH_EPOCH:
            raise VerliteError(f"{source}: 'trainer.{key}' is {value!r}; use a number of steps, -1, or {EACH_EPOCH}")
    if not cfg.model.partial_pretrain:
        raise VerliteError(f"{source}: 'model.partial_pretrain' is not set; give a Hugging Face model id or local path")
    from verlite.config import verl
    from verlite.config.user_code import adopt_lora_adapter, check_custom_cls, import_external_lib

    ck = cfg.trainer.checkpoint
    verl.check_checkpoint_contents(ck.save_contents, "trainer.checkpoint.save_contents", source)
    if ck.load_contents is not None:
        verl.check_checkpoint_contents(ck.load_contents, "trainer.checkpoint.load_contents", source)
    for key in ("train_max_samples", "val_max_samples"):
        if getattr(cfg.data, key) == 0 or getattr(cfg.data, key) < -1:
            raise VerliteError(f"{source}: 'data.{key}' must be a positive count or -1 (all rows)")
    import_external_lib(cfg.model.external_lib)
    check_custom_cls(cfg.data.custom_cls)
    adopt_lora_adapter(cfg.model)
    _check_small_card_keys(cfg, source)


# ---- small cards (issue 10): quantized base, low-memory optimizers -------------------------
QUANTIZATIONS = ("nf4",)
# optim.optimizer_impl -> the optim.optimizer names verlite accepts from it (verl spells them so:
# a class name inside that module).
OPTIMIZERS = {
    "torch.optim": ("AdamW",),
    "torchao.optim": ("AdamW", "_AdamW", "AdamW8bit", "AdamW4bit", "AdamWFp8"),
    "bitsandbytes.optim": ("AdamW", "AdamW8bit", "PagedAdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW32bit"),
}
PIP_NAMES = {"torchao.optim": "torchao", "bitsandbytes.optim": "bitsandbytes"}


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _check_small_card_keys(cfg: SFTConfig, source: str) -> None:
    """Names known, packages installed, combinations that make sense; nothing is imported, so
    a bad value fails in a second, before any model is read."""
    m, o = cfg.model, cfg.optim
    if m.quantization is not None:
        if m.quantization not in QUANTIZATIONS:
            raise VerliteError(f"{source}: 'model.quantization' is {m.quantization!r}; use nf4 (QLoRA's 4-bit base) "
                               "or null")
        if m.lora_rank <= 0:
            raise VerliteError(f"{source}: model.quantization={m.quantization} freezes the base model, so it needs "
                               "LoRA: set model.lora_rank (e.g. 8), or for a low-memory full fine-tune drop it and use "
                               "optim.optimizer=AdamW8bit optim.optimizer_impl=torchao.optim")
        if not _installed("torchao"):
            raise VerliteError(f"{source}: model.quantization={m.quantization} needs torchao: pip install "
                               "'torchao>=0.18'")
    impl, name = o.optimizer_impl, o.optimizer
    if impl not in OPTIMIZERS:
        raise VerliteError(f"{source}: 'optim.optimizer_impl' is {impl!r}; use one of {', '.join(OPTIMIZERS)}")
    if name not in OPTIMIZERS[impl]:
        home = [i for i, names in OPTIMIZERS.items() if name in names and i != impl]
        hint = f"set optim.optimizer_impl={home[0]}" if home else f"use one of {', '.join(OPTIMIZERS[impl])}"
        raise VerliteError(f"{source}: 'optim.optimizer' is {name!r}, which {impl} does not provide; {hint}")
    package = PIP_NAMES.get(impl)
    if package and not _installed(package):
        raise VerliteError(f"{source}: optim.optimizer_impl={impl} but {package} is not installed: pip install "
                           f"{package} (or use optim.optimizer_impl=torchao.optim, same optimizer names)")
    if m.fsdp_config.optimizer_offload and (impl, name) != ("torch.optim", "AdamW"):
        raise VerliteError(f"{source}: model.fsdp_config.optimizer_offload keeps exact fp32 AdamW state in host "
                           f"memory; it does not combine with optim.optimizer={name} ({impl}): pick one of the two")


def loggers(cfg: SFTConfig) -> list[str]:
    value = cfg.trainer.logger
    return [value] if isinstance(value, str) else list(value)
