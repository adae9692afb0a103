"""Where verlite keeps what it can rebuild (GGUF conversions, tokenized data, compiled code).

One root for all of them, so a user moves or clears everything with one setting:
$VERLITE_CACHE_DIR, else $XDG_CACHE_HOME/verlite, else ~/.cache/verlite.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("VERLITE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "verlite")
    return Path(root).expanduser()
