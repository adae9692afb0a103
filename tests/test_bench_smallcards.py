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
    # full1.5b_12g also runs its CPU-possible variant (the plain step beside the fused one)
    assert [r["case"] for r in rows] == ["full1.5b_12g", *CASES.split(",")]
    for r in rows:
        assert r["ok"], r
        assert r["tokens_per_s"] > 0 and r["predicted_gib"] > 0 and r["last_loss"] == r["last_loss"]
        assert 0 < r["predicted_run_gib"] <= r["predicted_gib"] and r["largest_micro_batch"] > 0
    by_case = {r["case"]: r for r in rows if r["setting"] is None}  # the cases themselves, not their variants
    assert by_case["full1.5b_12g"]["master_dtype"].startswith("bf16 master (stochastic rounding), 8-bit AdamW")
    assert by_case["qlora7b_12g"]["master_dtype"].startswith("NF4 base")
    assert "qlora7b_longest_24g" in result.stdout.splitlines()[-1]  # the table


@pytest.mark.slow  # a bench smoke run
def test_trace_and_variants_in_smoke_form(tmp_path):
    """--trace writes a chrome trace per verlite run; a case's variants run beside it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--smoke", "--models", str(tmp_path),
                             "--cases", "full1.5b_12g", "--trace", str(tmp_path / "traces")],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["setting"] for r in rows] == [None, "optim.fused_backward=false optim.optimizer=AdamW optim.optimizer_impl=torch.optim "
                                                "model.fsdp_config.optimizer_offload=true"], rows
    assert all(r["ok"] for r in rows), rows
    assert rows[1]["fused_backward"] is False
    for r in rows:
        trace = json.loads(Path(r["trace"]).read_text())
        assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["full1.5b_12g.json", "full1.5b_12g_v2.json"]


@pytest.mark.slow  # a bench smoke run
def test_nf4_overhead_script_in_smoke_form():
    """bench/nf4_overhead.py (host time per layer call, NF4 vs bf16 base) runs its four settings."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "nf4_overhead.py"), "--smoke", "--layers", "2"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [(r["nf4"], r["compiled"]) for r in rows] == [(False, False), (False, True), (True, False), (True, True)]
    assert all(r["host_ms_per_layer"] > 0 for r in rows)


# The default run keeps the one with an out-of-memory row; the others (~10 s each) are `slow`.
@pytest.mark.parametrize("results, steps, runs, ooms", [
    pytest.param("2026-11-25b-h100-smallcards.jsonl", "2,4", 3, 0, marks=pytest.mark.slow),
    ("2026-12-01-h200-smallcards.jsonl", "2,4", 2, 1),
    pytest.param("2026-12-02b-h200-qlora12g.jsonl", "2,4", 1, 0, marks=pytest.mark.slow),
    pytest.param("2026-12-02-h200-long32k.jsonl", "1,3", 2, 0, marks=pytest.mark.slow)])
def test_the_plan_holds_the_peaks_measured_on_the_gpu(tmp_path, results, steps, runs, ooms):
    """bench/plan_check.py re-plans GPU rows (the code the planner describes now) at the
    micro-batch sizes they ran: every plan within +25 % / -0 % of the measured peak (issue
    10's bound), and a run that ran out of memory is now refused. A planner change that
    under-predicts fails here."""
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "plan_check.py"),
                             str(ROOT / "bench" / "results" / results),
                             "--warmup", steps.split(",")[0], "--steps", steps.split(",")[1], "--models", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = [float(line.split()[-1].rstrip("%")) for line in result.stdout.splitlines()
              if line.rstrip().endswith("%") and not line.startswith(("case", "range"))]
    assert len(errors) >= runs, result.stdout  # rows of bitsandbytes runs are skipped where it is not installed
    assert all(0 <= e <= 25 for e in errors), result.stdout
    assert "STILL PLANNED TO FIT" not in result.stdout, result.stdout
    assert result.stdout.count("refused now") == ooms, result.stdout
