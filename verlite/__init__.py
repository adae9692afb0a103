"""verlite: supervised fine-tuning of causal LMs, comfortable on one GPU, scaling out with FSDP2."""

__version__ = "0.1.0"
