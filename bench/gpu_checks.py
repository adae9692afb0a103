"""Checks on the GPU machine that CPU tests cannot make: the Triton cross-entropy kernel
against torch, the varlen flash path of packed attention against padded attention in bf16,
the fused loss against the plain one, and Liger's layer kernels (model.use_liger) against transformers' layers.

    python bench/gpu_checks.py MODEL_DIR     # e.g. bench/shapes.py qwen0.5b's output"""

from __future__ import annotations

import sys

import numpy as np
import torch

from verlite.config.schema import ModelConfig
from verlite.data.batching import collate
from verlite.data.dataset import SFTDataset
from verlite.data.formatting import Encoded
from verlite.models import attention
from verlite.models.load import load_model
from verlite.models.sft_model import SFTModel


def random_samples(seed: int, count: int) -> SFTDataset:
    """`count` samples of 100-900 random tokens, the last two thirds of each carrying loss."""
    rng = np.random.default_rng(seed)
    ds = SFTDataset()
    for n in rng.integers(100, 900, count):
        ds.append(Encoded(rng.integers(10, 4000, n).tolist(), [0] * (n // 3) + [1] * (n - n // 3)))
    return ds


def check_attention(hf) -> None:
    """Packed (varlen) attention equals padded rows; the fused loss equals the plain one."""
    print("varlen kernel:", attention._VARLEN is not None, attention._VARLEN_ARGS)
    model = SFTModel(hf).cuda()
    ds = random_samples(0, 8)
    with torch.no_grad():
        padded = model(collate(ds, list(range(8)), False, 0).to("cuda")).item()
        packed = model(collate(ds, list(range(8)), True, 0).to("cuda")).item()
        model.fused_loss = False
        plain = model(collate(ds, list(range(8)), True, 0).to("cuda")).item()
    print(f"padded {padded:.4f} packed {packed:.4f} plain-loss {plain:.4f} rel {abs(packed - padded) / padded:.2e}")
    assert abs(packed - padded) / padded < 1e-2 and abs(plain - packed) / packed < 1e-2


def check_ce_kernel() -> None:
    """The Triton cross-entropy rows against torch in fp32, bf16 logits, random data; a Qwen
    vocabulary and small ones (below and not a multiple of the kernel's 4096-wide block)."""
    from verlite.models.loss import _rows_cross_entropy_

    for vocab in (151936, 512, 5000):
        torch.manual_seed(0)
        logits = (torch.randn(300, vocab, device="cuda") * 3).to(torch.bfloat16)
        targets = torch.randint(0, vocab, (300,), device="cuda")
        ref_logits = logits.float().requires_grad_()
        ref = torch.nn.functional.cross_entropy(ref_logits, targets, reduction="none")
        (grad,) = torch.autograd.grad(ref.sum(), ref_logits)
        work = logits.clone()
        loss = _rows_cross_entropy_(work, targets, need_grad=True)
        loss_err = ((loss - ref).norm() / ref.norm()).item()
        grad_err = ((work.float() - grad).norm() / grad.norm()).item()
        print(f"CE kernel, vocab {vocab}: loss rel err {loss_err:.2e}, grad rel err {grad_err:.2e}")
        assert loss_err < 1e-5 and grad_err < 1e-2, vocab


def check_liger(hf) -> None:
    """model.use_liger: Liger's RoPE, RMSNorm and SwiGLU kernels against transformers' layers, loss and grads."""
    import copy

    from verlite.errors import VerliteError
    from verlite.models.liger import KINDS, use_liger_kernels

    ds = random_samples(1, 4)
    mb = collate(ds, list(range(4)), True, 0).to("cuda")
    results = []
    for liger in (False, True):  # the reference first: Liger's RoPE patch is module-wide
        model = SFTModel(copy.deepcopy(hf)).cuda()
        try:
            if liger and not use_liger_kernels(model.hf, KINDS):
                return
        except VerliteError:
            print("liger-kernel not installed: model.use_liger not checked")
            return
        loss = model(mb)
        loss.backward()
        results.append((loss.item(), model.causal_lm.get_input_embeddings().weight.grad.float().clone()))
    (a, ga), (b, gb) = results
    grad_err = ((ga - gb).norm() / ga.norm()).item()
    print(f"liger loss {b:.4f} transformers' layers {a:.4f} rel {abs(a - b) / a:.2e}; embedding grad rel err {grad_err:.2e}")
    assert abs(a - b) / a < 1e-2 and grad_err < 5e-2


if __name__ == "__main__":
    check_ce_kernel()
    hf = load_model(ModelConfig(partial_pretrain=sys.argv[1], enable_gradient_checkpointing=False), torch.bfloat16)
    check_attention(hf)
    check_liger(hf)
