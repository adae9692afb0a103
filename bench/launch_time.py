"""Launch -> first step and launch -> exit of short `verlite sft` runs, for one or more
source trees side by side (e.g. main against a branch), launches alternated so that load
from other jobs hits both alike.

    python bench/launch_time.py --gsm8k ../shared/data/gsm8k/train.jsonl --model <folder> \\
        --tree before=/work/main --tree after=. --rounds 6            # CPU (default) or --device cuda

The first round of each tree fills its token cache (and compile cache) and is not counted.
Figures per tree: min and median of the time to the "Step 1/" log line, of the time to
exit, and of the process's CPU time (the steadiest figure on a shared machine).
Run it from a folder outside the trees (`python -m` puts the current folder first).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def launch(tree: str, args: list[str], run: Path, cache: Path) -> tuple[float, float, float]:
    shutil.rmtree(run, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()), VERLITE_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    first = None
    proc = subprocess.Popen([sys.executable, "-m", "verlite.cli", "sft", *args, f"trainer.default_local_dir={run}"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if first is None and re.search(r"\| Step 1/\d+ \|", line):
            first = time.perf_counter() - start
    if proc.wait() != 0:
        raise SystemExit(f"{tree}: verlite sft failed (exit {proc.returncode}); run it by hand to see why")
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return first or float("nan"), wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gsm8k", required=True, help="a .jsonl with question / answer rows")
    p.add_argument("--model", required=True, help="model folder (a tiny one on CPU)")
    p.add_argument("--tree", action="append", required=True, metavar="NAME=PATH", help="a source tree to time")
    p.add_argument("--rounds", type=int, default=6, help="launches per tree, the first not counted")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--micro_batch", type=int, default=4)
    a = p.parse_args()
    trees = dict(t.split("=", 1) for t in a.tree)
    args = [f"data.train_files={a.gsm8k}", f"model.partial_pretrain={a.model}", f"trainer.device={a.device}",
            f"trainer.total_training_steps={a.steps}", f"data.micro_batch_size_per_gpu={a.micro_batch}"]
    if a.device == "cpu":  # torch's spinning OpenMP threads blur timings on a small shared box
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(tempfile.mkdtemp(prefix="launch_time_"))
    times: dict[str, list[tuple[float, float, float]]] = {name: [] for name in trees}
    for round_ in range(a.rounds):
        for name, tree in trees.items():
            t = launch(tree, args, work / f"run_{name}", work / f"cache_{name}")
            if round_:
                times[name].append(t)
    for name, xs in times.items():
        cols = [("launch -> step 1", 0), ("launch -> exit", 1), ("CPU time", 2)]
        print(f"{name}: " + ", ".join(f"{label} min {min(x[i] for x in xs):.2f} / median "
                                      f"{statistics.median(x[i] for x in xs):.2f} s" for label, i in cols) +
              f" ({len(xs)} launches)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
