"""Using a trained model: load any checkpoint kind, generate through the training chat template.

    from verlite.inference import load_model_and_tokenizer, generate
"""

from verlite.inference.generate import generate
from verlite.inference.loading import load_model_and_tokenizer

__all__ = ["load_model_and_tokenizer", "generate"]
