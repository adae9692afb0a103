"""Warm start: the next `verlite sft` skips Python's imports of torch and transformers.

On the H200 machine a launch spends ~10 s importing torch, transformers and the modules a run
loads (bench/startup_probe.py: 11.7-14.6 s for those imports alone, against ~21 s of training
for a GSM8K epoch), every launch alike: nothing cached on disk shortens it. So once a `verlite
sft` on a GPU machine has loaded its model, it starts a helper process that imports the same
modules and then waits on a Unix socket private to this user and to this exact environment
(Python, sys.path, environment variables, verlite's source). The next `verlite sft` there
connects, hands over its arguments, working folder, environment and terminal (its stdin,
stdout and stderr file descriptors), and the helper forks a child that runs the command as the
new process would have, with everything already imported. The command forwards Ctrl-C and
SIGTERM to that child and exits with its exit code; if the command dies (even by SIGKILL), the
child kills itself. The helper exits after IDLE_S seconds without a run.

Safety: the helper never initializes CUDA (checked before it serves; a process forked after
CUDA's initialization cannot use the GPU), is reachable only by the same user (peer
credentials checked both ways), and serves only commands whose environment hashes to its own.

Off under torchrun (several processes), where no NVIDIA GPU is present (CPU runs start in a few
seconds anyway), and with VERLITE_WARM=0; VERLITE_WARM=1 turns it on anywhere (the tests).
This module imports nothing heavy: it runs before torch is imported.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

IDLE_S = 900  # the helper's life without a run; it holds ~1 GB of imported modules
# Passed on to the run (Ctrl-Z is not: it would stop only the command, and the run goes on).
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
# Variables that differ between two shells of the same environment without changing what
# Python imports or how a run behaves.
_VOLATILE = {"PWD", "OLDPWD", "SHLVL", "_", "TERM", "COLUMNS", "LINES", "WINDOWID", "TMUX_PANE", "SSH_TTY",
             "SSH_CLIENT", "SSH_CONNECTION", "PS1", "PROMPT_COMMAND", "HISTFILE", "SHELL_SESSION_ID"}
# The environment this process was launched with: by the time a run offers a helper, logging
# and libraries have set variables of their own, which the next launch will not have.
_LAUNCH_ENV = dict(os.environ)
_in_child = False  # this process is a helper's child running a command
_hidden: list[str] = []  # in a helper and its children: optional packages left out of the imports
_conn: Optional[socket.socket] = None  # in a child: its command's connection


# ---- when -------------------------------------------------------------------------------------
def enabled() -> bool:
    setting = os.environ.get("VERLITE_WARM", "auto").strip().lower()
    if setting in ("0", "false", "off", "no") or _in_child or not hasattr(socket, "send_fds"):
        return False
    if any(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")):
        return False  # torchrun: one process per GPU, started by torchrun
    if setting in ("1", "true", "on", "yes"):
        return True
    return os.path.exists("/dev/nvidiactl") and sys.platform.startswith("linux")


def in_child() -> bool:
    return _in_child


# ---- the environment's name -------------------------------------------------------------------
def _source_stamp() -> str:
    """verlite's own source files: an edit (or a new version) means another helper."""
    root = Path(__file__).resolve().parent
    stamp = []
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith(".py"):
                st = os.stat(os.path.join(folder, name))
                stamp.append(f"{folder}/{name}:{st.st_mtime_ns}:{st.st_size}")
    return "\n".join(sorted(stamp))


def _path_stamp() -> str:
    """sys.path, and what the folders packages are installed into hold (installing, upgrading
    or removing a package changes its name or its .dist-info folder's name there); other entries
    (the working folder, a project on PYTHONPATH) change with every file written there, so they
    count by name only. Not the folders' modification times: Python creating
    site-packages/__pycache__ for a top-level module changes it (the first launch on a fresh
    GPU machine did, and the next launch found no helper for its "new" environment)."""
    out = []
    for entry in sys.path:
        if os.path.basename(os.path.normpath(entry)) in ("site-packages", "dist-packages"):
            try:
                names = sorted(n for n in os.listdir(entry) if n != "__pycache__")
                entry = f"{entry}:{hashlib.sha256(chr(0).join(names).encode('utf-8', 'surrogateescape')).hexdigest()}"
            except OSError:
                pass
        out.append(entry)
    return "\n".join(out)


_address: Optional[str] = None


def address() -> str:
    """The socket's name for this environment, computed once (the first call comes before
    anything of the run can change sys.path, e.g. transformers' remote-code module folder)."""
    global _address
    if _address is None:
        env = sorted((k, v) for k, v in _LAUNCH_ENV.items() if k not in _VOLATILE and not k.startswith("VERLITE_WARM"))
        h = hashlib.sha256()
        for part in (sys.executable, sys.version, repr(sys.flags), _path_stamp(), _source_stamp(), json.dumps(env)):
            h.update(part.encode("utf-8", "surrogateescape") + b"\0")
        # The abstract namespace (Linux): no file to clean up after a killed helper.
        _address = f"\0verlite-warm-{os.getuid()}-{h.hexdigest()[:32]}"
    return _address


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


# ---- the command's side -------------------------------------------------------------------------
_INTERRUPTS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def run_in_helper(argv: list[str]) -> Optional[int]:
    """Run `verlite` with `argv` in a helper's child; its exit code, or None when no helper
    for this environment runs it (the caller then runs it itself)."""
    if not enabled():
        return None
    from verlite.trainer.timeline import process_age

    launch_epoch = time.time() - (process_age() or 0.0)  # the run counts from this process's start
    try:  # a closed stdin/stdout/stderr would hand the child this socket's descriptor instead
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:
        return None
    child: Optional[int] = None
    interrupted: list[int] = []  # Ctrl-C / SIGTERM / SIGHUP received, forwarded once the child is known

    def forward(signum, frame):
        if signum in _INTERRUPTS:
            interrupted.append(signum)
        if child is None:
            return
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in _FORWARDED}
    sock: Optional[socket.socket] = None
    reply: dict = {}
    try:
        try:
            umask = os.umask(0)
            os.umask(umask)
            message = {"argv": argv, "cwd": os.getcwd(), "env": _LAUNCH_ENV, "umask": umask,
                       "unbuffered": bool(getattr(sys.stdout, "write_through", False)),  # python -u or PYTHONUNBUFFERED
                       "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                       "launch_epoch": launch_epoch}
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(2.0)
            sock.connect(address())
            if _peer_uid(sock) != os.getuid():
                raise ConnectionRefusedError("another user's socket")
            socket.send_fds(sock, [b"F"], [0, 1, 2])
            sock.sendall(json.dumps(message).encode("utf-8", "surrogateescape") + b"\n")
            # A child forked after this gives up sees the socket closed and kills itself at once.
            sock.settimeout(10.0)
            reader = sock.makefile("rb")
            # The helper sends the child's pid; the child sends how it ended (its exit code, or
            # "fresh_process"), possibly first; the helper's reaper repeats the exit code.
            while "exit" not in reply and "fresh_process" not in reply:
                line = reader.readline()
                if not line:
                    break
                reply.update(json.loads(line))
                if child is None and "pid" in reply:
                    child = int(reply["pid"])
                    sock.settimeout(None)
                    for signum in interrupted:
                        forward(signum, None)
        except (OSError, ValueError):
            pass  # what came before says what happened (nothing: no helper took the command)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if sock is not None:
            sock.close()
    if not reply or "fresh_process" in reply:  # the command runs here, unless it was interrupted meanwhile
        if interrupted:
            print("verlite: interrupted", file=sys.stderr)
            return 128 + interrupted[0]
        return None
    if "exit" not in reply:
        print("verlite: error: the warm process running this command went away; run it again "
              "(VERLITE_WARM=0 runs it without one)", file=sys.stderr)
        return 1
    return int(reply["exit"])


@contextmanager
def held_logs():
    """In a helper's child: verlite's log records wait until the run is known to stay here
    (fresh_process_if_needed), so that a run handed back is not logged twice."""
    import logging

    logger = logging.getLogger("verlite")
    held: list = []

    class Hold(logging.Handler):
        def emit(self, record):
            held.append(record)

    saved, logger.handlers = logger.handlers, [Hold()]
    try:
        yield
    finally:
        logger.handlers = saved
        for record in held:
            logger.handle(record)


def fresh_process_if_needed(cfg) -> None:
    """In a helper's child: when this run needs an optional package the helper was started
    without (e.g. torchao for LoRA or NF4 after a full fine-tune started it), the modules
    imported here would differ from a fresh process's. Tell the command to run the command
    itself, and end here without a word."""
    from verlite.models import lean_imports

    unused = lean_imports.unused_by(cfg.model, cfg.optim.optimizer_impl, bool(cfg.data.custom_cls.path))
    if _conn is None or not set(_hidden) - set(unused):
        return
    code = 1
    try:
        _conn.sendall(json.dumps({"fresh_process": True}).encode() + b"\n")
        code = 0
    finally:
        os._exit(code)


# ---- the helper ---------------------------------------------------------------------------------
def start_helper() -> None:
    """Start the helper for this environment (if none answers), importing what this process
    has imported; it serves from the moment its imports are done."""
    if not enabled():  # (in a helper's child too: its helper is serving)
        return
    try:
        _start_helper()
    except Exception as e:  # noqa: BLE001 - a helper is an extra: the run goes on without one
        import logging

        logging.getLogger("verlite.cli").warning("warm start: no helper for the next launch (%s: %s)",
                                                 type(e).__name__, e)


def _start_helper() -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(address())
        return  # one is serving already
    except OSError:
        pass
    finally:
        probe.close()
    log_file = _log_path()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    from verlite.models import lean_imports

    # The optional packages this run kept from transformers (models/lean_imports.py) stay out of
    # the helper too: its modules are then in the state this run's were.
    hidden = [name for name in lean_imports.OPTIONAL if name not in sys.modules and _installed(name)]
    spec = {"address": address(), "path": sys.path, "modules": sorted(sys.modules), "hidden": hidden}
    with open(log_file, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-c", "from verlite.warm import serve_from_stdin; serve_from_stdin()"],
                                stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True,
                                cwd=os.getcwd(), env=_LAUNCH_ENV)
    try:
        proc.stdin.write(json.dumps(spec).encode("utf-8", "surrogateescape"))
        proc.stdin.close()
    except OSError:
        pass
    import logging

    logging.getLogger("verlite.cli").info(
        "warm start: a helper process (pid %d) now imports torch and transformers for the next `verlite sft` "
        "here; it exits after %d min without a run (VERLITE_WARM=0 turns this off)", proc.pid, IDLE_S // 60)


def _installed(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _log_path() -> Path:
    from verlite.cache_dir import cache_root

    return cache_root() / "warm" / "helper.log"


def serve_from_stdin() -> None:
    spec = json.loads(sys.stdin.buffer.read().decode("utf-8", "surrogateescape"))
    sys.path[:] = spec["path"]
    from verlite import bytecode_cache, import_index

    bytecode_cache.enable()
    import_index.install()
    serve(spec["address"], spec["modules"], spec.get("hidden", []))


class _Memory(ctypes.Structure):  # nvmlMemory_t
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _nvml_devices() -> Optional[list[tuple[tuple[int, int], int]]]:
    """Every GPU's (compute capability, free bytes) from NVML, which (unlike CUDA) a forked
    child does not mind; None where NVML cannot say."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        devices = []
        for i in range(count.value):
            handle, major, minor, memory = ctypes.c_void_p(), ctypes.c_int(), ctypes.c_int(), _Memory()
            if nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0 or \
                    nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0 or \
                    nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0:
                return None
            devices.append(((major.value, minor.value), memory.free))
        return devices
    finally:
        nvml.nvmlShutdown()


def _import_all(modules: list[str]) -> int:
    # Some libraries ask about the GPU when imported (torchao, which transformers imports:
    # torch.cuda.is_available() and get_device_capability() to pick its kernels), which would
    # initialize CUDA here, and no forked child could use the GPU. While the helper imports,
    # NVML answers both (the same answers, on a machine whose GPUs are all of one kind); any
    # other CUDA call still initializes it, and then the helper does not serve (cuda_touched).
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    import torch

    caps = {cap for cap, _ in _nvml_devices() or []}
    original = torch.cuda.get_device_capability
    if len(caps) == 1:
        torch.cuda.get_device_capability = lambda device=None, cap=caps.pop(): cap
    try:
        return _import_each(modules)
    finally:
        torch.cuda.get_device_capability = original
        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)


def _import_each(modules: list[str]) -> int:
    import importlib

    debug = bool(os.environ.get("VERLITE_WARM_DEBUG"))  # name the first module whose import initialized CUDA
    done = 0
    for name in modules:
        if name == "__main__" or name.startswith("verlite.warm"):
            continue
        try:
            importlib.import_module(name)
            done += 1
        except BaseException:  # noqa: BLE001 - a module only importable its own way is left to the child
            pass
        if debug and cuda_touched():
            print(f"warm helper: importing {name} initialized CUDA", flush=True)
            debug = False
    return done


def cuda_touched() -> bool:
    """Has this process initialized CUDA (then its forked children could not use the GPU)?
    Importing Triton maps the driver library without initializing it; cuCtxGetCurrent tells
    the two apart without initializing anything (CUDA_ERROR_NOT_INITIALIZED = 3)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return True
    try:
        with open("/proc/self/maps") as f:
            mapped = any("libcuda.so" in line for line in f)
    except OSError:
        return False
    if not mapped:
        return False
    try:
        ctx = ctypes.c_void_p()
        return ctypes.CDLL("libcuda.so.1").cuCtxGetCurrent(ctypes.byref(ctx)) != 3
    except (OSError, AttributeError):
        return True  # cannot tell: do not serve


SELF_TEST_FREE_BYTES = 4 << 30


def forked_child_can_use_the_gpu() -> bool:
    """The proof: a forked child initializes CUDA and runs a kernel. Its CUDA context takes a
    few hundred MB of GPU memory for a second, beside the run that started the helper: skipped
    (cuda_touched's answer stands) unless every GPU has SELF_TEST_FREE_BYTES free."""
    devices = _nvml_devices()
    torch = sys.modules.get("torch")
    if not devices or torch is None or min(free for _, free in devices) < SELF_TEST_FREE_BYTES:
        return True
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
            code = 0 if float(torch.ones(4, device="cuda").sum()) == 4.0 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def serve(name: str, modules: list[str], hidden: list[str]) -> None:
    global _hidden
    started = time.time()
    from verlite.models import lean_imports

    with lean_imports.without(hidden) as _hidden:
        imported = _import_all(modules)
    lean_imports.forget_answers(_hidden)  # a child asks transformers' availability checks afresh
    if cuda_touched():
        print("warm helper: CUDA was initialized while importing; not serving", flush=True)
        return
    if not forked_child_can_use_the_gpu():
        print("warm helper: a forked child could not use the GPU; not serving", flush=True)
        return
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(name)
    except OSError as e:  # another helper took the name meanwhile
        print(f"warm helper: {e}; not serving", flush=True)
        return
    listener.listen(16)
    listener.settimeout(5.0)
    print(f"warm helper {os.getpid()}: {imported} modules imported in {time.time() - started:.1f} s; serving",
          flush=True)
    running: dict[int, socket.socket] = {}  # child pid -> its command's connection
    lock = threading.Lock()
    last = time.monotonic()
    while True:
        try:
            conn, _ = listener.accept()
        except socket.timeout:
            with lock:
                idle = not running and time.monotonic() - last > IDLE_S
            if idle:
                print(f"warm helper {os.getpid()}: idle for {IDLE_S} s; exiting", flush=True)
                return
            continue
        with lock:
            others = list(running.values())
        try:
            pid = _fork_run(conn, listener, others)
        except Exception as e:  # noqa: BLE001 - one bad connection must not end the helper
            print(f"warm helper: a connection failed: {type(e).__name__}: {e}", flush=True)
            conn.close()
            continue
        if pid is None:
            conn.close()
            continue
        with lock:
            running[pid] = conn

        def reap(pid=pid, conn=conn):
            nonlocal last
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            try:  # the child reports its own code first when it exits normally; this covers a signal
                conn.sendall(json.dumps({"exit": code if code >= 0 else 128 - code}).encode() + b"\n")
            except OSError:
                pass
            conn.close()
            with lock:
                running.pop(pid, None)
                last = time.monotonic()

        threading.Thread(target=reap, daemon=True).start()


def _fork_run(conn: socket.socket, listener: socket.socket, others: list[socket.socket]) -> Optional[int]:
    """Receive one command and fork its child; the child's pid (to reap, whatever happens next),
    or None for a connection that brought no command."""
    conn.settimeout(10.0)
    if _peer_uid(conn) != os.getuid():
        raise PermissionError("a connection from another user")
    fds: list[int] = []
    try:
        data, fds, _, _ = socket.recv_fds(conn, 1, 3)
        if not data:  # a launch that only checked whether a helper is serving
            return None
        if len(fds) != 3:
            raise ValueError("expected the command's stdin, stdout and stderr")
        reader = conn.makefile("rb")
        message = json.loads(reader.readline().decode("utf-8", "surrogateescape"))
        conn.settimeout(None)
        pid = os.fork()
        if pid == 0:
            try:
                listener.close()
                for other in others:  # another run's connection: its EOF must not wait on this child
                    other.close()
                _child(conn, fds, message)
            finally:
                os._exit(1)  # _child exits itself; this only catches a failure before it could
    finally:
        for fd in fds:
            os.close(fd)
    try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    except OSError:  # the command gave up waiting: the child sees the closed socket and ends itself
        pass
    return pid


def _text_stream(fd: int, line: bool, unbuffered: bool) -> io.TextIOWrapper:
    if unbuffered:  # python -u / PYTHONUNBUFFERED: every write goes out at once
        return io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                write_through=True)
    return open(fd, "w", closefd=False, encoding="utf-8", errors="backslashreplace", buffering=1 if line else -1)


def _child(conn: socket.socket, fds: list[int], message: dict) -> None:
    global _in_child, _conn
    _in_child, _conn = True, conn
    for target, fd in zip((0, 1, 2), fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    os.chdir(message["cwd"])
    os.environ.clear()
    os.environ.update(message["env"])
    os.umask(message.get("umask", 0o022))
    if message.get("affinity") and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, message["affinity"])
        except OSError:
            pass
    for s in _FORWARDED:
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    unbuffered = message.get("unbuffered") or bool(os.environ.get("PYTHONUNBUFFERED"))
    # New streams over the command's descriptors, buffered as Python buffers its own.
    sys.stdin = sys.__stdin__ = open(0, "r", closefd=False, encoding="utf-8", errors="surrogateescape")
    sys.stdout = sys.__stdout__ = _text_stream(1, line=os.isatty(1), unbuffered=unbuffered)
    sys.stderr = sys.__stderr__ = _text_stream(2, line=True, unbuffered=unbuffered)
    sys.argv = ["verlite", *message["argv"]]

    def watch():  # the command is gone (killed): so is its run
        try:
            while conn.recv(1):
                pass
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="verlite-warm-watch", daemon=True).start()
    from verlite.trainer import timeline

    timeline.set_launch_epoch(message["launch_epoch"])
    from verlite.cli import exit_now, main

    code = 1
    try:
        code = main(message["argv"])
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - as an uncaught error would print in the command's own process
        import traceback

        traceback.print_exc()

    def report(code: int) -> None:  # once everything is written: the command may exit now
        try:
            conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
        except OSError:
            pass

    exit_now(code, before_exit=report)
