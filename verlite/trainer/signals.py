"""Ctrl-C / SIGTERM during training: finish the step, save, say how to resume, exit non-zero.
A second signal exits at once."""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("verlite.trainer")


class TrainingInterrupted(Exception):
    """Raised after the stop checkpoint is written; the CLI exits with `exit_code`."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # second signal: the user means it
        self.signum = signum
        log.warning("%s received: finishing this step and saving a checkpoint (signal again to exit at once)",
                    signal.Signals(signum).name)
