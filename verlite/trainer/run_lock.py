"""One run, one writer: a lock file in the run directory while a run trains there.

Rank 0 takes it before anything is written (metrics, checkpoints); the other ranks learn
the outcome through a broadcast and stop with the same message. The lock is an flock on
`run_dir/.verlite.lock`, so the kernel drops it when its process dies however it dies;
the file's JSON (host, pid, start time) says who holds it. On the same host a file whose
holder is gone is taken over with a warning. A holder on another host (a shared
filesystem, where flock may not reach across machines) is never taken over: the user
removes the file once that run is known to be over. A clean exit, an exception, Ctrl-C or
SIGTERM removes the file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import torch.distributed as dist

from verlite.engine.distributed import DistInfo
from verlite.errors import VerliteError

log = logging.getLogger("verlite.trainer")

LOCK_FILE = ".verlite.lock"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str:
    """The kernel's start tick of `pid` (tells a live holder from a new process reusing its pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(holder: dict) -> bool:
    """Whether the process named in a lock file on this host still runs."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    if holder.get("boot_id") and holder.get("boot_id") != _boot_id():
        return False  # the machine rebooted since
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    recorded = holder.get("proc_start")
    return not recorded or recorded == _process_start(pid)


def describe(holder: dict) -> str:
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started {holder.get('started', '?')}"


class RunLock:
    """Held by this process (rank 0) while `run_dir` trains; `release` is idempotent."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir / LOCK_FILE
        self.fd: Optional[int] = None
        self.created_dir = False

    def acquire(self) -> None:
        """Take the lock or raise VerliteError (one line naming the directory and the holder)."""
        try:
            # Two runs started together both find no directory: the one whose mkdir loses the
            # race goes on to the lock (and its one-line "in use" error), not to a write error.
            try:
                self.run_dir.mkdir(parents=True)
                self.created_dir = True
            except FileExistsError:
                if not self.run_dir.is_dir():
                    raise
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                        self._claim(fd)  # a filesystem without locks: the holder file alone decides
                        return
                    os.close(fd)
                    if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                        raise VerliteError(self._busy_message(self._read_holder(), live=True)) from None
                    raise
                # The holder may have removed the file between our open and our flock: then
                # we locked an orphan inode; try again on the file that is there now.
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                self._claim(fd)
        except OSError as e:
            raise VerliteError(f"trainer.default_local_dir {self.run_dir} cannot be written ({e.strerror or e}); "
                               "pick a writable directory") from None

    def _claim(self, fd: int) -> None:
        previous = self._read()
        me = socket.gethostname()
        if previous:
            if previous.get("host") != me:
                os.close(fd)
                raise VerliteError(self._busy_message(previous, live=False))
            if previous.get("pid") != os.getpid() and _alive(previous):
                # flock said free but the holder lives: a filesystem without working flock.
                os.close(fd)
                raise VerliteError(self._busy_message(previous, live=True))
            log.warning("taking over the lock of a run that is gone (%s) in %s", describe(previous), self.run_dir)
        pid = os.getpid()
        info = {"host": me, "pid": pid, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                "boot_id": _boot_id(), "proc_start": _process_start(pid)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def _read_holder(self, wait_s: float = 1.0) -> dict:
        """The holder's record; a holder that has just taken the lock writes it a moment later."""
        deadline = time.monotonic() + wait_s
        holder = self._read()
        while not holder and time.monotonic() < deadline:
            time.sleep(0.02)
            holder = self._read()
        return holder

    def _read(self) -> dict:
        try:
            text = self.path.read_text(encoding="utf-8").strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {}  # a holder killed between create and write: nothing to honour

    def _busy_message(self, holder: dict, live: bool) -> str:
        who = describe(holder) if holder else "another process"
        if live:
            return (f"{self.run_dir} is in use by another verlite run ({who}); wait for it to finish, stop it, "
                    "or set another trainer.default_local_dir")
        return (f"{self.run_dir} is locked by a run on another machine ({who}); if that run is over, delete "
                f"{self.path} and run again, or set another trainer.default_local_dir")

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # unlink before unlocking: no one can lock the old file after us
        os.close(self.fd)
        self.fd = None
        if self.created_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # a run that failed before writing anything leaves no empty folder


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, dist_info: DistInfo) -> Iterator[None]:
    """Rank 0 takes the lock; every rank either enters together or raises the same error."""
    lock = RunLock(run_dir) if dist_info.is_main else None
    message = ""
    if lock is not None:
        try:
            lock.acquire()
        except VerliteError as e:
            message = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message:
        raise VerliteError(message)
    try:
        with _sigterm_unwinds():
            yield
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM outside the training loop (which saves first, see signals.py) unwinds the stack
    like Ctrl-C, so `finally` blocks release the lock instead of the process dying in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
