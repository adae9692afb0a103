"""The model read on a side thread while the data is tokenized.

Why: a cold first launch tokenized GSM8K in forked worker processes (data 1.5 s on the H200
machine, bench/RESULTS.md call X) and then built the model on the host (model loading 2.2 s
there), one after the other, while the main thread did nothing but wait for the workers.
What from_pretrained does depends on the model settings only, not on the memory plan the
data decides (gradient checkpointing `auto`, applied afterwards by models/load.prepare_model),
so it can run beside the workers.

Forks: a child forked while another thread holds a lock (an import's, the CUDA driver's)
inherits it held. So no worker pool is forked while the read runs: the data loader calls
`before_fork` (which waits for a read in progress) before it makes a pool, and `may_run` once
a pool's workers exist or no pool is needed; the read starts at the first `may_run`. The
caller takes the model with `result`, which runs the read in its own thread if nothing
started it. The thread is a daemon: a run that fails meanwhile (bad data) exits without
waiting for it (the CLI leaves through os._exit).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Generic, Optional, TypeVar

T = TypeVar("T")


class EarlyRead(Generic[T]):
    def __init__(self, read: Callable[[], T]):
        self._read = read
        self._thread: Optional[threading.Thread] = None
        self._value: Optional[T] = None
        self._error: Optional[BaseException] = None
        self.seconds = 0.0  # how long the read took
        self.waited = 0.0  # how long `result` waited for it

    # ---- the data loader's side (data/dataset.py) ---------------------------------------
    def may_run(self) -> None:
        """No fork is under way: the read may start (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="verlite-model-read", daemon=True)
            self._thread.start()

    def before_fork(self) -> None:
        """A worker pool is about to be forked: let a read in progress finish first."""
        if self._thread is not None:
            self._thread.join()

    # ---- the trainer's side -------------------------------------------------------------
    def result(self) -> T:
        """The model, read beside the data or (if nothing started it) here; the read's error
        is raised here, in the caller's thread."""
        if self._thread is None:
            self._run()
        else:
            start = time.perf_counter()
            self._thread.join()
            self.waited = time.perf_counter() - start
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._value

    @property
    def beside(self) -> bool:
        """Whether the read ran on the side thread."""
        return self._thread is not None

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            self._value = self._read()
        except BaseException as e:  # noqa: BLE001 - raised in the caller's thread by result()
            self._error = e
        self.seconds = time.perf_counter() - start
