"""Summarise a torch.profiler chrome trace into a page of text.

A 32k-token 7B step's trace is hundreds of MB, too big to bring back from the GPU machine, so the
GPU machine reads it there and prints what decides the step time: how long the GPU was busy
against the traced span, the kernels that took the time, copies between host and device, the
CUDA runtime calls the host waited in, and the longest GPU idle gaps with the host operation that
was running during each.

    python bench/trace_summary.py TRACE.json [--top 25]
"""
from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def union_busy(intervals: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Total covered time of the intervals and the idle gaps between them (both in µs)."""
    busy, gaps, end = 0.0, [], None
    for s, e in sorted(intervals):
        if end is None or s > end:
            if end is not None:
                gaps.append((end, s))
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy, gaps


def short(name: str, width: int = 110) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def table(title: str, rows: dict[str, list[float]], top: int, span: float) -> None:
    print(f"\n{title}")
    for name, durs in sorted(rows.items(), key=lambda kv: -sum(kv[1]))[:top]:
        total = sum(durs)
        print(f"  {total / 1e3:9.1f} ms {100 * total / span:5.1f}%  n={len(durs):6d}  "
              f"avg {total / len(durs):9.1f} µs  {short(name)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace")
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    with open(a.trace) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    if not gpu:
        raise SystemExit(f"{a.trace}: no GPU events (was the CUDA activity profiled?)")
    start = min(e["ts"] for e in gpu)
    span = max(e["ts"] + e["dur"] for e in gpu) - start
    busy, gaps = union_busy([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    print(f"{a.trace}: GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms ({100 * busy / span:.1f}%), "
          f"idle {(span - busy) / 1e3:.1f} ms in {len(gaps)} gaps")

    kernels, copies = defaultdict(list), defaultdict(list)
    copied = defaultdict(float)
    for e in gpu:
        if e["cat"] == "kernel":
            kernels[e["name"]].append(e["dur"])
        else:
            copies[e["name"]].append(e["dur"])
            copied[e["name"]] += (e.get("args") or {}).get("bytes", 0)
    table("kernels (by total time)", kernels, a.top, span)
    table("copies and sets", copies, a.top, span)
    for name, b in sorted(copied.items(), key=lambda kv: -kv[1]):
        t = sum(copies[name])
        if b:
            print(f"  {short(name, 60)}: {b / 2**30:.2f} GiB at {b / 2**30 / (t / 1e6):.1f} GiB/s")
    runtime = defaultdict(list)
    for e in events:
        if e.get("cat") == "cuda_runtime" or e.get("cat") == "cuda_driver":
            runtime[e["name"]].append(e["dur"])
    table("CUDA runtime calls on the host (by total time)", runtime, 12, span)

    # Which host operation ran while the GPU sat idle: the outermost and innermost cpu_op covering
    # each long gap's midpoint.
    ops = sorted((e for e in events if e.get("cat") in ("cpu_op", "user_annotation")), key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops]
    print(f"\nlongest GPU idle gaps")
    for s, e in sorted(gaps, key=lambda g: g[0] - g[1])[:a.top]:
        mid = (s + e) / 2
        i = bisect.bisect_right(starts, mid)
        covering = [o for o in ops[max(0, i - 20000):i] if o["ts"] + o["dur"] >= mid]
        outer = min(covering, key=lambda o: o["ts"])["name"] if covering else "-"
        inner = max(covering, key=lambda o: o["ts"])["name"] if covering else "-"
        print(f"  {(e - s) / 1e3:8.2f} ms at +{(s - start) / 1e3:8.1f} ms  host: {short(outer, 50)} > {short(inner, 60)}")
    gap_hist = defaultdict(float)
    for s, e in gaps:
        d = e - s
        gap_hist["<10µs" if d < 10 else "10-100µs" if d < 100 else "0.1-1ms" if d < 1000 else ">1ms"] += d
    print("idle by gap length: " + ", ".join(f"{k} {v / 1e3:.1f} ms" for k, v in gap_hist.items()))


if __name__ == "__main__":
    main()
