"""Never lose a run: exact resume after SIGKILL, clean SIGTERM stops, whole-or-nothing saves."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_jsonl
from verlite.errors import VerliteError
from verlite.trainer import checkpoint as ckpt

ROWS = [{"question": f"计算 {i} + {i + 1} 的结果是多少?", "answer": f"{i} + {i + 1} = {2 * i + 1}。答案是{2 * i + 1}。"}
        for i in range(24)]


def sft_args(tmp: Path, model: Path, steps: int, *extra: str) -> list[str]:
    data = write_jsonl(tmp / "train.jsonl", ROWS)
    return ["sft", f"data.train_files={data}", f"model.partial_pretrain={model}", "trainer.device=cpu",
            f"trainer.default_local_dir={tmp / 'run'}", "data.micro_batch_size_per_gpu=2", "data.train_batch_size=4",
            f"trainer.total_training_steps={steps}", "trainer.log_interval=1", "optim.lr=1e-3",
            "model.enable_gradient_checkpointing=false", *extra]


def start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "verlite.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    path = run / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists():
            # Only whole lines: the writer may be half-way through the last one.
            lines = [x for x in path.read_text().split("\n")[:-1] if x.strip()]
            if lines and json.loads(lines[-1]).get("step", 0) >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached")


def losses(run: Path) -> dict:
    return {r["step"]: r["train/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r}


# The full fine-tune's variant is slow-marked: the LoRA one runs the same kill/resume path by default.
@pytest.mark.parametrize("lora", [pytest.param(False, marks=pytest.mark.slow), True])
def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_model, lora):
    steps = 60
    extra = ["trainer.save_freq=7"] + (["model.lora_rank=4", "model.target_modules=[q_proj,v_proj]"] if lora else [])
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    # The run that is never interrupted.
    ref = start(sft_args(tmp_path / "ref", tiny_model, steps, *extra))
    assert ref.wait(timeout=300) == 0, ref.stderr.read()[-2000:]
    # The same run, killed at a random step (mid-epoch: 6 steps make an epoch), then resumed.
    kill_at = random.Random().randint(9, 45)
    victim = start(sft_args(tmp_path / "cut", tiny_model, steps, *extra))
    wait_for_step(tmp_path / "cut" / "run", kill_at, victim)
    # Checkpoints are written in the background (at a lower CPU priority): on a busy CPU the
    # step-7 one may still be in flight at step 9. Kill once one is whole, wherever training is.
    deadline = time.time() + 120
    while not ckpt.step_dirs(tmp_path / "cut" / "run") and time.time() < deadline and victim.poll() is None:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    survivors = ckpt.step_dirs(tmp_path / "cut" / "run")
    assert survivors, "no checkpoint before the kill"
    resumed = start(sft_args(tmp_path / "cut", tiny_model, steps, *extra))
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert f"Resumed from {survivors[-1][1]}" in out
    final = f"global_step_{steps}/huggingface/{weights}"
    a = (tmp_path / "ref" / "run" / final).read_bytes()
    b = (tmp_path / "cut" / "run" / final).read_bytes()
    assert a == b, f"killed at step {kill_at}: weights differ"
    assert losses(tmp_path / "ref" / "run") == losses(tmp_path / "cut" / "run")


def test_sigterm_saves_a_loadable_checkpoint_and_says_how_to_resume(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    proc = start(sft_args(tmp_path, tiny_model, 100000, "trainer.save_freq=-1"))
    wait_for_step(tmp_path / "run", 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    saved = ckpt.latest_checkpoint(tmp_path / "run")
    assert saved is not None and f"checkpoint: {saved}" in err and "Run the same command again to resume" in err
    assert "Traceback" not in err
    AutoModelForCausalLM.from_pretrained(saved / "huggingface")
    step = int(saved.name.split("_")[-1])
    assert (tmp_path / "run" / ckpt.LATEST).read_text() == str(step)


def test_incomplete_checkpoints_are_never_resumed(tmp_path):
    run = tmp_path / "run"
    for name, complete in (("global_step_5", True), ("global_step_9", False), ("global_step_12.tmp", True)):
        (run / name).mkdir(parents=True)
        if complete:
            (run / name / ckpt.STATE).write_bytes(b"x")
    assert ckpt.latest_checkpoint(run) == run / "global_step_5"


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch, caplog):
    from verlite.config import load_config
    from verlite.trainer.sft_trainer import run_sft

    real = ckpt.write_tensor_file

    def disk_full(path, *a, **k):  # every tensor file after the first checkpoint's
        if "global_step_2.tmp" not in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(ckpt, "write_tensor_file", disk_full)
    args = sft_args(tmp_path, tiny_model, 6, "trainer.save_freq=2")[1:]
    with pytest.raises(VerliteError, match="final checkpoint could not be written"):
        run_sft(load_config(None, args))
    run = tmp_path / "run"
    assert [p.name for _, p in ckpt.step_dirs(run)] == ["global_step_2"]
    assert not list(run.glob("*.tmp"))
    assert (run / ckpt.LATEST).read_text() == "2"
    assert "No space left on device; the previous checkpoint" in caplog.text
    assert "global_step_2 is intact" in caplog.text
