"""metrics.jsonl holds one run's steps, once each, and a full disk under it does not end the run."""

import json
import os

from verlite.trainer.metrics import METRICS_FILE, MetricsLogger


def losses(run) -> dict:
    return {r["step"]: r["train/loss"] for r in map(json.loads, (run / METRICS_FILE).read_text().splitlines())
            if "train/loss" in r}


def test_metrics_after_a_resume_hold_one_line_per_step(tmp_path):
    """A run killed after its last checkpoint (step 2) logged steps 3-4, the last one cut short:
    the resumed run starts its file at step 2 and logs 3 and 4 again itself."""
    path = tmp_path / METRICS_FILE
    path.write_text("".join(json.dumps({"step": s, "train/loss": float(s)}) + "\n" for s in (1, 2, 3))
                    + '{"step": 4, "train/lo')
    metrics = MetricsLogger(str(tmp_path), ["console"], total_steps=4, start_step=2, enabled=True)
    for step in (3, 4):
        metrics.write(step, {"train/loss": -float(step)})
    metrics.close()
    assert losses(tmp_path) == {1: 1.0, 2: 2.0, 3: -3.0, 4: -4.0}
    assert [json.loads(x)["step"] for x in (tmp_path / METRICS_FILE).read_text().splitlines()] == [1, 2, 3, 4]


def test_a_full_disk_under_metrics_jsonl_is_one_line_and_training_goes_on(tmp_path, caplog):
    metrics = MetricsLogger(str(tmp_path), ["console"], total_steps=3, start_step=0, enabled=True)
    metrics.write(1, {"train/loss": 1.0})
    full = os.open("/dev/full", os.O_WRONLY)  # every write to it fails with ENOSPC, as a full disk does
    os.dup2(full, metrics.jsonl.fileno())
    os.close(full)
    for step in (2, 3):
        metrics.write(step, {"train/loss": float(step)})
    metrics.close()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "from step 2 on" in errors[0]
    assert losses(tmp_path) == {1: 1.0}
