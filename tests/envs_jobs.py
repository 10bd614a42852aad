"""Tiny jobs for tests/test_envs.py: ``envs.run_in_env`` runs them in a fresh interpreter, which
imports this module by name (the tests put tests/ on its PYTHONPATH)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add(a: float, b: float, items: list[Any] | None = None) -> dict[str, Any]:
    """A result with a NaN (not JSON: comes back as None) and the arguments as received."""
    return {
        "sum": a + b,
        "nan": float("nan"),
        "items": items,
        "python": sys.executable,
        "course_var": os.environ.get("QWEN_LAB_TEST_VAR"),
    }


def chatty(n: int, log: Callable[[str], Any]) -> dict[str, int]:
    """Progress through ``log``; library noise on stdout and stderr (goes to the log file)."""
    for i in range(n):
        print(f"library noise {i}", flush=True)
        os.write(2, f"C-level noise {i}\n".encode())
        log(f"step {i + 1} of {n}")
    return {"steps": n}


def fail(message: str) -> dict[str, Any]:
    print("loading the model ...", flush=True)
    raise ValueError(message)


def hang(pid_file: str, log: Callable[[str], Any]) -> dict[str, Any]:
    """Start a child (like a server or a dataloader worker), write both pids, then hang."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    Path(pid_file).write_text(f"{os.getpid()} {child.pid}")
    log("started")
    time.sleep(600)
    return {}
