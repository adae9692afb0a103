"""Resume checks what it resumes: a changed model or LoRA setting stops in one line naming the
key, safe changes continue and are listed, and a checkpoint is data, never code."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, write_jsonl
from verlite.cli import main
from verlite.errors import VerliteError
from verlite.trainer.checkpoint import load_trainer_state

ROWS = [{"question": f"计算 {i} + {i + 1} 的结果是多少?", "answer": f"{i} + {i + 1} = {2 * i + 1}。答案是{2 * i + 1}。"}
        for i in range(24)]
LORA = ["model.lora_rank=4", "model.target_modules=[q_proj,v_proj]"]


def sft_args(data: Path, model: Path, run: Path, steps: int, *extra: str) -> list[str]:
    return ["sft", f"data.train_files={data}", f"model.partial_pretrain={model}", "trainer.device=cpu",
            f"trainer.default_local_dir={run}", "data.micro_batch_size_per_gpu=2", "data.train_batch_size=4",
            f"trainer.total_training_steps={steps}", "trainer.log_interval=1", "optim.lr=1e-3",
            "model.enable_gradient_checkpointing=false", "trainer.save_freq=2", *extra]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model):
    """A 2-step LoRA run (checkpoint global_step_2), made once for the module by the real CLI."""
    tmp = tmp_path_factory.mktemp("lora_run")
    data = write_jsonl(tmp / "train.jsonl", ROWS)
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "verlite.cli", *sft_args(data, tiny_model, tmp / "run", 2, *LORA)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return data, tmp / "run"


@pytest.fixture(scope="module")
def other_model(tmp_path_factory, tokenizer_chat) -> Path:
    from verlite.models.tiny import build_qwen2

    return build_qwen2(tmp_path_factory.mktemp("other") / "qwen2", tokenizer_chat, hidden_size=32, layers=2,
                       heads=4, kv_heads=2, seed=0)


def listing(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


@pytest.mark.parametrize("change, key", [
    ("model.lora_rank=8", "model.lora_rank: saved 4, now 8"),
    ("model.lora_rank=0", "model.lora_rank: saved 4, now 0"),
    ("model.target_modules=[q_proj,k_proj]", "model.target_modules: saved ['q_proj', 'v_proj'], now ['q_proj', 'k_proj']"),
    ("model.lora_alpha=32", "model.lora_alpha: saved 16, now 32"),
    ("model.quantization=nf4", "model.quantization: saved None, now 'nf4'"),
    ("OTHER_MODEL", "model.partial_pretrain: saved "),
])
def test_incompatible_change_exits_2_naming_the_key(lora_run, tiny_model, other_model, capsys, change, key):
    data, run = lora_run
    before = listing(run)
    args = sft_args(data, tiny_model, run, 4, *LORA)
    args.append(f"model.partial_pretrain={other_model}" if change == "OTHER_MODEL" else change)
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("verlite: error: cannot resume from "), err
    assert key in lines[0]
    assert "trainer.resume_mode=disable" in lines[0] and "trainer.default_local_dir" in lines[0]
    if change == "OTHER_MODEL":
        assert "another architecture: hidden_size 64 vs 32" in lines[0]
    assert listing(run) == before  # nothing written, no lock left


def test_a_moved_model_folder_resumes_and_says_so(lora_run, tiny_model, tmp_path, capsys):
    data, run = lora_run
    moved = shutil.copytree(tiny_model, tmp_path / "moved")
    assert main(sft_args(data, moved, run, 2, *LORA)) == 0  # already at step 2: nothing to train
    out = capsys.readouterr().out
    assert f"model.partial_pretrain {Path(tiny_model).resolve()} -> {moved} (same config and weight files)" in out


def test_changed_lr_and_data_continue_and_say_so(lora_run, tiny_model, tmp_path):
    run = Path(shutil.copytree(lora_run[1], tmp_path / "run"))
    data = write_jsonl(tmp_path / "more.jsonl", ROWS + ROWS[:8])
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "verlite.cli",
                           *sft_args(data, tiny_model, run, 4, *LORA, "optim.lr=2e-3", "trainer.logger=[console,jsonl]")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    changed = [line for line in done.stdout.splitlines() if "resuming with changed settings" in line]
    assert len(changed) == 1, done.stdout
    assert "optim.lr 0.001 -> 0.002" in changed[0] and "trainer.total_training_steps 2 -> 4" in changed[0]
    assert "trainer.logger 'console' -> ['console', 'jsonl']" in changed[0]
    assert re.search(r"data.train_files changed since the checkpoint \(24 samples, [\d,]+ bytes then; 32 samples, "
                     r"[\d,]+ bytes now\): training continues at step 3 with the new data's order", done.stdout)
    assert f"Resumed from {run / 'global_step_2'} at step 2/4" in done.stdout
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    state = load_trainer_state(run / "global_step_4")
    assert state["settings"]["model.lora_rank"] == 4 and state["settings"]["data.train_files"]["samples"] == 32


class _Payload:
    """Unpickling this would run a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_trainer_state_that_would_run_code_is_refused_without_running_it(lora_run, tiny_model, tmp_path, capsys):
    data, run = lora_run[0], Path(shutil.copytree(lora_run[1], tmp_path / "run"))
    marker = tmp_path / "pwned"
    state_path = run / "global_step_2" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    torch.save({**state, "note": _Payload(marker)}, state_path)
    with pytest.raises(VerliteError, match=r"holds more than data \(it names (posix|os)\.system"):
        load_trainer_state(run / "global_step_2")
    assert main(sft_args(data, tiny_model, run, 4, *LORA)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer_state.pt holds more than data" in err[0] and "refused" in err[0], err
    assert not marker.exists()
    assert not (run / "global_step_4").exists()


def test_verlite_never_unpickles_with_code_allowed():
    """Every torch.load in verlite is weights-only, and nothing else unpickles."""
    hits = []
    for path in (ROOT / "verlite").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(([^)]*)\)|pickle\.loads?\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True",
                             text):
            if m.group(0).startswith("torch.load") and "weights_only=True" in m.group(1):
                continue
            hits.append(f"{path.relative_to(ROOT)}: {m.group(0)}")
    assert not hits


def test_a_checkpoint_from_before_the_settings_record_resumes_with_a_warning(lora_run, tiny_model, tmp_path, capsys):
    data, run = lora_run[0], Path(shutil.copytree(lora_run[1], tmp_path / "run"))
    state_path = run / "global_step_2" / "trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    del state["settings"]
    torch.save(state, state_path)
    assert main(sft_args(data, tiny_model, run, 2, *LORA)) == 0  # already at step 2: nothing to train
    out = capsys.readouterr().out
    assert "records no settings (written by an older verlite)" in out and "Resumed from" in out
