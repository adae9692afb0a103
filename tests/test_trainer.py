"""In-process training runs on a tiny model: accumulation equivalence, reload equality."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from verlite.config import load_config
from verlite.data.batching import collate
from verlite.engine.distributed import init_distributed, shutdown
from verlite.trainer.sft_trainer import Trainer, run_sft


def rows(n=16):
    return [{"question": f"计算 {i} + {i + 1} 的结果是多少?", "answer": f"{i} + {i + 1} = {2 * i + 1}。答案是{2 * i + 1}。" * (1 + i % 3)}
            for i in range(n)]


def config(tmp_path, model, *extra):
    data = write_jsonl(tmp_path / "train.jsonl", rows())
    return load_config(None, [f"data.train_files={data}", f"model.partial_pretrain={model}", "trainer.device=cpu",
                              f"trainer.default_local_dir={tmp_path / 'ckpt'}", "trainer.save_freq=-1",
                              "trainer.logger=console", "optim.lr=1e-3", "optim.warmup_steps_ratio=0",
                              "optim.clip_grad=100", "model.enable_gradient_checkpointing=false", *extra])


def weights(path):
    return load_file(str(path / "huggingface" / "model.safetensors"))


def test_accumulation_equals_one_big_batch(tmp_path, tiny_model):
    """4 micro-batches of 1 sample == 1 micro-batch of 4 samples: loss normalised over the step's tokens."""
    big = run_sft(config(tmp_path / "a", tiny_model, "data.micro_batch_size_per_gpu=4", "data.train_batch_size=4",
                         "trainer.total_training_steps=2"))
    acc = run_sft(config(tmp_path / "b", tiny_model, "data.micro_batch_size_per_gpu=1", "data.train_batch_size=4",
                         "trainer.total_training_steps=2"))
    assert big["final_loss"] == pytest.approx(acc["final_loss"], rel=1e-5)
    wa, wb = weights(tmp_path / "a" / "ckpt" / "global_step_2"), weights(tmp_path / "b" / "ckpt" / "global_step_2")
    for k in wa:
        # Adam divides by sqrt(v): on an embedding row whose gradient is ~0 (a token that
        # carries no loss), float noise between the two summation orders becomes an update of
        # up to lr (1e-3) on single elements (seen once, 3.8e-5, after the newline after
        # <|im_end|> stopped carrying loss); the loss check above pins the normalisation.
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-4)


def test_loss_is_token_mean_not_mean_of_means(tmp_path, tiny_model):
    cfg = config(tmp_path, tiny_model, "data.micro_batch_size_per_gpu=1", "data.train_batch_size=4",
                 "optim.lr=0", "trainer.total_training_steps=1")
    trainer = Trainer(cfg, init_distributed("cpu"))
    try:
        batches = trainer._micro_batches(0)
        mbs = batches.micro_batches
        with torch.no_grad():
            sums = [trainer.model(mb).item() for mb in mbs]
        counts = [mb.num_loss_tokens for mb in mbs]
        assert len(set(counts)) > 1  # responses of different lengths, so the two means differ
        result = trainer._step(batches)
        assert result.loss.item() == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
        assert result.loss.item() != pytest.approx(sum(s / c for s, c in zip(sums, counts)) / 4, rel=1e-3)
    finally:
        shutdown()


@pytest.mark.parametrize("lora", [False, True])
def test_checkpoint_reloads_with_the_same_logits(tmp_path, tiny_model, lora):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    extra = ["model.lora_rank=4", "model.target_modules=[q_proj,v_proj]", "optim.lr=1e-2"] if lora else []
    cfg = config(tmp_path, tiny_model, "data.micro_batch_size_per_gpu=2", "trainer.total_training_steps=3", *extra)
    trainer = Trainer(cfg, init_distributed("cpu"))
    try:
        summary = trainer.fit()
        mb = collate(trainer.train_ds, [0, 1, 2], packed=False, pad_id=trainer.tokenizer.pad_token_id)
        with torch.no_grad():
            in_memory = trainer.model(mb).item()
    finally:
        shutdown()
    hf_dir = tmp_path / "ckpt" / "global_step_3" / "huggingface"
    assert summary["checkpoint"].endswith("global_step_3")
    if lora:
        assert (hf_dir / "adapter_model.safetensors").is_file()
        assert json.loads((hf_dir / "adapter_config.json").read_text())["r"] == 4
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), hf_dir)
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(hf_dir)
    with torch.no_grad():
        logits = reloaded(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits.float()
    flat = logits.reshape(-1, logits.shape[-1]).index_select(0, mb.loss_index)
    reloaded_loss = torch.nn.functional.cross_entropy(flat, mb.labels.reshape(-1)[mb.loss_index], reduction="sum")
    assert reloaded_loss.item() == pytest.approx(in_memory, rel=1e-5)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        base_logits = base(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits
    assert not torch.allclose(base_logits, logits, atol=1e-4)  # training changed the model


def test_validation_tensorboard_and_pruning(tmp_path, tiny_model):
    val = write_jsonl(tmp_path / "val.jsonl", rows(6))
    cfg = config(tmp_path, tiny_model, "data.micro_batch_size_per_gpu=2", "trainer.total_training_steps=6",
                 f"data.val_files={val}", "trainer.test_freq=3", "trainer.save_freq=2", "trainer.max_ckpt_to_keep=2",
                 "trainer.logger=[console,tensorboard]", "trainer.log_interval=1")
    run_sft(cfg)
    run = tmp_path / "ckpt"
    assert sorted(p.name for p in run.glob("global_step_*")) == ["global_step_4", "global_step_6"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val_steps = [x["step"] for x in lines if "val/loss" in x]
    assert val_steps == [3, 6]
    assert [x["step"] for x in lines if "train/loss" in x] == [1, 2, 3, 4, 5, 6]
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_out_of_memory_halves_micro_batches_and_retries(tmp_path, tiny_model, monkeypatch, caplog):
    from verlite.models.sft_model import SFTModel

    cfg = config(tmp_path, tiny_model, "data.micro_batch_size_per_gpu=4", "data.train_batch_size=4",
                 "trainer.total_training_steps=1")
    trainer = Trainer(cfg, init_distributed("cpu"))
    try:
        batches = trainer._micro_batches(0)
        with torch.no_grad():
            expected = trainer.model(batches.micro_batches[0]).item() / batches.micro_batches[0].num_loss_tokens
        real_forward = SFTModel.forward

        def forward(self, mb):  # a card that holds at most 2 samples at once
            if mb.num_samples > 2:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return real_forward(self, mb)

        monkeypatch.setattr(SFTModel, "forward", forward)
        result = trainer._step(batches)
        assert trainer.oom_splits == 1
        assert result.loss.item() == pytest.approx(expected, rel=1e-5) and result.skipped.item() == 0
        assert [mb.num_samples for mb in trainer._micro_batches(1).micro_batches] == [2, 2]
        assert "micro-batches halved" in caplog.text
    finally:
        shutdown()


@pytest.mark.parametrize("layers, expected", [(None, 2), (1, 1)])
def test_gradient_checkpointing_really_recomputes(tmp_path, tiny_model, layers, expected):
    """from_pretrained leaves eval mode, where HF silently skips checkpointing."""
    extra = ["model.enable_gradient_checkpointing=true", "trainer.total_training_steps=1"]
    if layers is not None:
        extra.append(f"model.checkpoint_layers={layers}")
    trainer = Trainer(config(tmp_path, tiny_model, *extra), init_distributed("cpu"))
    try:
        calls = []
        for layer in trainer.model.decoder_layers():
            real = layer._gradient_checkpointing_func
            layer._gradient_checkpointing_func = lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k)
        trainer._step(trainer._micro_batches(0))
        assert len(calls) == expected
    finally:
        shutdown()


def test_activation_offload_gives_the_same_step(tmp_path, tiny_model):
    """Recomputing from the host copy of each layer's input changes nothing in the maths."""
    results = {}
    for offload in (False, True):
        cfg = config(tmp_path / str(offload), tiny_model, "model.enable_gradient_checkpointing=true",
                     f"model.enable_activation_offload={str(offload).lower()}", "model.lora_rank=0",
                     "trainer.total_training_steps=2")
        trainer = Trainer(cfg, init_distributed("cpu"))
        try:
            wrapped = [getattr(layer._gradient_checkpointing_func, "__qualname__", "checkpoint") for layer in trainer.model.decoder_layers()]
            assert all(("_offloading" in q) == offload for q in wrapped), wrapped
            losses = [trainer._step(trainer._micro_batches(s)).loss.item() for s in range(2)]
            weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
            results[offload] = losses, weights
        finally:
            shutdown()
    assert results[True][0] == results[False][0]
    for name, w in results[False][1].items():
        assert torch.equal(w, results[True][1][name]), name
