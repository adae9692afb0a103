import numpy as np
import pytest
import torch

from verlite.config.schema import ModelConfig
from verlite.data.batching import collate
from verlite.data.dataset import SFTDataset
from verlite.data.formatting import Encoded
from verlite.errors import VerliteError
from verlite.models import loss as loss_mod
from verlite.models.load import load_hf_config, load_model
from verlite.models.sft_model import SFTModel


def test_chunked_cross_entropy_matches_plain(monkeypatch):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", 97 * 64)  # force several chunks
    torch.manual_seed(0)
    h = torch.randn(300, 32, requires_grad=True)
    w = torch.randn(97, 32, requires_grad=True)
    t = torch.randint(0, 97, (300,))
    fused = loss_mod.linear_cross_entropy_sum(h, w, t, fused=True)
    g_fused = torch.autograd.grad(fused * 0.37, (h, w))
    plain = loss_mod.linear_cross_entropy_sum(h, w, t, fused=False)
    g_plain = torch.autograd.grad(plain * 0.37, (h, w))
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for a, b in zip(g_fused, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_chunked_cross_entropy_frozen_weight():
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(20, 8)  # a LoRA run's frozen LM head
    t = torch.randint(0, 20, (10,))
    (g,) = torch.autograd.grad(loss_mod.linear_cross_entropy_sum(h, w, t), (h,))
    (ref,) = torch.autograd.grad(torch.nn.functional.cross_entropy(h @ w.t(), t, reduction="sum"), (h,))
    torch.testing.assert_close(g, ref)


def _dataset(lengths, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ds = SFTDataset()
    for n in lengths:
        ds.append(Encoded(rng.integers(3, vocab, n).tolist(), [0] * (n // 3) + [1] * (n - n // 3)))
    return ds


def test_packed_loss_equals_padded_loss(tiny_model):
    model = SFTModel(load_model(ModelConfig(partial_pretrain=str(tiny_model), enable_gradient_checkpointing=False),
                                torch.float32))
    ds = _dataset([7, 19, 12, 3], vocab=200)
    padded = model(collate(ds, [0, 1, 2, 3], packed=False, pad_id=0))
    packed = model(collate(ds, [0, 1, 2, 3], packed=True, pad_id=0))
    one_by_one = sum(model(collate(ds, [i], packed=False, pad_id=0)) for i in range(4))
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed, one_by_one, rtol=1e-5, atol=1e-5)
    g_pad = torch.autograd.grad(padded, [p for p in model.parameters()][:3])
    g_pack = torch.autograd.grad(model(collate(ds, [0, 1, 2, 3], packed=True, pad_id=0)),
                                 [p for p in model.parameters()][:3])
    for a, b in zip(g_pad, g_pack):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_loss_equals_transformers_own_loss(tiny_model):
    hf = load_model(ModelConfig(partial_pretrain=str(tiny_model), enable_gradient_checkpointing=False), torch.float32)
    ds = _dataset([9, 14], vocab=200)
    mb = collate(ds, [0, 1], packed=False, pad_id=0)
    ours = SFTModel(hf)(mb) / mb.num_loss_tokens
    # transformers shifts labels itself: give it unshifted labels with the same mask.
    labels = torch.full_like(mb.input_ids, -100)
    labels[:, 1:] = mb.labels[:, :-1]
    ref = hf(input_ids=mb.input_ids, attention_mask=mb.attention_mask, labels=labels).loss
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_lora_vs_full_parameter_counts(tiny_model):
    full = load_model(ModelConfig(partial_pretrain=str(tiny_model)), torch.float32)
    n_full = sum(p.numel() for p in full.parameters() if p.requires_grad)
    assert n_full == sum(p.numel() for p in full.parameters())
    lora = load_model(ModelConfig(partial_pretrain=str(tiny_model), lora_rank=8, target_modules=["q_proj", "v_proj"]),
                      torch.float32)
    cfg = full.config
    head = cfg.hidden_size // cfg.num_attention_heads
    q_out, v_out = cfg.num_attention_heads * head, cfg.num_key_value_heads * head
    expected = cfg.num_hidden_layers * 8 * ((cfg.hidden_size + q_out) + (cfg.hidden_size + v_out))
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == expected
    all_linear = load_model(ModelConfig(partial_pretrain=str(tiny_model), lora_rank=4), torch.float32)
    names = {n.split(".")[-4] for n, p in all_linear.named_parameters() if p.requires_grad}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_model_config_overrides(tiny_model):
    cfg = ModelConfig(partial_pretrain=str(tiny_model), config_overrides={"rope_theta": 1e7})
    hf_config = load_hf_config(cfg)
    rope = getattr(hf_config, "rope_theta", None) or hf_config.rope_parameters["rope_theta"]
    assert rope == 1e7
    with pytest.raises(VerliteError, match="unknown config key 'model.rope_thetta'.*did you mean 'rope_theta'"):
        load_hf_config(ModelConfig(partial_pretrain=str(tiny_model), config_overrides={"rope_thetta": 1}))


def test_model_errors(tiny_model, tmp_path):
    with pytest.raises(VerliteError, match=r"\['qproj'\] not found in Qwen2ForCausalLM"):
        load_model(ModelConfig(partial_pretrain=str(tiny_model), lora_rank=4, target_modules=["qproj"]), torch.float32)
    with pytest.raises(VerliteError, match="does not exist"):
        load_model(ModelConfig(partial_pretrain=str(tmp_path / "missing")), torch.float32)
