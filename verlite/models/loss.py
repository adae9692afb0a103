"""Cross-entropy over the vocabulary without materialising [tokens x vocab] logits.

Only positions that carry loss reach here (the caller gathers them), and the vocabulary
projection runs chunk by chunk. The gradients of each chunk are computed in the forward
pass while its logits are at hand, so backward is just a scale: peak memory is one chunk
of logits instead of all of them (a Qwen vocabulary makes that 600 MB per 1k tokens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one fp32 logits chunk: 2^26 x 4 B = 256 MiB, large enough to keep the matmul efficient.
CHUNK_ELEMENTS = 1 << 26


def chunk_size_for(vocab: int) -> int:
    return max(64, min(8192, CHUNK_ELEMENTS // vocab))


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulator: summing bf16 partial weight gradients chunk after chunk loses bits.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            logits = (h @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d(loss)/d(logits)
                g = probs.to(hidden.dtype)
                if need_h:
                    grad_h[start:start + chunk] = g @ weight
                if need_w:
                    grad_w += g.t() @ h
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             fused: bool = True) -> torch.Tensor:
    """Sum over rows of CE(hidden @ weight.T, targets), in fp32. hidden: [N, H], targets: [N]."""
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # keeps both in the graph: every rank must backward
    if not fused:
        logits = (hidden @ weight.t()).float()
        return F.cross_entropy(logits, targets, reduction="sum")
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size_for(weight.shape[0]))
