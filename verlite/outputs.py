"""Files and folders a command writes for the user (exports, merged models, predictions):
written under a temporary sibling name and renamed into place when complete, so a full
disk, a bad path or a kill never leaves a half-written output under the final name, and a
failure is one line naming the output and what to do."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from verlite.errors import VerliteError


def _failure(path: Path, what: str, err: BaseException) -> VerliteError:
    reason = getattr(err, "strerror", None) or " ".join(str(err).split())[:160]
    return VerliteError(f"cannot write {what} {path} ({reason}); nothing was written there: pick a writable "
                        "place with enough free space")


def _write_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError]
    try:  # safetensors reports a full disk as its own error type, not OSError
        from safetensors import SafetensorError

        errors.append(SafetensorError)
    except ImportError:
        pass
    return tuple(errors)


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete folder `tmp` to `final`. An older `final` is swapped aside first and
    removed only once the new one is in place, so a kill leaves one of the two whole."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)


@contextlib.contextmanager
def output_dir(path: str | Path, what: str) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `path` (an older output there
    is removed only once the new one is complete)."""
    final = Path(path).expanduser()
    tmp = _temp_sibling(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        replace_dir(tmp, final)
    except _write_errors() as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _failure(final, what, e) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def output_file(path: str | Path, what: str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator:
    """Yield an open temporary file; on success it is flushed to disk and renamed to `path`."""
    final = Path(path).expanduser()
    tmp = _temp_sibling(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise _failure(final, what, e) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
