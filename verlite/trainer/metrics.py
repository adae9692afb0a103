"""What a run reports: the console line every log_interval steps, a progress bar on a
terminal, metrics.jsonl in the run directory, TensorBoard / wandb when asked, and the
closing summary. Only rank 0 constructs one of these with `enabled=True`."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from verlite.outputs import output_file

log = logging.getLogger("verlite.trainer")

METRICS_FILE = "metrics.jsonl"


def gpu_mem_gb() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


def format_line(epoch: int, epochs: int, step: int, steps: int, m: dict) -> str:
    parts = [f"Epoch {epoch}/{epochs}", f"Step {step}/{steps}", f"train/loss={m['train/loss']:.3f}",
             f"lr={m['lr']:.1e}", f"grad_norm={m['grad_norm']:.2f}", f"tokens/s={m['tokens/s']:.0f}"]
    if m.get("gpu_mem") is not None:
        parts.append(f"gpu_mem={m['gpu_mem']:.1f}GB")
    if m.get("skipped_steps"):
        parts.append(f"skipped_steps={m['skipped_steps']}")
    return " | ".join(parts)


class MetricsLogger:
    def __init__(self, run_dir: str, backends: list[str], total_steps: int, start_step: int, enabled: bool,
                 project: str = "verlite", experiment: str = "sft", config: Optional[dict] = None):
        self.enabled = enabled
        self.total_steps = total_steps
        self.bar = None
        self.tb = None
        self.wandb = None
        self.jsonl = None
        if not enabled:
            return
        run = Path(run_dir)
        run.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = run / METRICS_FILE
        _truncate_after(self.jsonl_path, start_step)  # a resumed run rewrites the steps after its checkpoint
        self.jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run / "tensorboard"), purge_step=start_step + 1)
        if "wandb" in backends:
            try:
                import wandb

                self.wandb = wandb.init(project=project, name=experiment, config=config, resume="allow")
            except ImportError:
                log.warning("trainer.logger lists wandb but it is not installed (pip install wandb); skipped")
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, leave=False)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if self.bar is not None and "train/loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.3f}")
        if self.jsonl is not None:
            try:
                self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
                self.jsonl.flush()
            except OSError as e:  # a full disk: the run and its checkpoints matter more than the log
                log.error("%s cannot be written (%s): from step %d on, metrics go to the console only",
                          self.jsonl_path, e.strerror or e, step)
                with contextlib.suppress(OSError):
                    self.jsonl.close()
                self.jsonl = None
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.jsonl is not None:
            self.jsonl.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep only lines up to `step`: a run killed after its last checkpoint logged steps that
    the resumed run logs again, and a fresh start (step 0) owns the file alone."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut short by a kill
    if len(keep) == len(lines):
        return
    # Whole or untouched, and on disk before the rename: a kill or power loss now must not
    # lose the lines kept.
    with output_file(path, "the metrics log") as f:
        f.write("".join(k + "\n" for k in keep))
    log.info("%s: dropped %d line(s) after step %d, left by an earlier run that stopped before saving them",
             path, len(lines) - len(keep), step)


class Throughput:
    """Real tokens per second between two log lines (and over the whole run)."""

    def __init__(self):
        self.start = self.mark = time.perf_counter()
        self.tokens = self.tokens_since = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.tokens_since += tokens

    def rate_since_mark(self) -> float:
        now = time.perf_counter()
        rate = self.tokens_since / max(now - self.mark, 1e-9)
        self.mark, self.tokens_since = now, 0
        return rate

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start
