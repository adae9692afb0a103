"""The checkpoint layout lives below every package that reads it: inference and export find
checkpoints without importing the trainer."""

import subprocess
import sys

from verlite.layout import LATEST, STATE, latest_checkpoint, step_dir, step_dirs


def test_inference_and_export_do_not_import_the_trainer():
    code = ("import sys, verlite.inference.loading, verlite.lora; "
            "bad = sorted(m for m in sys.modules if m.startswith('verlite.trainer')); "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_only_complete_step_folders_count(tmp_path):
    for step, complete in ((2, True), (10, True), (11, False)):
        step_dir(tmp_path, step).mkdir()
        if complete:
            (step_dir(tmp_path, step) / STATE).write_bytes(b"x")
    (tmp_path / "global_step_12.tmp").mkdir()
    (tmp_path / LATEST).write_text("10")
    assert [s for s, _ in step_dirs(tmp_path)] == [2, 10]
    assert latest_checkpoint(tmp_path) == tmp_path / "global_step_10"
    assert latest_checkpoint(tmp_path / "missing") is None
