"""Keep a noisy library's output in a log file and show a short heartbeat instead.

GPTQModel prints megabytes of per-layer tables while it quantizes. In a terminal or a CI
log that buries everything else, so the course's set-up sends it to a file and prints one
line every few seconds saying how far it got. Used by the stand-in builder (set-up) and
notebook 02_gptq_calibration.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LAYER_RE = re.compile(r'"layer":\s*(\d+)')


def last_gptq_layer(log_dir: Path) -> int | None:
    """The highest layer index in GPTQModel's newest ``logs/gptq_log_*.log`` (JSON records)."""
    logs = sorted(log_dir.glob("gptq_log_*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return None
    layers = [int(m) for m in LAYER_RE.findall(logs[-1].read_text(errors="replace"))]
    return max(layers) if layers else None


@contextmanager
def output_to_file(
    log_path: Path,
    *,
    what: str,
    every_s: float = 15.0,
    status: Callable[[], str] | None = None,
) -> Iterator[None]:
    """Redirect this process's stdout/stderr (file descriptors 1 and 2, so C extensions and
    subprocesses too) to ``log_path``; print ``… still <what> (N s<status>)`` to the real
    stdout every ``every_s`` seconds. Everything is restored on exit, also on errors."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    real = os.fdopen(os.dup(1), "w", buffering=1)
    stop = threading.Event()
    t0 = time.monotonic()

    def heartbeat() -> None:
        while not stop.wait(every_s):
            extra = status() if status else ""
            real.write(f"      … still {what} ({time.monotonic() - t0:.0f} s{extra})\n")

    log_path.parent.mkdir(parents=True, exist_ok=True)
    py_streams = sys.stdout, sys.stderr
    with open(log_path, "a", buffering=1, encoding="utf-8", errors="replace") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        sys.stdout = sys.stderr = fh  # also Python-level writers (e.g. under a Jupyter kernel)
        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            yield
        finally:
            stop.set()
            beat.join()
            fh.flush()
            sys.stdout, sys.stderr = py_streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            real.close()
