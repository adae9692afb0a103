"""`verlite serve`: an OpenAI-compatible HTTP server over a trained checkpoint and its LoRA
adapters, with continuous batching over a fixed set of slots.

    from verlite.serve import create_app
    app = create_app("./checkpoints/global_step_50", loras={"sft": "./lora-adapter"})
"""

from verlite.serve.app import create_app
from verlite.serve.loading import load_served

__all__ = ["create_app", "load_served"]
