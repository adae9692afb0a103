"""`from verlite.utils.model import load_model_and_tokenizer`, as the article writes it."""

from verlite.inference.loading import load_model_and_tokenizer

__all__ = ["load_model_and_tokenizer"]
