"""Code and files a config points at: `model.external_lib`, `data.custom_cls`,
`model.lora_adapter_path`. Checked when the config loads, so a bad path fails in one line
before any data or model is read."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path

from verlite.errors import VerliteError


def import_external_lib(name: str | None) -> None:
    """verl's model.external_lib: a module imported for its side effects (it registers a
    custom architecture with transformers' Auto classes)."""
    if not name:
        return
    try:
        importlib.import_module(name)
    except Exception as e:  # ImportError, or the module itself failing
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise VerliteError(f"model.external_lib: cannot import '{name}' ({reason}); "
                           "install it or put its folder on PYTHONPATH") from None


def load_custom_cls(path: str, name: str | None):
    """The class `name` from the Python file `path` (or `pkg://module.path`)."""
    if not name:
        raise VerliteError("data.custom_cls.name is not set; name the dataset class defined in data.custom_cls.path")
    if path.startswith("pkg://"):
        module_name = path[len("pkg://"):]
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise VerliteError(f"data.custom_cls.path: cannot import '{module_name}' ({type(e).__name__}: {e})") from None
    else:
        full = Path(os.path.expandvars(os.path.expanduser(path)))
        if not full.is_file():
            raise VerliteError(f"data.custom_cls.path: {path} does not exist; give the .py file defining {name}")
        module_name = f"verlite_custom_{abs(hash(str(full.resolve())))}"
        module = sys.modules.get(module_name)
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, full)
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except Exception as e:
                reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
                raise VerliteError(f"data.custom_cls.path: {path} fails to import ({reason})") from None
            sys.modules[module_name] = module
    cls = getattr(module, name, None)
    if cls is None:
        raise VerliteError(f"data.custom_cls.name: {path} defines no '{name}'; check the class name")
    return cls


def check_custom_cls(custom) -> None:
    if custom.path:
        load_custom_cls(custom.path, custom.name)


def adopt_lora_adapter(model_cfg) -> None:
    """model.lora_adapter_path: training continues that adapter, so its rank, alpha and
    targets replace the config's (as in verl, setting the path alone turns LoRA on)."""
    if not model_cfg.lora_adapter_path:
        return
    folder = Path(os.path.expanduser(model_cfg.lora_adapter_path))
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise VerliteError(f"model.lora_adapter_path: {model_cfg.lora_adapter_path} holds no adapter_config.json; "
                           "point it at a PEFT adapter folder")
    adapter = json.loads(config.read_text(encoding="utf-8"))
    model_cfg.lora_rank = int(adapter.get("r") or model_cfg.lora_rank or 8)
    model_cfg.lora_alpha = int(adapter.get("lora_alpha") or model_cfg.lora_alpha)
    targets = adapter.get("target_modules")
    if targets:
        # an adapter may list full module paths (model.layers.0.self_attn.q_proj): keep the layer names
        model_cfg.target_modules = sorted({t.rsplit(".", 1)[-1] for t in targets}) if isinstance(targets, list) \
            else targets
