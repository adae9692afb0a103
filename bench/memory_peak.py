"""What is live on the GPU at a step's peak, from PyTorch's allocator history.

bench.py (`VERLITE_BENCH_MEMSNAP=DIR`) records the allocator's history over one timed step and
calls `summarize`: it replays the alloc/free events to the moment the step's allocated bytes
peaked, then groups the blocks live at that moment by size (the size names the tensor: tokens x
hidden x 2 bytes is a bf16 hidden state; allocation stacks are not recorded, see start()). The memory plan (verlite/engine/memory.py) models a peak as a sum
of parts; this says which parts coexist at the real one. A snapshot of a 7B step is too big
to bring back from the GPU machine, so only this page of text comes back.
"""

from __future__ import annotations

from collections import defaultdict

import torch

OWN = ("verlite/", "transformers/", "peft/", "torchao/", "bitsandbytes/")


def start() -> None:
    # Sizes only (context=None): with Python stacks recorded, a 7B QLoRA step on torch 2.11 failed
    # inside an autograd Function ("returned NULL without setting an exception").
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, context=None)


def _where(frames: list[dict], size: int) -> str:
    """The first frame of our code or a model library (frames run innermost first). Blocks
    the autograd engine allocates in backward have no Python frames: grouped by their size
    (a size names the tensor: tokens x hidden x 2 bytes is a bf16 hidden state)."""
    for f in frames:
        name = f.get("filename", "")
        for own in OWN:
            if own in name:
                return f"{own}{name.split(own, 1)[1]}:{f.get('line')} {f.get('name')}"
    return f"no model frame, {size / 2**20:.1f} MiB blocks" + (f" ({frames[0].get('name')})" if frames else "")


def _chain(frames: list[dict], depth: int = 14) -> list[str]:
    own = [f for f in frames if any(o in f.get("filename", "") for o in OWN)]
    return [f"{f['filename'].rsplit('/', 2)[-2]}/{f['filename'].rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name')}"
            for f in own[:depth]]


def summarize(baseline: int, top: int = 25) -> list[str]:
    """Lines describing the peak of the history recorded since `start()`; `baseline`: the bytes
    allocated when recording began (weights, optimizer state: not in the history)."""
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    events = [e for trace in snap.get("device_traces", []) for e in trace]

    def replay(stop: int | None = None):
        """Allocated bytes after each event (blocks from before the recording that are freed
        during it lower the baseline), the peak's index, and the blocks live at `stop`."""
        live: dict[int, tuple[int, list]] = {}
        cur, peak, peak_at = baseline, baseline, -1
        for i, e in enumerate(events if stop is None else events[:stop + 1]):
            if e["action"] == "alloc":
                live[e["addr"]] = (e["size"], e.get("frames", []))
                cur += e["size"]
            elif e["action"] == "free_requested":
                cur -= live.pop(e["addr"])[0] if e["addr"] in live else e["size"]
            if cur > peak:
                peak, peak_at = cur, i
        return peak, peak_at, live

    peak, peak_at, _ = replay()
    _, _, live = replay(peak_at)
    groups: dict[str, list[int]] = defaultdict(list)
    for size, frames in live.values():
        groups[_where(frames, size)].append(size)
    gib = 2 ** 30
    lines = [f"allocated when recording began {baseline / gib:.2f} GiB; peak {peak / gib:.2f} GiB "
             f"(max_memory_allocated {torch.cuda.max_memory_allocated() / gib:.2f}) at event {peak_at} of {len(events)} ({100 * peak_at / max(1, len(events)):.0f} % into the step); "
             f"allocated during the step and live then: {sum(v[0] for v in live.values()) / gib:.2f} GiB"]
    for where, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]:
        lines.append(f"  {sum(sizes) / gib:7.3f} GiB  n={len(sizes):5d}  {where}")
    if 0 <= peak_at < len(events):
        lines.append("the allocation that reached the peak, from:")
        lines += ["    " + c for c in _chain(events[peak_at].get("frames", []))] or ["    (no model frame: the autograd engine)"]
        lines.append(f"    size {events[peak_at]['size'] / 2**20:.1f} MiB")
    return lines
