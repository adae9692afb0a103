"""Load what `verlite serve` serves: one base model, and LoRA adapters on it by name."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from verlite.errors import VerliteError
from verlite.inference.generate import stop_token_ids
from verlite.inference.loading import is_adapter, load_checkpoint, resolve_checkpoint
from verlite.serve.engine import Engine
from verlite.serve.runner import BLOCK, SlotRunner

log = logging.getLogger("verlite.serve")

DEFAULT_MAX_MODEL_LEN = 4096


@dataclass
class Served:
    engine: Engine
    tokenizer: object
    models: dict[str, int]  # served name -> adapter index (0 = the base)
    max_model_len: int
    max_num_seqs: int


def parse_lora_args(items: list[str]) -> dict[str, str]:
    """['name=path', ...] -> {name: path} (vLLM's --lora-modules form)."""
    loras = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise VerliteError(f"--lora {item}: write it as NAME=PATH (e.g. --lora sft=./lora-adapter)")
        if name in loras:
            raise VerliteError(f"--lora {item}: the name '{name}' is given twice")
        loras[name] = path
    return loras


def load_served(checkpoint: str, loras: Optional[dict[str, str]] = None, base_model: Optional[str] = None,
                served_model_name: Optional[str] = None, device=None, dtype=None, max_num_seqs: int = 8,
                max_model_len: Optional[int] = None, max_queue: int = 256, cuda_graphs: bool = True,
                kv_cache_tokens: Optional[int] = None) -> Served:
    """The base (or an adapter checkpoint's base) plus every LoRA, ready to serve.

    An adapter checkpoint is served under `served_model_name` (default: the path as given)
    and its base under the base's own name; a full model under `served_model_name`.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lora_folders = {}  # checked before the model loads, so a typo fails at once
    for name, path in (loras or {}).items():
        lora_folders[name] = resolve_checkpoint(path)
        if not is_adapter(lora_folders[name]):
            raise VerliteError(f"--lora {name}={path}: no adapter_config.json there; pass a LoRA adapter folder "
                               "(a LoRA run's global_step_N, or `verlite export-lora` output)")
    # An adapter checkpoint: its base, with the LoRA served per request like any --lora.
    loaded = load_checkpoint(str(checkpoint), base_model, device, dtype, attach=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    adapters: dict[str, Path] = {}
    if loaded.adapter is not None:
        base_name = loaded.base_id
        adapters[served_model_name or str(checkpoint)] = loaded.adapter
    else:
        base_name = served_model_name or str(checkpoint)
    for name, lora_folder in lora_folders.items():
        if name in adapters or name == base_name:
            raise VerliteError(f"--lora {name}={loras[name]}: the name '{name}' is already served; pick another")
        adapters[name] = lora_folder
    limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_MAX_MODEL_LEN
    if max_model_len is None:
        max_model_len = min(limit, DEFAULT_MAX_MODEL_LEN)
    elif not 1 < max_model_len <= limit:
        raise VerliteError(f"--max_model_len {max_model_len}: the model takes 2 to {limit} positions")
    if max_num_seqs < 1:
        raise VerliteError(f"--max_num_seqs {max_num_seqs}: needs at least 1")
    if kv_cache_tokens is not None and kv_cache_tokens < max_model_len:
        raise VerliteError(f"--kv_cache_tokens {kv_cache_tokens}: must hold at least one full context "
                           f"(--max_model_len {max_model_len})")
    num_blocks = 1 + -(-kv_cache_tokens // BLOCK) if kv_cache_tokens else None
    runner = SlotRunner(model, max_num_seqs, max_model_len, adapters, cuda_graphs=cuda_graphs, num_blocks=num_blocks)
    engine = Engine(runner, tokenizer, stop_token_ids(model, tokenizer), max_queue=max_queue)
    models = {base_name: 0, **{name: i for i, name in enumerate(adapters, start=1)}}
    log.info("serving %s on %s (%s): %d slots, context %d, KV cache %d tokens", ", ".join(models), device,
             runner.dtype, max_num_seqs, max_model_len, (runner.num_blocks - 1) * BLOCK)
    return Served(engine, tokenizer, models, max_model_len, max_num_seqs)
