"""Host time of the optimizer step fused into backward (engine/fused_backward.py), per weight
against per decoder layer: 28 Qwen2-like layers of 12 weights plus the root's, tiny tensors,
so what is timed is the Python and dispatch work around each update, which is what a GPU
step waits on when it is host-bound (the 1.5B full fine-tune at 12 GiB). CPU, no GPU needed:

    python bench/fused_overhead.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from verlite.engine.fused_backward import FusedBackward  # noqa: E402


def build() -> tuple[list[list[torch.nn.Parameter]], list[torch.nn.Parameter]]:
    def w(*shape):
        return torch.nn.Parameter(torch.randn(*shape))

    layers = [[w(16, 16) for _ in range(4)] + [w(16) for _ in range(3)] + [w(32, 16) for _ in range(3)] +
              [w(16) for _ in range(2)] for _ in range(28)]  # q k v o, q/k/v biases, gate up down, two norms
    return layers, [w(64, 16), w(16)]  # embedding, final norm


def main() -> None:
    torch.manual_seed(0)
    for name, grouped in (("per weight", False), ("per layer", True)):
        layers, root = build()
        params = [p for layer in layers for p in layer] + root
        opt = torch.optim.AdamW(params, lr=1e-3, foreach=False)
        fused = FusedBackward(opt, params, clip_grad=1.0, buckets=layers if grouped else None)
        times = []
        for _ in range(30):
            loss = sum((p * p).sum() for p in params)
            fused.arm(torch.device("cpu"))
            start = time.perf_counter()
            loss.backward()
            fused.finish()
            times.append(time.perf_counter() - start)
        print(f"{name}: {len(fused.buckets)} optimizer calls, backward + updates "
              f"{statistics.median(times[5:]) * 1e3:.1f} ms (median of 25 steps)")


if __name__ == "__main__":
    main()
