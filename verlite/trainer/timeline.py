"""Where a run's wall time went, from launch to the final checkpoint on disk.

The closing "Done:" line splits the whole time since launch into parts that add up to it:
start-up (Python imports, config, distributed set-up, tokenizer), data, model loading,
compiling (the first steps' time above a steady step: measured, not predicted), training,
checkpoint pauses, validation, the final checkpoint (its copy plus the wait for its write),
and whatever is left (logged as "other": logger set-up, the gaps between phases).

"Launch" is the process's start, read from the kernel, when `verlite sft` runs the trainer
(imports happen before any code of ours can take a time); a trainer built inside a longer
program (tests, the quickstart, bench.py) counts from its own creation instead.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Optional

_launch: Optional[float] = None  # perf_counter() value of the launch, set by the CLI
_launch_epoch: Optional[float] = None  # time.time() of a launch in another process (verlite/warm.py)
_notes: list[tuple[str, float]] = []  # (what just ended, perf_counter()) since the launch, for start-up's split


def process_age() -> Optional[float]:
    """Seconds since this process started (to a clock tick, 10 ms), or None where the
    kernel does not say (not Linux)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: start time, ticks after boot
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def trace(label: str) -> None:
    """With VERLITE_TRACE_EXIT=1, print `label` and the seconds since launch to stderr: where a
    run's last seconds go between its Done line and the process's exit (bench/gsm8k_cli.py)."""
    if os.environ.get("VERLITE_TRACE_EXIT") == "1":
        import sys

        age = process_age()
        print(f"verlite trace: {label} at {age:.2f} s" if age is not None else f"verlite trace: {label}",
              file=sys.stderr, flush=True)


def set_launch_epoch(epoch: float) -> None:
    """The command was launched in another process at `epoch` (time.time()): a warm helper's
    child runs it (verlite/warm.py), and the run counts from that process's start."""
    global _launch_epoch
    _launch_epoch = epoch


def mark_launch() -> None:
    """The run being started counts from this process's start (the `verlite sft` command)."""
    global _launch
    age = process_age() if _launch_epoch is None else max(0.0, time.time() - _launch_epoch)
    _launch = time.perf_counter() - (age if age is not None else 0.0)
    _notes.clear()
    note("python")  # the interpreter's own start and `import verlite.cli`


def note(done: str) -> None:
    """Start-up step `done` ended now (imports, config, device init...): the start-up part
    of the summary is split at these notes."""
    _notes.append((done, time.perf_counter()))


def start_up_split(launch: float, now: float) -> dict[str, float]:
    """Start-up's seconds per noted step since `launch`, the rest after the last note as
    "other"; empty when nothing was noted for this launch (a run inside a longer program)."""
    steps = [(name, t) for name, t in _notes if launch <= t <= now]
    _notes.clear()
    if not steps:
        return {}
    out, previous = {}, launch
    for name, t in steps:
        out[name] = out.get(name, 0.0) + t - previous
        previous = t
    if now - previous > 0.005:
        out["other"] = now - previous
    return {k: round(v, 2) for k, v in out.items()}


def launch_time() -> float:
    """perf_counter() value of the launch: the process start for the first run after
    mark_launch() (the CLI's), now for any other (a second run in the same process)."""
    global _launch
    launch, _launch = _launch, None
    return launch if launch is not None else time.perf_counter()


class Timeline:
    """Seconds per named part of the run, in the order they were first seen."""

    def __init__(self, launch: float):
        self.launch = launch
        self.parts: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.parts[name] = self.parts.get(name, 0.0) + max(0.0, seconds)

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def since_launch(self) -> float:
        return time.perf_counter() - self.launch

    def closed(self) -> tuple[float, dict[str, float]]:
        """(wall seconds since launch, parts with "other" = the rest), rounded to 0.01 s."""
        wall = self.since_launch()
        parts = dict(self.parts)
        parts["other"] = max(0.0, wall - sum(parts.values()))
        return round(wall, 2), {k: round(v, 2) for k, v in parts.items()}
