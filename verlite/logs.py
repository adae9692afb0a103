"""Console logging: `INFO: [Trainer] message`, routed through tqdm so a progress bar and
log lines share the terminal. Only rank 0 speaks unless something goes wrong."""

from __future__ import annotations

import logging
import os
import sys

COMPONENTS = {"trainer": "Trainer", "data": "Data", "model": "Model", "engine": "Engine", "config": "Config",
              "checkpoint": "Checkpoint", "inference": "Inference", "quickstart": "Quickstart", "plan": "Plan"}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        part = record.name.split(".")[1] if "." in record.name else record.name
        return f"{record.levelname}: [{COMPONENTS.get(part, part.title())}] {record.getMessage()}"


class _TqdmHandler(logging.StreamHandler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never take the run down
            self.handleError(record)


def setup_logging(level: str = "INFO") -> None:
    level = level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        level = "INFO"
    root = logging.getLogger("verlite")
    root.handlers.clear()
    handler = _TqdmHandler(sys.stdout)
    handler.setFormatter(_Formatter())
    root.addHandler(handler)
    rank = int(os.environ.get("RANK", "0"))
    # Other ranks only report problems, so a torchrun log reads like a single process.
    root.setLevel(level if rank == 0 else "WARNING")
    root.propagate = False
    for noisy in ("transformers", "torch.distributed"):
        logging.getLogger(noisy).setLevel("ERROR" if level != "DEBUG" else "INFO")
    if level == "DEBUG":
        return
    # transformers' per-shard bars would interleave with ours. Importing transformers here
    # would cost every command (and every bad-config error) a second, so when it is not
    # loaded yet the switches go where it and huggingface_hub read them at import.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    else:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its own level, set when it configures itself
