"""Run the app with uvicorn: 127.0.0.1 unless told otherwise; Ctrl-C / SIGTERM stop taking
new connections, let in-flight requests finish, then stop the engine."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
from typing import Optional

from verlite.serve.app import create_app
from verlite.serve.loading import load_served

log = logging.getLogger("verlite.serve")


def run_server(checkpoint: str, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
               **load_kwargs) -> None:
    import uvicorn

    api_key = api_key or os.environ.get("VERLITE_API_KEY") or None
    # The engine thread and the HTTP thread share the GIL; a busy event loop would otherwise hold
    # it for up to 5 ms at a time, longer than a whole decode step on a GPU.
    sys.setswitchinterval(0.0005)
    served = load_served(checkpoint, **load_kwargs)
    app = create_app(served=served, api_key=api_key)
    # Everything loaded so far (torch, transformers, the model's modules: millions of objects)
    # lives as long as the server: out of the collector's sight, a full collection no longer
    # scans it and stops every thread for tens of milliseconds mid-stream.
    gc.collect()
    gc.freeze()
    log.info("verlite serve: http://%s:%d/v1 (models: %s)%s", host, port, ", ".join(served.models),
             "; API key required" if api_key else "")
    # uvicorn drains on SIGINT/SIGTERM, then re-raises the signal to the handler it found;
    # this one turns it into a normal return, so a drained stop exits 0.
    previous = {sig: signal.signal(sig, _drained) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False,
                    timeout_graceful_shutdown=None)
    except _Drained:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    log.info("verlite serve: stopped; in-flight requests were answered")


class _Drained(Exception):
    pass


def _drained(signum, frame):
    raise _Drained()
