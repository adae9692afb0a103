"""Selective recompute (models/checkpointing.py, model.keep_attention_layers): recomputed
layers that keep attention's output run attention forward once, not twice, with the same
gradients; the planner gives it to long samples as far as the card holds (engine/memory.py);
an OOM takes it back."""


import pytest
import torch

from conftest import shape_config
from torch.utils._python_dispatch import TorchDispatchMode

from verlite.config import load_config
from verlite.config.schema import ModelConfig
from verlite.engine.memory import GIB, estimate, model_shape, resolve_auto_memory


class AttentionCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.forward = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if ("attention" in name or "_attn" in name) and "backward" not in name:
            self.forward += 1
        return func(*args, **(kwargs or {}))


def run(tiny_model, **cfg):
    from verlite.models.load import load_model

    torch.manual_seed(0)
    model = load_model(ModelConfig(partial_pretrain=str(tiny_model), attn_implementation="sdpa", **cfg), torch.float32)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with AttentionCount() as count:
        model(input_ids=ids, labels=ids).loss.backward()
    return model, [p.grad.clone() for p in model.parameters()], count.forward


def test_kept_attention_runs_once_with_the_same_gradients(tiny_model):
    from verlite.models.checkpointing import recompute_every_layer

    layers = 2
    _, plain, plain_count = run(tiny_model, enable_gradient_checkpointing=False)
    _, full, full_count = run(tiny_model, enable_gradient_checkpointing=True)
    model, kept, kept_count = run(tiny_model, enable_gradient_checkpointing=True, keep_attention_layers=1)
    assert plain_count == layers and full_count == 2 * layers  # full recompute reruns attention forward
    assert kept_count == 2 * layers - 1  # the first layer kept its output
    for a, b, c in zip(plain, full, kept):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    assert recompute_every_layer(model) == 1  # an OOM takes the kept outputs back
    model.zero_grad()
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with AttentionCount() as count:
        model(input_ids=ids, labels=ids).loss.backward()
    assert count.forward == 2 * layers


@pytest.fixture(scope="module")
def qwen7b(tmp_path_factory):
    return shape_config(tmp_path_factory.mktemp("shape"), "qwen7b", 131072)


def qlora(model, length, cap, batch):
    return load_config(None, [f"model.partial_pretrain={model}", f"data.train_batch_size={batch}",
                              f"data.max_length={length}", "data.micro_batch_size_per_gpu=auto", "model.lora_rank=8",
                              "model.target_modules=[q_proj,v_proj]", "model.quantization=nf4",
                              f"trainer.gpu_mem_gb={cap}"])


def test_planner_keeps_attention_for_long_samples_within_the_cap(qwen7b):
    cfg = qlora(qwen7b, 32768, 24, 1)
    resolve_auto_memory(cfg, torch.device("cuda"))
    shape = model_shape(cfg)
    keep = cfg.model.keep_attention_layers
    assert 0 < keep <= shape.layers
    layers = cfg.model.checkpoint_layers or shape.layers
    tokens = cfg.data.max_token_len_per_gpu
    usable = 24 * GIB * 0.92
    assert estimate(cfg, shape, tokens, 1, True, layers).total <= usable
    if keep < layers:  # one more would not fit
        assert estimate(cfg, shape, tokens, 1, True, layers, keep_attention=keep + 1).total > usable
    short = qlora(qwen7b, 1024, 12, 8)
    resolve_auto_memory(short, torch.device("cuda"))
    assert short.model.keep_attention_layers is None  # short samples: memory goes to tokens instead
