"""Where a run directory keeps its checkpoints: names only, no torch, so the trainer (which
writes them) and inference / serve / export (which read them) share one definition.

    run_dir/
      global_step_N/                     one complete checkpoint
        huggingface/                     model or PEFT adapter + tokenizer
        trainer_state.pt                 optimizer, scheduler, step, RNG, settings (data only; its
                                         tensors named, not stored, when the next file exists)
        trainer_state.safetensors        the optimizer's and RNG's tensors (written since 2026-11-25)
      global_step_N.tmp/                 a checkpoint being written (renamed when complete)
      .discarded-*/                      a folder renamed aside to be deleted in the background
      latest_checkpointed_iteration.txt  N of the newest complete checkpoint (verl's name)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

LATEST = "latest_checkpointed_iteration.txt"
STATE = "trainer_state.pt"
STATE_TENSORS = "trainer_state.safetensors"
HF_DIR = "huggingface"
STEP_PREFIX = "global_step_"
DISCARDED_PREFIX = ".discarded-"
_STEP_DIR = re.compile(rf"^{STEP_PREFIX}(\d+)$")


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"{STEP_PREFIX}{step}"


def step_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (a folder without its state file is not one)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and child.is_dir() and (child / STATE).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    dirs = step_dirs(root)
    return dirs[-1][1] if dirs else None
