"""The memory planner: exact parameter counts, monotone estimates, auto batching, `verlite plan`."""

import pytest
import torch

from conftest import run_cli, write_jsonl
from verlite.config import load_config
from verlite.engine.memory import GIB, choose_batching, estimate, model_shape, resolve_auto_batching
from verlite.errors import VerliteError
from verlite.models.load import load_model


def cfg_for(model, *extra):
    return load_config(None, [f"model.partial_pretrain={model}", *extra])


def test_shape_counts_match_the_real_model(tiny_model):
    cfg = cfg_for(tiny_model, "model.lora_rank=4", "model.target_modules=[q_proj,v_proj]")
    shape = model_shape(cfg)
    real = load_model(cfg.model, torch.float32)
    assert shape.params == sum(p.numel() for n, p in real.named_parameters() if "lora_" not in n)
    assert shape.trainable == sum(p.numel() for p in real.parameters() if p.requires_grad)


def test_estimate_grows_with_tokens_and_checkpointing_saves(tiny_model):
    cfg = cfg_for(tiny_model, "model.lora_rank=0")
    shape = model_shape(cfg)
    small, big = estimate(cfg, shape, 1000, checkpointing=False), estimate(cfg, shape, 4000, checkpointing=False)
    assert big.total > small.total
    ckpt = estimate(cfg, shape, 4000, checkpointing=True)
    half = estimate(cfg, shape, 4000, checkpointing=True, checkpoint_layers=1)
    assert ckpt.parts["activations"] < half.parts["activations"] < big.parts["activations"]
    # Full fine-tuning keeps fp32 weights, gradients and two AdamW moments: 16 bytes a parameter.
    assert sum(big.parts[k] for k in ("weights (fp32 master)", "gradients (fp32)", "AdamW state (fp32)")) == \
        shape.params * 16


def test_choose_batching_prefers_no_recompute_then_fewest_layers(tiny_model):
    cfg = cfg_for(tiny_model, "data.train_batch_size=8", "data.max_length=256")
    shape = model_shape(cfg)
    budget, layers = choose_batching(cfg, shape, capacity_gib=8)
    assert (budget, layers) == (8 * 256, 0)  # plenty of memory: the whole step, nothing recomputed
    tight = (estimate(cfg, shape, 2048, checkpointing=True).total + 1) / GIB / 0.92
    budget, layers = choose_batching(cfg, shape, capacity_gib=tight)
    assert budget == 2048 and 0 < layers <= shape.layers
    with pytest.raises(VerliteError, match="not to fit"):
        choose_batching(cfg, shape, capacity_gib=1e-4)


def test_activation_offload_is_the_last_resort(tiny_model):
    cfg = cfg_for(tiny_model, "data.train_batch_size=1", "data.max_length=65536")
    shape = model_shape(cfg)
    on_gpu = estimate(cfg, shape, 65536, checkpointing=True)
    cfg.model.enable_activation_offload = True
    offloaded = estimate(cfg, shape, 65536, checkpointing=True)
    assert offloaded.parts["activations"] == 0 < on_gpu.parts["activations"]
    cfg.model.enable_activation_offload = False
    between = (offloaded.total + on_gpu.total) / 2 / GIB / 0.92  # fits only with the inputs on the host
    assert choose_batching(cfg, shape, capacity_gib=between) == (65536, shape.layers)
    assert cfg.model.enable_activation_offload
    cfg.model.enable_activation_offload = False
    roomy = (on_gpu.total + 1) / GIB / 0.92
    assert choose_batching(cfg, shape, capacity_gib=roomy)[0] == 65536 and not cfg.model.enable_activation_offload


def test_auto_micro_batch_resolves_on_cpu(tiny_model):
    cfg = cfg_for(tiny_model, "data.micro_batch_size_per_gpu=auto", "data.train_batch_size=4",
                  "data.max_length=128", "trainer.gpu_mem_gb=4")
    resolve_auto_batching(cfg, torch.device("cpu"), world=1)
    assert cfg.data.packing and cfg.data.max_token_len_per_gpu == 4 * 128
    assert isinstance(cfg.data.micro_batch_size_per_gpu, int)
    with pytest.raises(VerliteError, match="set data.train_batch_size"):
        resolve_auto_batching(cfg_for(tiny_model, "data.micro_batch_size_per_gpu=auto"), torch.device("cpu"), 1)


def test_auto_run_trains(tmp_path, tiny_model):
    from verlite.trainer.sft_trainer import run_sft

    rows = [{"question": f"q{i}", "answer": "a " * (i % 7 + 1)} for i in range(16)]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    summary = run_sft(cfg_for(tiny_model, f"data.train_files={data}", "data.micro_batch_size_per_gpu=auto",
                              "data.train_batch_size=8", "data.max_length=64", "trainer.gpu_mem_gb=2",
                              "trainer.device=cpu", f"trainer.default_local_dir={tmp_path / 'ck'}",
                              "trainer.total_training_steps=2", "trainer.save_freq=-1"))
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]  # finite, not NaN


def test_plan_command(tmp_path, tiny_model):
    result = run_cli("plan", f"model.partial_pretrain={tiny_model}", "data.micro_batch_size_per_gpu=2",
                     "--gpu_mem_gb", "24")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "weights (fp32 master)" in out and "AdamW state (fp32)" in out and "total (peak, predicted)" in out
    assert "-> fits" in out and "fastest plan that fits:" in out


@pytest.mark.slow  # ~14 s; test_plan_command runs the command by default
def test_plan_command_with_the_data(tmp_path, tiny_model):
    """Named data: the plan tokenizes it (through the token cache, as `verlite sft` does) and
    says what a run on one GPU would choose for the largest micro-batch the data forms."""
    rows = [{"question": "q" * (5 + i % 7), "answer": "a" * (3 + i % 5)} for i in range(40)]
    data = write_jsonl(tmp_path / "t.jsonl", rows)
    result = run_cli("plan", f"model.partial_pretrain={tiny_model}", "data.micro_batch_size_per_gpu=8",
                     "data.max_length=64", f"data.train_files={data}", "--gpu_mem_gb", "24",
                     env={"VERLITE_CACHE_DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("with data.train_files (40 sample(s), longest "), line
    largest = int(line.split("largest micro-batch holds ")[1].split()[0])
    assert 8 <= largest < 8 * 64 and "0 of 2 layers recomputed" in line, line
    assert (tmp_path / "cache" / "tokens").is_dir()  # tokenized once, for the run to reuse
    missing = run_cli("plan", f"model.partial_pretrain={tiny_model}", "data.micro_batch_size_per_gpu=8",
                      f"data.train_files={tmp_path / 'nowhere.jsonl'}", "--gpu_mem_gb", "24")
    assert missing.returncode == 0 and "planned without the data" in missing.stderr, missing.stderr
    assert "fastest plan that fits:" in missing.stdout
