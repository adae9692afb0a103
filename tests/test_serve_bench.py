"""bench/serve_bench.py --smoke: the GPU benchmark's script runs end to end on CPU."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow  # a bench smoke run
def test_serve_bench_smoke(tmp_path):
    out = tmp_path / "rows.jsonl"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_bench.py"), "--smoke", "--workdir",
                             str(tmp_path / "work"), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["server"] for r in rows] == ["verlite generate, one at a time", "verlite serve", "verlite serve + LoRA"]
    for row in rows[1:]:
        assert row["requests"] == 6 and row["mean_tokens"] == 8  # ignore_eos forced every token
        assert 0 < row["ttft_p50_ms"] <= row["p50_ms"] <= row["p99_ms"] and row["tokens_per_s"] > 0
        assert row["cuda_graphs"] == row["prefill_graphs"] == "none"  # CPU: eager; on GPU "captured"
    assert "| tiny | verlite serve | 3 |" in result.stdout
