"""verl's trainer keys that shape checkpoints: save_freq=after_each_epoch and
trainer.checkpoint.load_contents (what a resume reads back)."""

import shutil

from conftest import run_cli, write_jsonl
from verlite.layout import step_dirs

ROWS = [{"question": f"计算 {i} + {i + 1} 的结果是多少?", "answer": f"{i} + {i + 1} = {2 * i + 1}。答案是{2 * i + 1}。"}
        for i in range(24)]


def sft(tmp, model, run, *extra):
    data = write_jsonl(tmp / "train.jsonl", ROWS)
    return run_cli("sft", f"data.train_files={data}", f"model.partial_pretrain={model}", "trainer.device=cpu",
                   f"trainer.default_local_dir={run}", "data.micro_batch_size_per_gpu=4", "data.train_batch_size=4",
                   "trainer.total_epochs=2", "optim.lr=1e-3", "model.enable_gradient_checkpointing=false", *extra)


def test_save_after_each_epoch_then_resume_with_model_weights_only(tmp_path, tiny_model):
    # 24 samples, 4 a step: 6 steps an epoch, so checkpoints at steps 6 and 12 only.
    full = sft(tmp_path, tiny_model, tmp_path / "full", "trainer.save_freq=after_each_epoch")
    assert full.returncode == 0, full.stderr[-2000:]
    assert [s for s, _ in step_dirs(tmp_path / "full")] == [6, 12]

    # Resume from step 6 reading back only the weights (verl's load_contents=[model]): the
    # optimizer state starts fresh, so the end differs from the uninterrupted run's.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(tmp_path / "full" / "global_step_6", part / "global_step_6")
    resumed = sft(tmp_path, tiny_model, part, "trainer.save_freq=after_each_epoch",
                  "trainer.checkpoint.load_contents=[model]")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    log = resumed.stdout + resumed.stderr
    assert "at step 6/12" in log and "not loaded, per trainer.checkpoint.load_contents: extra, optimizer" in log
    a = (tmp_path / "full" / "global_step_12" / "huggingface" / "model.safetensors").read_bytes()
    b = (part / "global_step_12" / "huggingface" / "model.safetensors").read_bytes()
    assert a != b


def test_bad_save_freq_word_is_one_line(tmp_path, tiny_model):
    out = sft(tmp_path, tiny_model, tmp_path / "r", "trainer.save_freq=each_epoch")
    assert out.returncode == 2
    assert "trainer.save_freq" in out.stderr and "after_each_epoch" in out.stderr and "Traceback" not in out.stderr
