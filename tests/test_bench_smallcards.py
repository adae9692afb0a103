"""bench/bench.py's small-card cases (issue 10) in their --smoke form: every case's code path
(NF4 base, 8-bit state with bf16 master weights, auto planning, the predicted-peak report)
runs on a CPU with a tiny model. The GPU figures come from the same script without --smoke."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CASES = "full1.5b_12g,qlora7b_12g,qlora7b_long8k_8g,qlora7b_long32k_24g,qlora7b_longest_24g"


@pytest.mark.slow  # five training processes: ~1 min on two idle cores
def test_small_card_cases_run_in_smoke_form(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke", "--models", str(tmp_path),
                             "--cases", CASES], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in rows] == CASES.split(",")
    for r in rows:
        assert r["ok"], r
        assert r["tokens_per_s"] > 0 and r["predicted_gib"] > 0 and r["last_loss"] == r["last_loss"]
    by_case = {r["case"]: r for r in rows}
    assert by_case["full1.5b_12g"]["master_dtype"].startswith("bf16 master (stochastic rounding), 8-bit AdamW")
    assert by_case["qlora7b_12g"]["master_dtype"].startswith("NF4 base")
    assert "qlora7b_longest_24g" in result.stdout.splitlines()[-1]  # the table
