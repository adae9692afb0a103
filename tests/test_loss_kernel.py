"""The Triton cross-entropy kernel of the fused loss, run where Triton is installed: on the
GPU when there is one, otherwise through Triton's CPU interpreter (the CPU-only CI install
has no Triton: there the torch path is what runs, and test_models covers it)."""

import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import torch
from verlite.models.loss import _ce_rows_kernel
device = "cuda" if torch.cuda.is_available() else "cpu"
for vocab in (512, 600, 4096, 5000, 9000):  # below, at and off the kernel's 4096-wide block
    torch.manual_seed(0)
    logits = torch.randn(3, vocab, device=device) * 3
    targets = torch.randint(0, vocab, (3,), device=device)
    ref = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    grad = torch.softmax(logits, -1)
    grad[torch.arange(3), targets] -= 1
    work, loss = logits.clone(), torch.empty(3, device=device)
    _ce_rows_kernel[(3,)](work, work.stride(0), targets, loss, loss, vocab, WRITE_GRAD=True, WEIGHTED=False,
                          BLOCK=4096, num_warps=8)
    assert torch.allclose(loss, ref, atol=1e-5), (vocab, loss, ref)
    assert torch.allclose(work, grad, atol=1e-6), vocab
    # Rows weighted 0 (padding for a fixed shape) add no loss and no gradient.
    weight = torch.tensor([1.0, 0.0, 1.0], device=device)
    work, loss = logits.clone(), torch.empty(3, device=device)
    _ce_rows_kernel[(3,)](work, work.stride(0), targets, weight, loss, vocab, WRITE_GRAD=True, WEIGHTED=True,
                          BLOCK=4096, num_warps=8)
    assert torch.allclose(loss, ref * weight, atol=1e-5), (vocab, loss, ref)
    assert torch.allclose(work, grad * weight[:, None], atol=1e-6), vocab
print("ok")
"""


def test_ce_kernel_matches_torch_for_small_and_odd_vocabularies():
    import os

    import torch

    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
