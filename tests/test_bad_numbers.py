"""NaN/inf losses: the step is skipped with weights and optimizer untouched, counted, and a
run that keeps failing stops naming the step and the last good checkpoint."""

import json

import pytest
import torch

from test_trainer import config
from verlite.engine.distributed import init_distributed, shutdown
from verlite.errors import VerliteError
from verlite.models.sft_model import SFTModel
from verlite.trainer.sft_trainer import Trainer, run_sft


def poison(monkeypatch, bad_calls: set[int]):
    """Make the forward pass return NaN on the given call numbers (0-based)."""
    real = SFTModel.forward
    calls = {"n": 0}

    def forward(self, mb):
        out = real(self, mb)
        n = calls["n"]
        calls["n"] += 1
        return out * float("nan") if n in bad_calls else out

    monkeypatch.setattr(SFTModel, "forward", forward)


def snapshot(trainer):
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    moments = {id(p): {k: v.clone() for k, v in trainer.optimizer.state[p].items()} for p in trainer.params
               if p in trainer.optimizer.state}
    return weights, moments


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
def test_nan_step_is_skipped_and_counted(tmp_path, tiny_model, monkeypatch, fused):
    # The GPU's path is fused AdamW told by found_inf to skip; CPU has the same fused kernel.
    monkeypatch.setattr("verlite.engine.optim.use_fused", lambda device, offloaded: fused)
    trainer = Trainer(config(tmp_path, tiny_model, "data.micro_batch_size_per_gpu=4", "trainer.total_training_steps=3"),
                      init_distributed("cpu"))
    try:
        assert bool(trainer.optimizer.defaults.get("fused")) == fused
        trainer._step(trainer._micro_batches(0))
        before = snapshot(trainer)
        poison(monkeypatch, {0})
        result = trainer._step(trainer._micro_batches(1))
        assert result.skipped.item() == 1 and not torch.isfinite(result.loss)
        after = snapshot(trainer)
        for name, w in before[0].items():
            assert torch.equal(w, after[0][name]), name
        for key, state in before[1].items():
            for k, v in state.items():
                assert torch.equal(v, after[1][key][k])
        result = trainer._step(trainer._micro_batches(2))  # the next good step trains again
        assert result.skipped.item() == 0
        assert any(not torch.equal(w, dict(trainer.model.named_parameters())[n]) for n, w in before[0].items())
    finally:
        shutdown()


def test_skipped_steps_are_logged(tmp_path, tiny_model, monkeypatch, caplog):
    poison(monkeypatch, {1})
    summary = run_sft(config(tmp_path, tiny_model, "data.micro_batch_size_per_gpu=4",
                             "trainer.total_training_steps=4", "trainer.log_interval=1"))
    assert summary["skipped_steps"] == 1
    lines = [json.loads(x) for x in (tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()]
    assert [x["skipped_steps"] for x in lines if "train/loss" in x] == [0, 1, 1, 1]
    assert "1 step(s) with a NaN/inf loss or gradient were skipped" in caplog.text
    saved = tmp_path / "ckpt" / "global_step_4" / "huggingface" / "model.safetensors"
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(saved).values())


def test_run_stops_after_max_bad_steps(tmp_path, tiny_model, monkeypatch):
    poison(monkeypatch, set(range(2, 100)))
    with pytest.raises(VerliteError, match=r"step 5: 3 NaN/inf steps in a row \(trainer.max_bad_steps=3\); "
                                           r"last good checkpoint: .*global_step_4"):
        run_sft(config(tmp_path, tiny_model, "data.micro_batch_size_per_gpu=4", "trainer.total_training_steps=10",
                       "trainer.max_bad_steps=3", "trainer.save_freq=2", "trainer.log_interval=1"))
    from safetensors.torch import load_file

    # Steps 3 and 4 were skipped, so the step-4 checkpoint holds exactly the step-2 weights.
    w2, w4 = (load_file(tmp_path / "ckpt" / f"global_step_{s}" / "huggingface" / "model.safetensors") for s in (2, 4))
    assert all(torch.equal(w2[k], w4[k]) for k in w2)
