"""The CLI as a user runs it: subprocesses on the article's YAML with a tiny local model."""

import json
import re

from conftest import run_cli
from verlite.quickstart import article_samples
from test_config import ARTICLE_YAML

LINE = re.compile(r"Epoch (\d+)/(\d+) \| Step (\d+)/(\d+) \| train/loss=(\d+\.\d{3}) \| lr=\d\.\de[-+]\d\d \| "
                  r"grad_norm=\d+\.\d\d \| tokens/s=\d+$")


def test_article_yaml_end_to_end(tmp_path, tiny_model, article_data):
    """The article's config verbatim; only the model path is local (no hub here) and the tiny
    random model gets a learning rate it can learn with."""
    (tmp_path / "sft_single.yaml").write_text(ARTICLE_YAML, encoding="utf-8")
    result = run_cli("sft", "--config_path", "./sft_single.yaml", f"model.partial_pretrain={tiny_model}",
                     "optim.lr=1e-2", "--log_level", "INFO", cwd=tmp_path, env={"HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    lines = [m for m in (LINE.search(line) for line in out.splitlines()) if m]
    steps = [int(m.group(3)) for m in lines]
    assert steps == [1, 10, 20, 30, 40, 50] and {m.group(4) for m in lines} == {"50"}
    assert {m.group(2) for m in lines} == {"1"} and {m.group(1) for m in lines} == {"0"}
    losses = [float(m.group(5)) for m in lines]
    assert losses[-1] < losses[0] - 0.15 and losses[-1] == min(losses), losses
    for step in (10, 20, 30, 40, 50):
        assert f"Checkpoint saved to checkpoints/global_step_{step}" in out
        hf = tmp_path / "checkpoints" / f"global_step_{step}" / "huggingface"
        assert (hf / "adapter_model.safetensors").is_file() and (hf / "adapter_config.json").is_file()
        assert (hf / "tokenizer.json").is_file()
    assert (tmp_path / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "50"
    assert "Done: 50 steps" in out
    metrics = (tmp_path / "checkpoints" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 6


def test_module_entry_point_with_article_flags(tmp_path, tiny_model, article_data):
    (tmp_path / "sft_single.yaml").write_text(ARTICLE_YAML, encoding="utf-8")
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "verlite.trainer.fsdp_sft_trainer", "--config_path", "./sft_single.yaml",
         "--disable_ddp", "--use_fsdp2", f"model.partial_pretrain={tiny_model}", "trainer.total_training_steps=2",
         "model.lora_rank=0", "--log_level", "INFO"],
        cwd=tmp_path, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "VERL_SINGLE_GPU_MODE": "1",
                           "CUDA_VISIBLE_DEVICES": "0"},
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Step 2/2" in result.stdout
    hf = tmp_path / "checkpoints" / "global_step_2" / "huggingface"
    assert (hf / "model.safetensors").is_file() and (hf / "config.json").is_file()


def test_user_errors_are_one_line(tmp_path, tiny_model, article_data):
    (tmp_path / "sft_single.yaml").write_text(ARTICLE_YAML, encoding="utf-8")
    result = run_cli("sft", "--config_path", "./sft_single.yaml", "data.max_lenght=5", cwd=tmp_path,
                     env={"HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip() == ("verlite: error: ./sft_single.yaml: unknown config key 'data.max_lenght'; "
                                     "did you mean 'data.max_length'?")
    assert "Traceback" not in result.stderr


def test_version():
    import verlite

    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"verlite {verlite.__version__}"


def test_quickstart_runs_the_whole_flow(tmp_path):
    result = run_cli("quickstart", "--model", "tiny", "--output_dir", str(tmp_path / "qs"), "--device", "cpu",
                     "--epochs", "2", "--held_out", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "qs" / "data" / "sft-test" / "train.json").is_file()
    held_out = json.loads((tmp_path / "qs" / "data" / "sft-test" / "heldout.json").read_text(encoding="utf-8"))
    assert len(held_out) == 4 and not {s["question"] for s in held_out} & {s["question"] for s in article_samples()}
    assert f"输入: {held_out[0]['question']}" in result.stdout
    assert "输出 (base):" in result.stdout and "输出 (fine-tuned):" in result.stdout
    assert re.search(r"^base +\d\.\d{4} +\d/4 ", result.stdout, re.M), result.stdout
    assert re.search(r"^fine-tuned +\d\.\d{4} +\d/4 ", result.stdout, re.M), result.stdout
    assert (tmp_path / "qs" / "checkpoints" / "global_step_100" / "huggingface" / "adapter_model.safetensors").is_file()
