"""Tiled MLP (verlite/models/tiled_mlp.py): the same loss and gradients as the plain MLP,
with and without LoRA and checkpointing, in a real training run too."""

import json

import pytest
import torch

from conftest import write_jsonl
from verlite import cli
from verlite.config.schema import ModelConfig


def loss_and_grads(model_dir, tile: int | None, lora: bool, checkpointing: bool):
    from verlite.models.load import load_model
    from verlite.models.tiled_mlp import apply_tiled_mlp

    torch.manual_seed(0)
    cfg = ModelConfig(partial_pretrain=str(model_dir), lora_rank=4 if lora else 0,
                      enable_gradient_checkpointing=checkpointing)
    model = load_model(cfg, torch.float32)
    if lora:  # B starts at zero: give the adapters something to pass gradients through
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
    if tile:
        apply_tiled_mlp(model, tile)
    model.train()
    ids = torch.randint(0, 300, (2, 37))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora, checkpointing", [(False, False), (True, True), (False, True)])
def test_tiled_mlp_gives_the_same_loss_and_gradients(tiny_model, lora, checkpointing):
    plain_loss, plain = loss_and_grads(tiny_model, None, lora, checkpointing)
    tiled_loss, tiled = loss_and_grads(tiny_model, 16, lora, checkpointing)  # 74 tokens: 5 tiles
    torch.testing.assert_close(tiled_loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert plain.keys() == tiled.keys() and any("mlp" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(tiled[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_run_with_tiled_mlp_follows_the_plain_curve(tmp_path, tiny_model, capsys):
    rows = [{"question": f"计算 {i} + {i + 1} 的结果是多少?", "answer": f"{i} + {i + 1} = {2 * i + 1}。答案是{2 * i + 1}。" * 3}
            for i in range(8)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    curves = []
    for tiled in (False, True):
        run = tmp_path / f"run_{tiled}"
        assert cli.main(["sft", f"data.train_files={data}", f"model.partial_pretrain={tiny_model}",
                         "trainer.device=cpu", f"trainer.default_local_dir={run}", "data.micro_batch_size_per_gpu=4",
                         "data.train_batch_size=4", "trainer.total_training_steps=3", "trainer.log_interval=1",
                         "optim.lr=1e-3", "data.packing=true", f"model.tiled_mlp={tiled}"]) == 0
        rows = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        curves.append({r["step"]: r["train/loss"] for r in rows if "train/loss" in r})
    assert "tiled MLP: 32 tokens per tile" in capsys.readouterr().out
    assert curves[1] == pytest.approx(curves[0], rel=1e-5)


@pytest.mark.slow  # two torchrun launches
def test_full_fine_tune_with_tiled_mlp_on_two_processes_follows_one(tmp_path, tiny_model):
    """Under FSDP2 the tiled function receives the unsharded weights and returns their
    gradients through autograd, so FSDP's reduce-scatter sees them as usual."""
    from test_distributed import losses, run

    extra = ["model.lora_rank=0", "model.tiled_mlp=true"]
    run(tmp_path / "one", tiny_model, 1, 3, *extra)
    run(tmp_path / "two", tiny_model, 2, 3, *extra)
    a, b = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert sorted(a) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
