"""`from verlite.utils.lora import export_lora_to_hf`, as the article writes it."""

from verlite.lora import export_lora_to_hf, merge_lora

__all__ = ["export_lora_to_hf", "merge_lora"]
