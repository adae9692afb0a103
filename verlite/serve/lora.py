"""Several LoRA adapters on one base, applied per batch row.

Every adapter's A and B of a projection are stacked into one tensor, padded to the largest
rank (zeros change nothing), with index 0 the base (all zeros). A row of a batch picks its
adapter by index, so requests for different adapters share one forward pass:
y = base(x) + (x @ A[idx]) @ B[idx] * scale[idx].
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from verlite.errors import VerliteError

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


def read_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, {key: tensor}) of a PEFT adapter folder."""
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    for name in ADAPTER_WEIGHTS:
        path = folder / name
        if path.is_file():
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return config, load_file(str(path))
            return config, torch.load(path, map_location="cpu", weights_only=True)
    raise VerliteError(f"{folder} has adapter_config.json but no {' or '.join(ADAPTER_WEIGHTS)}")


def module_key(key: str) -> tuple[int, str, str] | None:
    """'base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight' -> (3, 'q_proj', 'A')."""
    parts = key.split(".")
    if "layers" not in parts or "lora_A" not in parts and "lora_B" not in parts:
        return None
    at = parts.index("layers")
    side = "A" if "lora_A" in parts else "B"
    return int(parts[at + 1]), parts[parts.index(f"lora_{side}") - 1], side


class LoraBank:
    """The stacked adapters of every (layer, projection) that any adapter touches."""

    def __init__(self, names: list[str]):
        self.names = names  # index 1.. ; 0 is the base
        self.stacks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def build(cls, adapters: dict[str, Path], linears: dict[tuple[int, str], torch.nn.Linear],
              dtype: torch.dtype, device: torch.device) -> "LoraBank":
        bank = cls(list(adapters))
        loaded = []
        for name, folder in adapters.items():
            config, weights = read_adapter(folder)
            if config.get("use_dora") or config.get("peft_type", "LORA") != "LORA":
                raise VerliteError(f"{folder}: only plain LoRA adapters can be served (this one is "
                                   f"{config.get('peft_type')}{' with DoRA' if config.get('use_dora') else ''})")
            r = int(config["r"])
            scale = config["lora_alpha"] / (math.sqrt(r) if config.get("use_rslora") else r)
            pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
            for key, tensor in weights.items():
                where = module_key(key)
                if where is None:
                    continue
                layer, proj, side = where
                if (layer, proj) not in linears:
                    raise VerliteError(f"{folder}: adapter weight {key} names no projection of the base model; "
                                       "pass the base it was trained on")
                pairs.setdefault((layer, proj), {})[side] = tensor
            if not pairs:
                raise VerliteError(f"{folder}: no LoRA weights found in the adapter")
            loaded.append((scale, pairs, folder))
        rank = {}
        for _, pairs, _ in loaded:
            for where, ab in pairs.items():
                rank[where] = max(rank.get(where, 0), ab["A"].shape[0])
        for where, r in rank.items():
            linear = linears[where]
            a = torch.zeros(len(adapters) + 1, linear.in_features, r, dtype=dtype)
            b = torch.zeros(len(adapters) + 1, r, linear.out_features, dtype=dtype)
            for i, (scale, pairs, folder) in enumerate(loaded, start=1):
                if where not in pairs:
                    continue
                lora_a, lora_b = pairs[where]["A"], pairs[where]["B"]
                if lora_a.shape[1] != linear.in_features or lora_b.shape[0] != linear.out_features:
                    raise VerliteError(f"the adapter in {folder} does not fit the base model (layer {where[0]} "
                                       f"{where[1]}: {tuple(lora_a.shape)}/{tuple(lora_b.shape)} against "
                                       f"{linear.in_features}->{linear.out_features}); pass the base it was trained on")
                a[i, :, :lora_a.shape[0]] = lora_a.T.to(dtype)
                b[i, :lora_b.shape[1], :] = (lora_b.T * scale).to(dtype)  # scale folded into B
            bank.stacks[where] = (a.to(device), b.to(device))
        return bank

    def apply(self, where: tuple[int, str], x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """y + this projection's LoRA for each row of x ([rows, tokens, in]); index: [rows] adapter ids."""
        stack = self.stacks.get(where)
        if stack is None:
            return y
        a, b = stack
        return y + torch.bmm(torch.bmm(x, a[index]), b[index])
