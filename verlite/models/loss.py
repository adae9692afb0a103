"""Cross-entropy over the vocabulary without materialising [tokens x vocab] fp32 logits.

Only positions that carry loss reach here (the caller gathers them), and the vocabulary
projection runs chunk by chunk. Each chunk's gradients are computed in the forward pass
while its logits are at hand, so backward is just a scale: peak memory is one chunk of
logits instead of all of them (a Qwen vocabulary makes that 600 MB per 1k tokens in fp32).

On CUDA one Triton kernel per chunk reads the bf16 logits twice (an online logsumexp, then
softmax minus one-hot written in place): three passes over bf16 instead of the ten or so
over fp32 that eager PyTorch needs. Elsewhere (CPU, fp32 tests) the same maths in torch.

Rows may carry a weight (0 or 1): a micro-batch padded to a fixed shape for a CUDA graph
(data/batching.py pad_packed) has loss rows that must add nothing, to the loss or to any
gradient. The kernel multiplies both by the row's weight, so the padding costs no extra pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements of one logits chunk: 2^28 bf16 = 512 MiB; fewer, larger chunks keep the matmuls
# efficient and the per-chunk weight-gradient accumulation rare.
CHUNK_ELEMENTS = 1 << 28

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

if triton is not None:

    @triton.jit
    def _ce_rows_kernel(logits_ptr, stride, targets_ptr, weight_ptr, loss_ptr, V, WRITE_GRAD: tl.constexpr,
                        WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        target = tl.load(targets_ptr + row)
        if WEIGHTED:
            w = tl.load(weight_ptr + row).to(tl.float32)
        else:
            w = 1.0
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for off in range(0, V, BLOCK):  # online logsumexp, lane-wise, merged after the loop
            cols = off + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            # A lane that has seen only masked columns (V < BLOCK) keeps m = -inf: exp(-inf - -inf)
            # would be NaN there, so its running sum is carried unscaled (it is still 0).
            s = s * tl.where(m_new == float("-inf"), 1.0, tl.exp(m - m_new)) + \
                tl.where(x == float("-inf"), 0.0, tl.exp(x - m_new))
            m = m_new
        m_all = tl.max(m, 0)
        lse = m_all + tl.log(tl.sum(s * tl.exp(m - m_all), 0))
        x_t = tl.load(base + target).to(tl.float32)
        tl.store(loss_ptr + row, (lse - x_t) * w)
        if WRITE_GRAD:  # d(loss)/d(logits) = softmax - onehot, over the logits in place
            for off in range(0, V, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
                g = (tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)) * w
                tl.store(base + cols, g.to(logits_ptr.dtype.element_ty), mask=cols < V)


def chunk_size_for(vocab: int) -> int:
    # A multiple of 16 rows: every chunk's slices of targets and row weights then start
    # 16-byte aligned, which Triton specialises pointers on (one kernel variant for all
    # chunks; a CUDA graph captured for a new shape finds it compiled).
    return max(64, min(8192, CHUNK_ELEMENTS // vocab)) // 16 * 16


def _rows_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, need_grad: bool,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row loss of `logits` [n, V] (times the row's `weight`); with need_grad the logits
    become d(loss)/d(logits)."""
    if triton is not None and logits.is_cuda:
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        _ce_rows_kernel[(logits.shape[0],)](logits, logits.stride(0), targets, loss if weight is None else weight,
                                            loss, logits.shape[1], WRITE_GRAD=need_grad, WEIGHTED=weight is not None,
                                            BLOCK=4096, num_warps=8)
        return loss
    work = logits.float()  # the same tensor when already fp32
    lse = torch.logsumexp(work, dim=-1)
    loss = lse - work.gather(1, targets[:, None]).squeeze(1)
    if need_grad:
        work.sub_(lse[:, None]).exp_()
        work[torch.arange(len(targets), device=targets.device), targets] -= 1.0
        if weight is not None:
            work.mul_(weight[:, None].to(work.dtype))
        if work.data_ptr() != logits.data_ptr():
            logits.copy_(work)
    return loss if weight is None else loss * weight


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk, row_weight=None):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulator: summing bf16 partial weight gradients chunk after chunk loses bits.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk):
            h = hidden[start:start + chunk]
            logits = h @ weight.t()
            w = None if row_weight is None else row_weight[start:start + chunk]
            total += _rows_cross_entropy_(logits, targets[start:start + chunk], need_h or need_w, w).sum()
            if need_h:
                grad_h[start:start + chunk] = logits @ weight
            if need_w:
                grad_w += logits.t() @ h
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             fused: bool = True, row_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over rows of CE(hidden @ weight.T, targets) (each times row_weight[row] when
    given), in fp32. hidden: [N, H], targets: [N], row_weight: [N] fp32."""
    if hidden.shape[0] == 0:
        return (hidden.sum() + weight.sum()) * 0.0  # keeps both in the graph: every rank must backward
    if not fused:
        logits = (hidden @ weight.t()).float()
        if row_weight is None:
            return F.cross_entropy(logits, targets, reduction="sum")
        return (F.cross_entropy(logits, targets, reduction="none") * row_weight).sum()
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size_for(weight.shape[0]), row_weight)
