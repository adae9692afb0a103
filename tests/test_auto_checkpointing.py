"""model.enable_gradient_checkpointing=auto (engine/memory.py): off when the configured
micro-batches fit the card, the fewest recomputed layers otherwise, off on a CPU, one log line
saying what and why; after an OOM every layer recomputes (models/checkpointing.py) and the
gradients are those of the plain model."""

import logging
from pathlib import Path

import pytest
import torch

from conftest import shape_config

from verlite.config import load_config
from verlite.engine.memory import estimate, model_shape, resolve_checkpointing

CUDA = torch.device("cuda")  # only planned for: nothing is allocated on it


@pytest.fixture(scope="module")
def qwen05b(tmp_path_factory) -> Path:
    return shape_config(tmp_path_factory.mktemp("shape"), "qwen0.5b", 32768)


def cfg_for(model, *overrides):
    # GSM8K-like: batch 32 of up to 1024 tokens, full fine-tune (the lead's H100 run).
    return load_config(None, [f"model.partial_pretrain={model}", "data.micro_batch_size_per_gpu=32",
                              "data.max_length=1024", *overrides])


def test_default_is_auto_and_verl_keeps_true(qwen05b):
    assert cfg_for(qwen05b).model.enable_gradient_checkpointing == "auto"
    assert load_config(None, [f"model.partial_pretrain={qwen05b}"], dialect="verl").model.enable_gradient_checkpointing is True
    with pytest.raises(Exception, match="enable_gradient_checkpointing.*true, false or auto"):
        cfg_for(qwen05b, "model.enable_gradient_checkpointing=sometimes")


def test_auto_off_when_it_fits_and_logged(qwen05b, caplog):
    cfg = cfg_for(qwen05b, "trainer.gpu_mem_gb=80")
    with caplog.at_level(logging.INFO, logger="verlite.plan"):
        assert resolve_checkpointing(cfg, CUDA) is True
    assert cfg.model.enable_gradient_checkpointing is False and cfg.model.checkpoint_layers is None
    line = [r.getMessage() for r in caplog.records if "gradient checkpointing auto" in r.getMessage()]
    assert len(line) == 1 and "off" in line[0] and "32768-token micro-batches in 80.0 GiB" in line[0], line


@pytest.mark.parametrize("cap", [24, 16, 12])
def test_auto_recomputes_the_fewest_layers_that_fit(qwen05b, cap, caplog):
    cfg = cfg_for(qwen05b, f"trainer.gpu_mem_gb={cap}")
    with caplog.at_level(logging.INFO, logger="verlite.plan"):
        resolve_checkpointing(cfg, CUDA)
    shape = model_shape(cfg)
    m = cfg.model
    layers = (m.checkpoint_layers or shape.layers) if m.enable_gradient_checkpointing else 0
    assert layers > 0  # 32k tokens of a full 0.5B fine-tune do not fit these caps without recompute
    usable = cap * 2**30 * 0.92
    peak = estimate(cfg, shape, 32768, 1, True, layers).total
    assert peak <= usable or layers == shape.layers
    if layers < shape.layers:
        assert estimate(cfg, shape, 32768, 1, True, layers - 1).total > usable  # one fewer would not fit
    assert any(f"{layers} of {shape.layers} layers recomputed" in r.getMessage() or
               ("all" in r.getMessage() and layers == shape.layers) for r in caplog.records)


def test_explicit_settings_are_kept(qwen05b):
    for value, expected in (("true", True), ("false", False)):
        cfg = cfg_for(qwen05b, f"model.enable_gradient_checkpointing={value}", "trainer.gpu_mem_gb=12")
        assert resolve_checkpointing(cfg, CUDA) is False
        assert cfg.model.enable_gradient_checkpointing is expected


def test_auto_is_off_on_cpu(qwen05b, caplog):
    cfg = cfg_for(qwen05b, "trainer.gpu_mem_gb=4")
    with caplog.at_level(logging.INFO, logger="verlite.plan"):
        resolve_checkpointing(cfg, torch.device("cpu"))
    assert cfg.model.enable_gradient_checkpointing is False
    assert any("gradient checkpointing auto: off" in r.getMessage() for r in caplog.records)


def test_after_oom_every_layer_recomputes_with_the_same_gradients(tiny_model):
    from verlite.config.schema import ModelConfig
    from verlite.models.checkpointing import recompute_every_layer
    from verlite.models.load import load_model

    model = load_model(ModelConfig(partial_pretrain=str(tiny_model), enable_gradient_checkpointing="auto"),
                       torch.float32)  # unresolved auto loads without recomputation
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))

    def grads_and_saved():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in model.parameters()], sum(saved)

    plain, saved_plain = grads_and_saved()
    assert recompute_every_layer(model) == model.config.num_hidden_layers
    assert recompute_every_layer(model) == 0  # nothing left to turn on: the caller splits instead
    again, saved_again = grads_and_saved()
    assert saved_again < saved_plain / 2  # the layers' activations are no longer kept
    for a, b in zip(plain, again):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cpu_run_with_the_default_says_off(tmp_path, tiny_model, capfd):
    from conftest import write_jsonl
    from verlite import cli

    rows = [{"question": f"{i} + 1?", "answer": f"{i + 1}"} for i in range(8)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    assert cli.main(["sft", f"data.train_files={data}", f"model.partial_pretrain={tiny_model}", "trainer.device=cpu",
                     f"trainer.default_local_dir={tmp_path / 'run'}", "data.micro_batch_size_per_gpu=4",
                     "trainer.total_training_steps=1", "trainer.save_freq=-1"]) == 0
    out = capfd.readouterr()
    said = [line for line in (out.out + out.err).splitlines() if "gradient checkpointing auto" in line]
    assert len(said) == 1 and ": off" in said[0], said
