"""bf16 activations from the embedding on under autocast (models/compute_dtype.py), with
the fused RMSNorm taking the weight's bf16 copy (models/fused_norm.py). Run here under CPU
autocast: the GPU path is the same hooks under CUDA autocast."""

import copy

import pytest
import torch
import transformers

from verlite.models.compute_dtype import stream_in_compute_dtype
from verlite.models.fused_norm import use_fused_rms_norm


def _tiny():
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def _run(model, ids, autocast: bool):
    seen = []
    hooks = [layer.register_forward_hook(lambda m, a, o: seen.append((o[0] if isinstance(o, tuple) else o).dtype))
             for layer in model.model.layers]
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, o: seen.append(o.dtype)))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for h in hooks:
        h.remove()
    return loss.detach(), seen


def test_the_stream_between_layers_is_bf16_under_autocast_and_fp32_outside_it():
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = _tiny()
    model = copy.deepcopy(ref)
    assert use_fused_rms_norm(model) == 5 and stream_in_compute_dtype(model)
    assert not stream_in_compute_dtype(model)  # once only
    ref_loss, ref_seen = _run(ref, ids, autocast=True)
    loss, seen = _run(model, ids, autocast=True)
    assert set(ref_seen) == {torch.float32}  # the stream autocast alone keeps: fp32 from the fp32 embedding
    assert set(seen) == {torch.bfloat16}  # every layer's output and the final norm's
    torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        torch.testing.assert_close(p.grad, q.grad, rtol=0.1, atol=2e-2 * q.grad.abs().max().item() + 1e-4), name
    # Outside autocast (CPU steps, FSDP's steps) nothing changes: same fp32 stream and loss.
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    loss32, seen32 = _run(model, ids, autocast=False)
    ref32, _ = _run(ref, ids, autocast=False)
    assert set(seen32) == {torch.float32}
    torch.testing.assert_close(loss32, ref32, rtol=1e-5, atol=1e-5)


def test_fused_norm_takes_a_bf16_stream_with_fp32_weights_under_autocast():
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    torch.manual_seed(0)
    ref = Qwen2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
    fused = copy.deepcopy(ref)
    use_fused_rms_norm(fused)
    x = (torch.randn(3, 5, 64) * 3).to(torch.bfloat16)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ya, yb = ref(xa), fused(xb)
    assert ya.dtype == torch.float32 and yb.dtype == torch.bfloat16  # HF's promotes; FSDP's bf16 weight does not
    torch.testing.assert_close(yb.float(), ya, rtol=2e-2, atol=2e-2)
    grad = torch.randn(ya.shape)
    ya.backward(grad)
    yb.backward(grad.to(torch.bfloat16))
    assert fused.weight.grad.dtype == torch.float32
    torch.testing.assert_close(xb.grad.float(), xa.grad.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(fused.weight.grad, ref.weight.grad, rtol=3e-2, atol=0.2)
    # Without autocast a dtype mismatch still takes transformers' own formula.
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref(x))


def test_fp32_stream_kept_when_asked(monkeypatch):
    monkeypatch.setenv("VERLITE_FP32_STREAM", "1")
    assert not stream_in_compute_dtype(_tiny())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast")
def test_the_stream_is_bf16_under_cuda_autocast():
    model = _tiny().cuda()
    use_fused_rms_norm(model)
    stream_in_compute_dtype(model)
    ids = torch.randint(0, 100, (2, 16), device="cuda")
    seen = []
    model.model.norm.register_forward_hook(lambda m, a, o: seen.append(o.dtype))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    assert seen == [torch.bfloat16]
