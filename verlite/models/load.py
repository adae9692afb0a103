"""Loading a Hugging Face causal LM and its tokenizer for training: path resolution,
config overrides from `model:` keys, LoRA through PEFT, gradient checkpointing.

The model definition stays the Hugging Face one; how it is sharded lives in engine/.
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
from pathlib import Path

import torch

from verlite.config.schema import ModelConfig
from verlite.errors import VerliteError
from verlite.models.checkpointing import enable_checkpointing
from verlite.models.gguf import find_gguf, hf_folder_for

log = logging.getLogger("verlite.model")

# Held while building a transformers model: its construction switches process-wide state
# (from_pretrained's no-init context patches torch.nn.init's functions for the whole process),
# and the trainer reads the weights on a side thread (models/early_read.py) while the memory
# plan builds a weightless copy (engine/memory.model_shape). read_model holds it across its
# own weightless checks (check_lora_targets, check_quantizable), which take it no further.
MODEL_BUILD_LOCK = threading.Lock()

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_model_path(name: str) -> str:
    """A local folder as is (with ~ expanded); a `.gguf` file, or a folder holding one, as
    the HF folder converted from it (models/gguf.py); anything else is taken as a hub id."""
    local = os.path.expandvars(os.path.expanduser(name))
    if Path(local).exists():
        gguf_file = find_gguf(Path(local))
        if gguf_file is not None:
            return str(hf_folder_for(gguf_file))
        if not Path(local).is_dir():
            raise VerliteError(f"model path {name} is a file; give the folder holding config.json or a .gguf file")
        return local
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise VerliteError(f"model path {name} does not exist; check model.partial_pretrain")
    return name


def read_ahead_weights(name: str) -> int:
    """Ask the kernel to start reading a local model folder's weight files into the page
    cache (posix_fadvise WILLNEED: asynchronous, no thread, nothing held), so a cold disk
    works while the data is tokenized. Returns the bytes asked for; 0 where it does not apply."""
    folder = Path(os.path.expandvars(os.path.expanduser(name)))
    if not folder.is_dir() or not hasattr(os, "posix_fadvise"):
        return 0
    asked = 0
    for path in sorted(folder.glob("*.safetensors")):
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                asked += path.stat().st_size
            finally:
                os.close(fd)
        except OSError:
            continue
    return asked


def _hub_error(name: str, err: Exception, what: str) -> VerliteError:
    reason = " ".join(str(err).split())[:160]
    return VerliteError(f"cannot load the {what} of '{name}' (not a local folder, and the hub gave: {reason}); "
                        "pass a local model folder, or check the id and your network")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e, "tokenizer") from None
    if len(tok) <= 1:
        # transformers 5 builds an empty tokenizer of the config's model type when a folder holds
        # no tokenizer files: every text would become no tokens at all.
        raise VerliteError(f"{name} has no tokenizer (no tokenizer.json, tokenizer.model or vocab files next to "
                           "config.json); copy them from the base model into that folder")
    if tok.pad_token_id is None:
        # Padding never carries loss or attention; any id works, eos is the usual choice.
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


_CONFIGS: dict[tuple, object] = {}  # (path, trust_remote_code, config.json's stamp) -> config as read


def read_hf_config(path: str, trust_remote_code: bool = False):
    """AutoConfig.from_pretrained(path), read once per process (the SP check, the resume
    settings, the memory plan and the model load all ask for it): a fresh copy each call."""
    import copy

    from transformers import AutoConfig

    try:
        st = os.stat(os.path.join(path, "config.json"))
        stamp = (st.st_size, st.st_mtime_ns)
    except OSError:  # a hub id: its cached file does not change within a run
        stamp = None
    key = (path, trust_remote_code, stamp)
    if key not in _CONFIGS:
        _CONFIGS[key] = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return copy.deepcopy(_CONFIGS[key])


def load_hf_config(cfg: ModelConfig):
    """The model's HF config with `model:` extras (e.g. rope_theta) applied and checked."""
    path = resolve_model_path(cfg.partial_pretrain)
    try:
        hf_config = read_hf_config(path, cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(cfg.partial_pretrain, e, "config") from None
    known = set(hf_config.to_dict())
    # transformers 5 keeps rope settings in a nested dict; `model.rope_theta` still means them.
    rope = getattr(hf_config, "rope_parameters", None)
    for key, value in cfg.config_overrides.items():
        if isinstance(rope, dict) and key in rope:
            log.info("model config override: rope_parameters.%s = %r (was %r)", key, value, rope[key])
            rope[key] = value
            continue
        if key not in known:
            candidates = sorted(known) + sorted(rope or {}) + ["lora_rank", "target_modules", "lora_alpha"]
            close = difflib.get_close_matches(key, candidates, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise VerliteError(f"unknown config key 'model.{key}': not a verlite model key nor a field of "
                               f"{type(hf_config).__name__}{hint}")
        log.info("model config override: %s = %r (was %r)", key, value, getattr(hf_config, key, None))
        setattr(hf_config, key, value)
    return hf_config


def master_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """Dtype the weights live in. Trainable weights default to fp32 (bf16 compute comes from
    FSDP's mixed precision); a frozen LoRA base defaults to the compute dtype, since
    nothing is ever added to it."""
    if cfg.fsdp_config.model_dtype:
        return DTYPES[cfg.fsdp_config.model_dtype]
    if device.type == "cuda" and cfg.lora_rank > 0:
        return DTYPES[cfg.fsdp_config.mixed_precision.param_dtype]
    return torch.float32


def load_model(cfg: ModelConfig, dtype: torch.dtype, liger_kinds: tuple[str, ...] = ()):
    """The HF model on CPU in `dtype`, with LoRA and gradient checkpointing applied (and Liger's
    kernels of `liger_kinds` before either, as verl does: Liger patches the plain model's
    layers, and the tiled MLP must wrap Liger's MLP rather than be replaced by it)."""
    return prepare_model(read_model(cfg, dtype, liger_kinds), cfg)


def read_model(cfg: ModelConfig, dtype: torch.dtype, liger_kinds: tuple[str, ...] = ()):
    """load_model's first half, which no memory-plan setting changes: the weights read into
    the HF model on CPU in `dtype`, Liger's kernels in (the trainer runs it beside the data,
    models/early_read.py)."""
    from verlite.models import attention
    from verlite.models.quant import quiet_torchao_import

    hf_config = load_hf_config(cfg)
    path = resolve_model_path(cfg.partial_pretrain)
    with MODEL_BUILD_LOCK:  # also over the imports: one thread at a time imports model code
        quiet_torchao_import()  # transformers' model code imports torchao (when installed): keep its warnings out
        from transformers import AutoModelForCausalLM

        if cfg.lora_rank > 0:
            check_lora_targets(cfg, hf_config)  # before reading gigabytes of weights
        if cfg.quantization:
            from verlite.models.quant import check_quantizable

            check_quantizable(hf_config, cfg.trust_remote_code)
        attention.register()
        try:
            model = AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=dtype,
                                                         trust_remote_code=cfg.trust_remote_code,
                                                         attn_implementation=attention.NAME)
        except (OSError, ValueError) as e:
            raise _hub_error(cfg.partial_pretrain, e, "weights") from None
        model.config.use_cache = False
        if liger_kinds:
            from verlite.models.liger import use_liger_kernels

            use_liger_kernels(model, liger_kinds, required=cfg.use_liger != "auto")
    return model


def prepare_model(model, cfg: ModelConfig):
    """load_model's second half, after the memory plan (engine/memory.py) has turned `auto`
    settings into values: gradient checkpointing, LoRA, NF4 base weights, tiled MLP."""
    if cfg.enable_gradient_checkpointing is True:  # auto is resolved by the trainer's plan; unresolved: off
        enable_checkpointing(model, cfg.checkpoint_layers, cfg.enable_activation_offload, cfg.keep_attention_layers)
    if cfg.lora_rank > 0:
        model = apply_lora(model, cfg)
    if cfg.quantization:  # after LoRA: every frozen base linear, targeted by LoRA or not
        from verlite.models.quant import quantize_frozen_linears

        quantize_frozen_linears(model, torch.device("cuda", torch.cuda.current_device())
                                if torch.cuda.is_available() else None)
    if cfg.tiled_mlp:
        from verlite.models.tiled_mlp import apply_tiled_mlp

        log.info("tiled MLP: %d tokens per tile (model.tiled_mlp)", apply_tiled_mlp(model))
    return model


def linear_module_names(model) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, mod in model.named_modules()
                   if isinstance(mod, torch.nn.Linear) and name})


def check_lora_targets(cfg: ModelConfig, hf_config) -> None:
    """Every named target must be a linear layer of the model (checked on a weightless copy)."""
    from transformers import AutoModelForCausalLM

    if not isinstance(cfg.target_modules, list):
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=cfg.trust_remote_code)
    present = linear_module_names(model)
    missing = [t for t in cfg.target_modules if t not in present]
    if missing:
        raise VerliteError(f"model.target_modules: {missing} not found in {type(model).__name__}; "
                           f"its linear layers are {present} (or use all-linear)")


def apply_lora(model, cfg: ModelConfig):
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = cfg.target_modules
    if cfg.lora_adapter_path:  # continue training an existing adapter (verl's model.lora_adapter_path)
        path = os.path.expanduser(cfg.lora_adapter_path)
        try:
            model = PeftModel.from_pretrained(model, path, is_trainable=True)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise VerliteError(f"model.lora_adapter_path: cannot load the adapter in {cfg.lora_adapter_path} onto "
                               f"{cfg.partial_pretrain} ({' '.join(str(e).split())[:160]})") from None
        log.info("LoRA: continuing the adapter in %s", cfg.lora_adapter_path)
        return model
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, exclude_modules=cfg.exclude_modules or None,
                      task_type="CAUSAL_LM", bias="none")
    # Non-reentrant checkpointing (enabled above) needs no grads on the frozen embeddings' output.
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("LoRA r=%d alpha=%d on %s: %s trainable of %s parameters (%.3f%%)", cfg.lora_rank, cfg.lora_alpha,
             targets, f"{trainable:,}", f"{total:,}", 100 * trainable / total)
    return model
