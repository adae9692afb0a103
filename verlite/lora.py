"""LoRA adapters out of verlite checkpoints: a standard PEFT folder (for PEFT and vLLM's
`--enable-lora --lora-modules name=DIR`) or a full model with the adapter merged in (for
`vllm serve DIR`).

    from verlite.lora import export_lora_to_hf
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

from verlite.errors import VerliteError
from verlite.inference.loading import ADAPTER_CONFIG, is_adapter, load_model_and_tokenizer, resolve_checkpoint
from verlite.outputs import output_dir

log = logging.getLogger("verlite.inference")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's key layout, which vLLM's LoRA loader parses: base_model.model.<module path>.lora_{A,B}.weight
_PEFT_PREFIX = "base_model.model."


def _adapter_folder(checkpoint: str) -> Path:
    folder = resolve_checkpoint(checkpoint)
    if not is_adapter(folder):
        raise VerliteError(f"{checkpoint} holds no LoRA adapter (no {ADAPTER_CONFIG}); it is a full model already: "
                           "load or serve its huggingface/ folder directly")
    return folder


def check_vllm_compatible(folder: Path) -> None:
    """The fields and key names vLLM's LoRA loader relies on."""
    from safetensors import safe_open

    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    problems = []
    if config.get("use_dora"):
        problems.append("DoRA adapters are not served by vLLM")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']} (full extra modules) is not a LoRA")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']} (vLLM needs bias=none)")
    with safe_open(str(folder / ADAPTER_WEIGHTS), "pt") as f:
        bad = [k for k in f.keys() if not k.startswith(_PEFT_PREFIX) or ".lora_" not in k or ".default." in k]
    if bad:
        problems.append(f"unexpected tensor names such as {bad[0]}")
    if problems:
        raise VerliteError(f"{folder}: adapter cannot be served by vLLM: {'; '.join(problems)}")


def export_lora_to_hf(base_model: Optional[str], lora_path: str, output_path: str) -> Path:
    """Write a PEFT adapter folder for `lora_path` (a global_step_N folder, its huggingface/
    folder or an adapter folder) whose config names `base_model` as its base."""
    src = _adapter_folder(lora_path)
    out = Path(output_path).expanduser()
    config = json.loads((src / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    if base_model:
        config["base_model_name_or_path"] = base_model
    config["inference_mode"] = True
    with output_dir(out, "--output") as tmp:
        for item in src.iterdir():  # adapter weights + tokenizer files
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        check_vllm_compatible(tmp)
    log.info("LoRA adapter (r=%s, alpha=%s, %s) for %s written to %s", config.get("r"), config.get("lora_alpha"),
             config.get("target_modules"), config.get("base_model_name_or_path"), out)
    return out


def merge_lora(checkpoint: str, output_path: str, base_model: Optional[str] = None, dtype: Optional[str] = None) -> Path:
    """A full HF model (weights + config + tokenizer + generation config) with the adapter merged."""
    _adapter_folder(checkpoint)
    model, tokenizer = load_model_and_tokenizer(checkpoint, model_name=base_model, device="cpu",
                                                dtype=dtype or "fp32", merge=True)
    if dtype is None:  # save in the base model's own dtype (merging itself ran in fp32)
        import torch

        saved = getattr(model.config, "dtype", None) or getattr(model.config, "torch_dtype", None)
        if isinstance(saved, str):
            saved = getattr(torch, saved, None)
        if isinstance(saved, torch.dtype):
            model.to(saved)
    out = Path(output_path).expanduser()
    tokenizer.padding_side = "right"
    with output_dir(out, "--output") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    log.info("merged model written to %s (serve it with: vllm serve %s)", out, out)
    return out
