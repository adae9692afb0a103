"""GPU: which attention kernel trains fastest on verlite's shapes (forward + backward).

verlite runs packed rows through PyTorch's varlen flash kernel (`torch.nn.attention.varlen`),
FlashAttention-2 code built for every GPU. A row that holds ONE sample (the long-context cases:
batch 1, 8k-131k tokens) needs no varlen kernel: plain causal SDPA computes the same, and on
Hopper PyTorch's cuDNN backend may be faster. This times, per shape, the varlen kernel against
each SDPA backend on the same q/k/v (bf16, causal, grouped-query heads as the model has them),
checks they agree (and times verlite's own one-sample path, which asks for cuDNN then flash by
priority, as training does), and prints one JSON line each with the fwd+bwd time and attention TFLOP/s
(causal: 2*T*T*D*Hq forward, 2.5x that backward).

    python bench/attention_check.py            # GPU
    python bench/attention_check.py --smoke    # CPU: tiny shapes, the code paths only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verlite.models import attention as attn  # noqa: E402

# name, segment lengths, query heads, key/value heads, head dim
SHAPES = [
    ("7B, one 32768-token sample", [32768], 28, 4, 128),
    ("7B, one 8192-token sample", [8192], 28, 4, 128),
    ("0.5B, GSM8K row (32 x 205)", [205] * 32, 14, 2, 64),
]
SMOKE_SHAPES = [("tiny, one sample", [64], 4, 2, 16), ("tiny, 4 samples", [16] * 4, 4, 2, 16)]


def _time(fn, repeats: int) -> float:
    """Median seconds of fn() (forward + backward), CUDA events when on a GPU."""
    times = []
    for i in range(repeats + 2):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            t = start.elapsed_time(end) / 1000
        else:
            import time

            t0 = time.perf_counter()
            fn()
            t = time.perf_counter() - t0
        if i >= 2:  # two warm-ups
            times.append(t)
    return statistics.median(times)


def _failed(shape: str, kernel: str, e: RuntimeError) -> None:
    print(json.dumps({"shape": shape, "kernel": kernel, "ok": False, "error": str(e).split("\n")[0][:160]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for name, segs, hq, hkv, d in (SMOKE_SHAPES if args.smoke else SHAPES):
        total = sum(segs)
        cu = torch.tensor([0] + segs, device=device).cumsum(0).to(torch.int32)
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(total, h, d, device=device, dtype=dtype, generator=g, requires_grad=True)
                   for h in (hq, hkv, hkv))
        grad = torch.randn(total, hq, d, device=device, dtype=dtype, generator=g)
        flops = sum(2 * s * s * d * hq for s in segs) * 3.5
        ref = attn._varlen(q, k, v, cu, max(segs), d ** -0.5)

        def varlen():
            attn._varlen(q, k, v, cu, max(segs), d ** -0.5).backward(grad)

        runs = {"varlen (verlite today)": varlen}
        if len(segs) == 1:
            for bname, backend in backends.items():
                for gqa in (True, False):
                    def sdpa(backend=backend, gqa=gqa):
                        kk, vv = (k, v) if gqa else (k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1))
                        with sdpa_kernel([backend]):
                            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk.transpose(0, 1)[None],
                                                                 vv.transpose(0, 1)[None], is_causal=True,
                                                                 enable_gqa=gqa)
                        return out[0].transpose(0, 1)

                    runs[f"sdpa {bname}" + (" (gqa)" if gqa else " (k/v repeated)")] = (
                        lambda f=sdpa: f().backward(grad), sdpa)

            def as_trained():  # what training calls: cuDNN, then flash, by priority (a fallback is silent)
                saved = attn.SINGLE_SEQUENCE_BACKENDS, attn.SINGLE_SEQUENCE_MIN_TOKENS
                attn.SINGLE_SEQUENCE_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
                attn.SINGLE_SEQUENCE_MIN_TOKENS = 0  # timed at every length, the threshold aside
                try:
                    return attn._varlen(q, k, v, cu, max(segs), d ** -0.5)
                finally:
                    attn.SINGLE_SEQUENCE_BACKENDS, attn.SINGLE_SEQUENCE_MIN_TOKENS = saved

            runs["verlite one-sample path (cudnn, flash by priority)"] = (lambda: as_trained().backward(grad),
                                                                          as_trained)
        for label, fn in runs.items():
            check = None
            if isinstance(fn, tuple):
                fn, fwd = fn
                try:
                    with torch.no_grad():
                        check = (fwd().float() - ref.float()).abs().max().item()
                except RuntimeError as e:
                    _failed(name, label, e)
                    continue
            try:
                s = _time(fn, args.repeats if not args.smoke else 1)
            except RuntimeError as e:
                _failed(name, label, e)
                continue
            q.grad = k.grad = v.grad = None
            print(json.dumps({"shape": name, "kernel": label, "ok": True, "fwd_bwd_ms": round(s * 1000, 3),
                              "tflops": round(flops / s / 1e12, 1), "max_abs_diff_vs_varlen": check}), flush=True)


if __name__ == "__main__":
    main()
