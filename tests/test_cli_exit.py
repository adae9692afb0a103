"""The CLI's exit without interpreter teardown still does what a normal exit does first."""

import subprocess
import sys
import textwrap


def test_exit_now_joins_threads_runs_atexit_and_stops_idle_executor_workers(tmp_path):
    # A pool a library left open (inductor's compile threads, say) has an idle, non-daemon
    # worker: joining it without first signalling executors would wait for ever.
    script = textwrap.dedent(f"""
        import atexit, threading, time
        from concurrent.futures import ThreadPoolExecutor
        from pathlib import Path
        from verlite.cli import exit_now

        pool = ThreadPoolExecutor(2)
        pool.submit(lambda: None).result()
        def slow():
            time.sleep(0.5)
            Path({str(tmp_path / 'thread')!r}).write_text('joined')
        threading.Thread(target=slow).start()
        atexit.register(lambda: Path({str(tmp_path / 'atexit')!r}).write_text('ran'))
        exit_now(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=20)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert (tmp_path / "thread").read_text() == "joined"
    assert (tmp_path / "atexit").read_text() == "ran"
