"""The GPU probes' offline halves: bench/trace_summary.py (a chrome trace to a page of text)
and bench/memory_peak.py (the allocator history replayed to its peak), on made-up inputs whose
answers are known."""

import json
import subprocess
import sys

import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def test_trace_summary_counts_busy_time_kernels_copies_and_gaps(tmp_path):
    events = [{"ph": "X", "cat": "kernel", "name": "gemm", "ts": 0, "dur": 100},
              {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 50, "dur": 100},  # overlaps the first
              {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 400, "dur": 100, "args": {"bytes": 2**30}},
              {"ph": "X", "cat": "cpu_op", "name": "Optimizer.step", "ts": 140, "dur": 300},
              {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 1, "dur": 5}]
    trace = tmp_path / "t.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "trace_summary.py"), str(trace)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    # span 0..500 µs, busy 150 (kernels, overlap counted once) + 100 (copy), one 250 µs gap
    assert "GPU span 0.5 ms, busy 0.2 ms (50.0%), idle 0.2 ms in 1 gaps" in text, text
    assert "n=     2" in text and "gemm" in text
    assert "Memcpy HtoD: 1.00 GiB at 10000.0 GiB/s" in text
    assert "host: Optimizer.step > Optimizer.step" in text  # what the host ran during the gap


def test_memory_peak_replays_the_history_to_its_peak(monkeypatch):
    import memory_peak

    mib = 2**20
    events = [{"action": "alloc", "addr": 1, "size": 100 * mib},
              {"action": "free_requested", "addr": 99, "size": 50 * mib},  # allocated before recording
              {"action": "alloc", "addr": 2, "size": 200 * mib},
              {"action": "alloc", "addr": 3, "size": 200 * mib},  # the peak: 1000 + 100 - 50 + 400
              {"action": "free_requested", "addr": 2, "size": 200 * mib},
              {"action": "alloc", "addr": 4, "size": 10 * mib}]
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda: {"device_traces": [events]})
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda **kwargs: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 0)
    lines = memory_peak.summarize(1000 * mib)
    assert lines[0].startswith("allocated when recording began 0.98 GiB; peak 1.42 GiB"), lines[0]
    assert "at event 3 of 6" in lines[0] and "live then: 0.49 GiB" in lines[0]
    assert any("0.391 GiB  n=    2  no model frame, 200.0 MiB blocks" in line for line in lines), lines


def test_page_cache_probe_sees_a_file_just_written_as_resident(tmp_path):
    """bench/page_cache_probe.py asks mincore, reading nothing: a file just written is in the
    page cache whole; an empty one counts nothing."""
    import os

    from page_cache_probe import group, resident

    data = tmp_path / "written.bin"
    data.write_bytes(os.urandom(3 * 4096 + 100))
    assert resident(data) == (3 * 4096 + 100, 3 * 4096 + 100)
    (tmp_path / "empty").write_bytes(b"")
    assert group([data, tmp_path / "empty", tmp_path / "missing"]) == {"files": 3, "mb": 0, "resident_pct": 100.0}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "page_cache_probe.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)[str(tmp_path)]["resident_pct"] == 100.0
