"""verl's own command lines run with `verl` -> `verlite`: the example scripts (examples/verl/),
both trainers with verl's default configs, and the model merger. Data are parquet files in
the layouts of verl's preprocess scripts under $HOME/data, and `Qwen/Qwen2.5-0.5B-Instruct`
is a tiny model in a local hub cache (HF_HUB_OFFLINE), as on a machine that downloaded it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from verl_helpers import fake_hub, verl_env, write_gsm8k, write_multiturn

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "verl"
N_TRAIN = 260  # verl's train_batch_size is 256: one step per epoch


@pytest.fixture(scope="module")
def verl_home(tmp_path_factory, tiny_model):
    home = tmp_path_factory.mktemp("home")
    write_gsm8k(home / "data" / "gsm8k", N_TRAIN, 6)
    write_multiturn(home / "data" / "multiturn", N_TRAIN, 6)
    shutil.copytree(tiny_model, home / "models" / "Qwen" / "Qwen2.5-0.5B-Instruct")
    fake_hub(home / "hub", "Qwen/Qwen2.5-0.5B-Instruct", tiny_model)
    return home


def run(cmd: list[str], home: Path, cwd: Path | None = None, env: dict | None = None):
    full = verl_env(home, home / "hub")
    full["PYTHONPATH"] = str(ROOT) + (":" + full["PYTHONPATH"] if full.get("PYTHONPATH") else "")
    full.update(env or {})
    result = subprocess.run(cmd, cwd=cwd or home, env=full, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-3000:])
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_run_qwen_05_peft_then_model_merger(verl_home, tmp_path):
    out = tmp_path / "peft"
    run(["bash", str(EXAMPLES / "run_qwen_05_peft.sh"), "1", str(out)], verl_home)
    ckpt = out / "global_step_1"
    assert (ckpt / "huggingface" / "adapter_model.safetensors").is_file()
    adapter = json.loads((ckpt / "huggingface" / "adapter_config.json").read_text())
    assert adapter["r"] == 32 and adapter["lora_alpha"] == 16
    assert any("val/loss" in m for m in metrics(out))  # data.val_files was read and evaluated
    merged = tmp_path / "merged"
    run([sys.executable, "-m", "verlite.model_merger", "merge", "--backend", "fsdp", "--local_dir", str(ckpt),
         "--target_dir", str(merged)], verl_home)
    assert (merged / "model.safetensors").is_file() and (merged / "config.json").is_file()
    assert (merged / "lora_adapter" / "adapter_model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(merged)  # a plain HF model folder


@pytest.mark.slow
def test_run_sft_e2e_script_full_finetune_and_merger_test(verl_home, tmp_path):
    ckpts = tmp_path / "ckpts"
    run(["bash", str(EXAMPLES / "run_sft.sh")], verl_home, env={"NUM_GPUS": "1", "ckpts_home": str(ckpts)})
    hf = ckpts / "global_step_1" / "huggingface"
    assert (hf / "model.safetensors").is_file()
    assert (ckpts / "latest_checkpointed_iteration.txt").read_text() == "1"
    merged = tmp_path / "merged"
    run([sys.executable, "-m", "verlite.model_merger", "merge", "--backend", "fsdp", "--local_dir",
         str(ckpts / "global_step_1" / "actor"), "--target_dir", str(merged)], verl_home)
    result = run([sys.executable, "-m", "verlite.model_merger", "test", "--backend", "fsdp", "--local_dir",
                  str(ckpts / "global_step_1"), "--test_hf_dir", str(merged)], verl_home)
    assert "weights match" in result.stdout


@pytest.mark.slow  # ~16 s; the legacy trainer's script and its model merger stay in the default run
def test_engine_trainer_with_verls_default_config(verl_home, tmp_path):
    """`python -m verlite.trainer.sft_trainer model.path=...`: sft_trainer_engine.yaml's defaults
    (train_files ~/data/gsm8k/train.parquet as messages, dynamic batch of 8192 tokens, 4 epochs)."""
    home = tmp_path / "home"
    write_multiturn(home / "data" / "gsm8k", N_TRAIN, 2)
    shutil.copytree(verl_home / "hub", home / "hub")
    result = run([sys.executable, "-m", "verlite.trainer.sft_trainer", "model.path=Qwen/Qwen2.5-0.5B-Instruct",
                  "engine=fsdp", "optim=fsdp"], home)
    run_dir = home / "checkpoints" / "gsm8k-sft" / "test"  # verl's default_local_dir, interpolated
    assert (run_dir / "global_step_4" / "huggingface" / "model.safetensors").is_file()
    assert "8192 tokens per micro-batch" in result.stdout and "Training 4 steps" in result.stdout
    assert "no effect in verlite" in result.stdout + result.stderr


@pytest.mark.slow
def test_legacy_trainer_with_verls_default_config_file(verl_home, tmp_path):
    """verl's sft_trainer.yaml itself, through Hydra's --config-path/--config-name."""
    import yaml

    from verlite.config.verl import LEGACY_DEFAULTS

    (tmp_path / "sft_trainer.yaml").write_text(yaml.safe_dump(LEGACY_DEFAULTS), encoding="utf-8")
    run([sys.executable, "-m", "verlite.trainer.fsdp_sft_trainer", "--config-path", str(tmp_path),
         "--config-name", "sft_trainer", "model.partial_pretrain=Qwen/Qwen2.5-0.5B-Instruct",
         "data.prompt_key=extra_info", "data.response_key=extra_info", "data.prompt_dict_keys=[question]",
         "data.response_dict_keys=[answer]"], verl_home, cwd=tmp_path)
    assert (tmp_path / "checkpoints" / "gsm8k-sft" / "test" / "global_step_4" / "huggingface").is_dir()


@pytest.mark.slow
def test_multiturn_sp2_script_on_two_processes(verl_home, tmp_path):
    out = tmp_path / "mt"
    result = run(["bash", str(EXAMPLES / "run_qwen_05_sp2_multiturn.sh"), "2", str(out)], verl_home)
    assert (out / "global_step_1" / "huggingface" / "model.safetensors").is_file()
    log = result.stdout + result.stderr
    assert log.count("no effect in verlite") == 1 and log.count("data.micro_batch_size is deprecated") == 1


def test_bad_dict_key_from_the_command_line_is_one_line(verl_home, tmp_path, capsys, monkeypatch):
    from verlite import cli

    monkeypatch.setenv("HOME", str(verl_home))
    code = cli.main(["sft", "--dialect=verl", f"model.partial_pretrain={verl_home / 'models/Qwen/Qwen2.5-0.5B-Instruct'}",
                     "data.prompt_key=extra_info", "data.response_key=extra_info", "data.prompt_dict_keys=[problem]",
                     "+data.response_dict_keys=[answer]", f"trainer.default_local_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert "train.parquet row 0: 'extra_info' has no field 'problem' (data.prompt_dict_keys)" in err


@pytest.mark.slow
def test_gpu_check_smoke(tmp_path):
    """bench/verl_check.py, the GPU check of these command lines, in its CPU form."""
    env = dict(verl_env(tmp_path), PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "verl_check.py"), "--smoke", "--work", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=900)
    lines = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert result.returncode == 0 and len(lines) == 5 and all(r["rc"] == 0 for r in lines), result.stdout[-2000:]
