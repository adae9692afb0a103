"""RMSNorm through torch.rms_norm (models/fused_norm.py): same outputs and gradients as
transformers' own forward, and only for modules whose forward is the standard formula."""

import copy

import pytest
import torch
from torch import nn

from verlite.models.fused_norm import is_standard, use_fused_rms_norm


def _pair(cls, hidden, dtype):
    torch.manual_seed(0)
    ref = cls(hidden, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    fused = copy.deepcopy(ref)
    assert use_fused_rms_norm(fused) == 1
    return ref, fused


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_rms_norm_matches_transformers(dtype, tol):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    for cls in (Qwen2RMSNorm, LlamaRMSNorm):
        ref, fused = _pair(cls, 64, dtype)
        x = (torch.randn(3, 5, 64) * 3).to(dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), fused(xb)
        assert ya.dtype == yb.dtype == dtype
        torch.testing.assert_close(yb, ya, rtol=tol, atol=tol)
        grad = torch.randn_like(ya)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=tol, atol=tol)
        torch.testing.assert_close(fused.weight.grad, ref.weight.grad, rtol=tol, atol=tol * 10)


def test_other_formulas_and_mixed_dtypes_keep_their_own_forward():
    class OnePlusWeightRMSNorm(nn.Module):  # Gemma's kind: weight stored as an offset from 1
        def __init__(self, hidden, eps=1e-6):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(hidden))
            self.variance_epsilon = eps

        def forward(self, hidden_states):
            variance = hidden_states.float().pow(2).mean(-1, keepdim=True)
            return hidden_states * torch.rsqrt(variance + self.variance_epsilon) * (1 + self.weight)

    assert not is_standard(OnePlusWeightRMSNorm)
    assert use_fused_rms_norm(OnePlusWeightRMSNorm(8)) == 0
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    assert is_standard(Qwen2RMSNorm)
    ref, fused = _pair(Qwen2RMSNorm, 16, torch.float32)
    x = torch.randn(2, 16).to(torch.bfloat16)  # bf16 input, fp32 weight: transformers' promotion to fp32
    assert fused(x).dtype == ref(x).dtype == torch.float32
    torch.testing.assert_close(fused(x), ref(x))


def test_whole_model_norms_switched(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    before = model(ids).logits
    assert use_fused_rms_norm(model) == 2 * layers + 1
    torch.testing.assert_close(model(ids).logits, before, rtol=1e-5, atol=1e-5)
