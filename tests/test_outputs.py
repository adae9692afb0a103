"""Outputs that cannot be written end in one line and exit 2, and nothing half-written is left
under the final name (exports, merged models, eval predictions, a full disk)."""

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_jsonl
from verlite.cli import main
from verlite.config import load_config
from verlite.engine.distributed import init_distributed, shutdown
from verlite.errors import VerliteError
from verlite.outputs import output_dir, output_file
from verlite.trainer.sft_trainer import Trainer

ROWS = [{"question": f"计算 {i} + {i + 1} 的结果是多少?", "answer": f"答案是{2 * i + 1}。"} for i in range(8)]


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory, tiny_model) -> Path:
    tmp = tmp_path_factory.mktemp("lora_out")
    data = write_jsonl(tmp / "train.jsonl", ROWS)
    cfg = load_config(None, [f"data.train_files={data}", f"model.partial_pretrain={tiny_model}", "trainer.device=cpu",
                             f"trainer.default_local_dir={tmp / 'run'}", "data.micro_batch_size_per_gpu=4",
                             "trainer.total_training_steps=1", "model.lora_rank=4",
                             "model.target_modules=[q_proj,v_proj]", "model.enable_gradient_checkpointing=false"])
    try:
        Trainer(cfg, init_distributed("cpu")).fit()
    finally:
        shutdown()
    return tmp / "run" / "global_step_1"


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("verlite:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def test_merge_lora_into_an_impossible_place(lora_ckpt, capsys):
    assert main(["merge-lora", "--checkpoint", str(lora_ckpt), "--output", "/proc/x"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("verlite: error: cannot write --output /proc/x (")
    assert not Path("/proc/x").exists()


def test_merge_lora_on_a_full_disk_leaves_nothing(lora_ckpt, tmp_path):
    """A file-size limit makes the weights' write fail half-way, as a full disk does."""

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write then fails with EFBIG instead of killing

    out = tmp_path / "merged"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "verlite.cli", "merge-lora", "--checkpoint", str(lora_ckpt),
                           "--output", str(out)], env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=small_disk)
    assert done.returncode == 2, done.stderr[-2000:]
    line = one_error_line(done.stderr)
    assert f"cannot write --output {out} (" in line and "File too large" in line
    assert not out.exists() and leftovers(tmp_path) == []


def test_export_lora_and_eval_outputs_that_cannot_be_written(lora_ckpt, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["export-lora", "--checkpoint", str(lora_ckpt), "--output", str(blocker / "adapter")]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"verlite: error: cannot write --output {blocker}/adapter")
    data = write_jsonl(tmp_path / "eval.jsonl", ROWS[:2])
    assert main(["eval", "--checkpoint", str(lora_ckpt), "--data", str(data), "--max_new_tokens", "2",
                 "--device", "cpu", "--output", str(blocker / "preds.jsonl")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"verlite: error: cannot write eval --output {blocker}/preds.jsonl")
    # The same export into a writable place works, and a second export replaces the first whole.
    for _ in range(2):
        assert main(["export-lora", "--checkpoint", str(lora_ckpt), "--output", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file() and leftovers(tmp_path) == []


def test_a_failed_write_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    with output_dir(out, "--output") as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(VerliteError, match=f"cannot write --output {out} \\(No space left on device\\)"):
        with output_dir(out, "--output") as tmp:
            (tmp / "weights").write_text("half")
            raise OSError(28, "No space left on device")
    assert (out / "weights").read_text() == "old" and leftovers(tmp_path) == []
    preds = tmp_path / "preds.jsonl"
    with pytest.raises(RuntimeError):
        with output_file(preds, "predictions file") as f:
            f.write("partial\n")
            raise RuntimeError("generation failed")
    assert not preds.exists() and leftovers(tmp_path) == []
