"""Host (CPU) time per decoder-layer call of a QLoRA step: NF4 base vs bf16 base, eager vs
compiled, with recomputation. qlora7b_12g leaves the GPU idle part of each step; this tells
whether the host cost of torchao's NF4 tensor subclass (flattened and rewrapped by AOTAutograd
at every compiled call, dispatched in Python when eager) is what the GPU waits for.

    python bench/nf4_overhead.py                  # GPU: a 7B-wide layer stack, inductor
    python bench/nf4_overhead.py --smoke          # CPU: a tiny model, aot_eager (the code paths)

Prints one JSON line per setting: host ms per layer per step (forward + recompute + backward,
measured with the device synchronized only at the ends of the timed steps, so it is the time the
host needs to issue the work) and the step's wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def run(model_dir: Path, nf4: bool, compiled: bool, backend: str, tokens: int, device: str, steps: int) -> dict:
    import torch

    from verlite.config.schema import ModelConfig
    from verlite.models.load import load_model
    from verlite.models.sft_model import SFTModel

    cfg = ModelConfig(partial_pretrain=str(model_dir), enable_gradient_checkpointing=True, lora_rank=8,
                      target_modules=["q_proj", "v_proj"], quantization="nf4" if nf4 else None)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = SFTModel(load_model(cfg, dtype)).to(device)
    model.train()
    if compiled:
        for layer in model.decoder_layers():
            layer.compile(backend=backend)
    lm = model.causal_lm
    ids = torch.randint(0, lm.config.vocab_size, (1, tokens), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            hidden = lm.get_decoder()(input_ids=ids).last_hidden_state
        hidden.float().pow(2).mean().backward()

    for _ in range(3):
        step()
    sync()
    host, wall = 0.0, time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        host += time.perf_counter() - t
    sync()
    wall = time.perf_counter() - wall
    layers = len(model.decoder_layers())
    return {"nf4": nf4, "compiled": compiled, "backend": backend if compiled else "eager", "tokens": tokens,
            "host_ms_per_layer": round(host / steps / layers * 1e3, 3), "step_ms": round(wall / steps * 1e3, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--steps", type=int, default=5)
    a = p.parse_args()
    from transformers import AutoTokenizer  # noqa: F401  (import cost outside the timings)

    from shapes import SHAPES

    shape = dict(SHAPES["tiny" if a.smoke else "qwen7b"], num_hidden_layers=a.layers)
    folder = Path(tempfile.mkdtemp(prefix="nf4_overhead_"))
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(max_position_embeddings=max(a.tokens, 4096), **shape)).save_pretrained(folder)
    device = "cpu" if a.smoke else "cuda"
    backend = "aot_eager" if a.smoke else "inductor"
    tokens = 64 if a.smoke else a.tokens
    for nf4 in (False, True):
        for compiled in (False, True):
            print(json.dumps(run(folder, nf4, compiled, backend, tokens, device, 2 if a.smoke else a.steps)), flush=True)


if __name__ == "__main__":
    main()
