"""QLoRA (verlite/models/quant.py): an NF4 base under LoRA trains like the full-precision
base, resumes exactly, shards over two processes, exports a standard PEFT adapter of the
original base, and bad settings stop in one line before any model load."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli, write_jsonl
from test_distributed import losses, run
from verlite import cli

ROWS = [{"question": f"计算 {i} + {i + 1} 的结果是多少?", "answer": f"{i} + {i + 1} = {2 * i + 1}。答案是{2 * i + 1}。"}
        for i in range(24)]
QLORA = ["model.lora_rank=4", "model.quantization=nf4", "optim.lr=1e-2"]
# NF4's 16 levels (torchao's table): the widest gap between neighbours is between -1 and -0.696.
NF4_HALF_GAP = (1.0 - 0.6961928009986877) / 2


def sft(tmp: Path, model: Path, steps: int, *extra: str, run_dir: str = "run") -> None:
    """`verlite sft` through the CLI entry point, in this process (no interpreter start-up)."""
    data = write_jsonl(tmp / "train.jsonl", ROWS)
    code = cli.main(["sft", f"data.train_files={data}", f"model.partial_pretrain={model}", "trainer.device=cpu",
                     f"trainer.default_local_dir={tmp / run_dir}", "data.micro_batch_size_per_gpu=2",
                     "data.train_batch_size=4", f"trainer.total_training_steps={steps}", "trainer.log_interval=1",
                     "trainer.seed=1", *extra])
    assert code == 0


def test_nf4_round_trip_within_the_blockwise_bound():
    """Each weight comes back within half the widest NF4 level gap of its 64-weight block's
    absmax, plus the error of that absmax's own 8-bit double quantization."""
    from verlite.models.quant import BLOCK, is_quantized, scaler_block_for, to_nf4

    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    w[3, 7] = 0.5  # an outlier only hurts its own block
    nf4 = to_nf4(w)
    assert is_quantized(nf4) and nf4.shape == w.shape
    back = nf4.get_original_weight()
    err = (back - w).abs().reshape(-1, BLOCK)
    absmax = w.abs().reshape(-1, BLOCK).amax(dim=1, keepdim=True)
    scaler_block = scaler_block_for(w.numel())
    group_max = absmax.reshape(-1, scaler_block).amax(dim=1, keepdim=True)
    scale_err = (group_max / 127).repeat_interleave(scaler_block, dim=0)  # half an int8 step of the scale, x2
    assert (err <= NF4_HALF_GAP * absmax + scale_err + 1e-6).all()
    assert err.mean() < 0.1 * w.abs().mean()  # and typically far inside it
    outlier_block = err.reshape(256, 512)[3, :64]
    assert err.reshape(256, 512)[5].max() < outlier_block.max()
    # Sizes NF4's blocks do not tile are refused (and stay full precision in a model).
    assert to_nf4(torch.randn(3, 50)) is None


def test_qlora_first_step_loss_matches_the_full_precision_base(tmp_path, tiny_model, capsys):
    sft(tmp_path / "fp", tiny_model, 2, "model.lora_rank=4", "optim.lr=1e-2")
    sft(tmp_path / "nf4", tiny_model, 2, *QLORA)
    a, b = losses(tmp_path / "fp" / "run"), losses(tmp_path / "nf4" / "run")
    out = capsys.readouterr()
    assert "NF4 base: 14 linear weights quantized" in out.out + out.err
    assert b[1] == pytest.approx(a[1], rel=2e-2)  # only the base's 4-bit rounding differs
    assert b[1] != a[1]  # and it does differ: the base really is quantized


def test_qlora_resume_continues_the_same_run(tmp_path, tiny_model, capsys):
    sft(tmp_path / "ref", tiny_model, 6, *QLORA, "trainer.save_freq=3", "model.enable_gradient_checkpointing=true")
    # The same run cut after its step-3 checkpoint (what a kill leaves), then started again.
    cut = tmp_path / "cut" / "run"
    cut.mkdir(parents=True)
    shutil.copytree(tmp_path / "ref" / "run" / "global_step_3", cut / "global_step_3")
    (cut / "latest_checkpointed_iteration.txt").write_text("3")
    capsys.readouterr()
    sft(tmp_path / "cut", tiny_model, 6, *QLORA, "trainer.save_freq=3", "model.enable_gradient_checkpointing=true")
    out = capsys.readouterr()
    assert "Resumed from" in out.out + out.err
    name = "global_step_6/huggingface/adapter_model.safetensors"
    assert (tmp_path / "ref" / "run" / name).read_bytes() == (cut / name).read_bytes()
    ref = losses(tmp_path / "ref" / "run")
    assert {s: ref[s] for s in (4, 5, 6)} == losses(cut)


def test_qlora_export_loads_in_peft_on_the_full_precision_base(tmp_path, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from verlite.inference import load_model_and_tokenizer

    sft(tmp_path, tiny_model, 3, *QLORA)
    out = tmp_path / "adapter"
    result = run_cli("export-lora", "--checkpoint", str(tmp_path / "run" / "global_step_3"), "--output", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "adapter_config.json").read_text())
    assert Path(config["base_model_name_or_path"]) == tiny_model  # the original base, not a quantized one
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32),
                                           str(out)).eval()
    ours, tok = load_model_and_tokenizer(str(tmp_path / "run" / "global_step_3"), device="cpu")
    ids = torch.tensor([tok("计算 3 + 4 的结果是多少?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours(ids).logits, rtol=1e-4, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)(ids).logits
    assert not torch.allclose(base, ours(ids).logits, atol=1e-3)  # the adapter changed something


@pytest.mark.slow  # ~25 s on two idle cores, twice that on a busy machine
def test_two_process_qlora_follows_the_one_process_curve(tmp_path, tiny_model):
    """FSDP2 all-gathers the NF4 weights (packed 4-bit data and scales) like any parameter."""
    extra = [*QLORA, "model.target_modules=all-linear", "model.tiled_mlp=true"]  # FSDP2 + tiled MLP too
    run(tmp_path / "one", tiny_model, 1, 4, *extra)
    run(tmp_path / "two", tiny_model, 2, 4, *extra)
    a, b = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)
    assert a[4] < a[1]


@pytest.mark.parametrize("args, fragment", [
    (["model.quantization=nf4"], "model.quantization=nf4 freezes the base model, so it needs LoRA: set model.lora_rank"),
    (["model.quantization=int3", "model.lora_rank=4"], "'model.quantization' is 'int3'; use nf4"),
    (["optim.optimizer=Lion"], "'optim.optimizer' is 'Lion', which torch.optim does not provide"),
    (["optim.optimizer=AdamW8bit"], "which torch.optim does not provide; set optim.optimizer_impl=torchao.optim"),
    (["optim.optimizer_impl=apex.optimizers"], "'optim.optimizer_impl' is 'apex.optimizers'; use one of"),
])
def test_bad_small_card_settings_stop_before_the_model(args, fragment, tiny_model, tmp_path, capsys, no_model_load):
    code = cli.main(["sft", f"data.train_files={write_jsonl(tmp_path / 'd.jsonl', ROWS)}",
                     f"model.partial_pretrain={tiny_model}", "trainer.device=cpu",
                     f"trainer.default_local_dir={tmp_path / 'run'}", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and fragment in err and "\n" not in err, err


def test_missing_packages_are_named(tiny_model, tmp_path, capsys, monkeypatch, no_model_load):
    import importlib.util

    real = importlib.util.find_spec
    hidden = {"bitsandbytes", "torchao"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    base = ["sft", f"data.train_files={write_jsonl(tmp_path / 'd.jsonl', ROWS)}", f"model.partial_pretrain={tiny_model}"]
    assert cli.main([*base, "optim.optimizer_impl=bitsandbytes.optim", "optim.optimizer=PagedAdamW8bit"]) == 2
    assert "bitsandbytes is not installed: pip install bitsandbytes" in capsys.readouterr().err
    assert cli.main([*base, "model.quantization=nf4", "model.lora_rank=8"]) == 2
    assert "model.quantization=nf4 needs torchao: pip install" in capsys.readouterr().err


def test_a_model_nf4_cannot_hold_is_refused_before_its_weights(tmp_path, tokenizer_chat, capsys):
    from verlite.models.tiny import build_qwen2

    odd = build_qwen2(tmp_path / "odd", tokenizer_chat, hidden_size=36, layers=1, heads=2, kv_heads=1,
                      intermediate_size=50)
    (odd / "model.safetensors").write_bytes(b"not weights: the check must come first")
    code = cli.main(["sft", f"data.train_files={write_jsonl(tmp_path / 'd.jsonl', ROWS)}",
                     f"model.partial_pretrain={odd}", "trainer.device=cpu", "model.lora_rank=4",
                     "model.quantization=nf4", f"trainer.default_local_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "has no decoder linear layer NF4 can store" in err and "\n" not in err, err
