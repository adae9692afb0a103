"""`verlite plot RUN_DIR`: training curves (loss, validation loss, lr, tokens/s) as one PNG,
from the metrics.jsonl a run writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from verlite.errors import VerliteError

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise VerliteError(f"{path} does not exist; pass the trainer.default_local_dir of a run")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
    return rows


def plot_run(run_dir: str, output: Optional[str] = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run_dir).expanduser()
    rows = read_metrics(run)
    series = {key: [(r["step"], r[key]) for r in rows if r.get(key) is not None]
              for key in ("train/loss", "val/loss", "lr", "tokens/s")}
    if not series["train/loss"]:
        raise VerliteError(f"{run / METRICS_FILE} has no train/loss entries yet")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key, ax in (("train/loss", axes[0]), ("val/loss", axes[0]), ("lr", axes[1]), ("tokens/s", axes[2])):
        if series[key]:
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if key == "val/loss" else None, label=key)
    for ax, title in zip(axes, ("loss", "learning rate", "tokens/s")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(str(run))
    fig.tight_layout()
    out = Path(output) if output else run / "training_curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
