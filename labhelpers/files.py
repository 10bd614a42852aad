"""Files and folders: the course cache, atomic folder writes, sizes, quiet library output.

Used by every notebook (the cache), 02 (atomic_dir, quiet_output), 03, 05 (sizes).
``GB`` is decimal (1e9 bytes: every ``*_gb`` column, GB/s); ``GIB`` is 2**30 (nvidia-smi's GB).
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

GB = 1e9
GIB = 2**30


def cache_dir() -> Path:
    """``$QWEN_LAB_CACHE``, else ``$XDG_CACHE_HOME/qwen-deploy-lab``, else
    ``~/.cache/qwen-deploy-lab``; created on first use."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "qwen-deploy-lab"
    path = Path(os.environ.get("QWEN_LAB_CACHE") or base).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """``<cache>/models``: downloaded and built models, one folder each."""
    path = cache_dir() / "models"
    path.mkdir(exist_ok=True)
    return path


@contextmanager
def atomic_dir(dest: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``dest``, renamed to ``dest`` only when the block
    finishes. On any exception (a crash, Ctrl-C, a full disk) it is deleted and ``dest`` is
    left as it was, so nothing half-written ever looks complete. An existing ``dest`` raises
    ``FileExistsError`` unless ``overwrite``; then it is replaced at the end."""
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists. Remove it, or pass overwrite=True.")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = dest.with_name(f".old-{dest.name}-{os.getpid()}") if dest.exists() else None
    if old is not None:
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:  # put the old folder back
        if old is not None:
            os.replace(old, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def dir_size_bytes(path: str | os.PathLike[str], *, weights_only: bool = False) -> int:
    """Bytes on disk of a file or folder. Links are followed (the HF cache links snapshot files
    to blobs) and a file reached twice counts once. ``weights_only``: only the weight files
    (.safetensors, .bin, .gguf), not the tokenizer and configs."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    if not root.is_dir():
        raise FileNotFoundError(path)
    seen: dict[tuple[int, int], int] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if not weights_only or name.endswith((".safetensors", ".bin", ".gguf")):
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except OSError:  # a broken link
                    continue
                seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


class _Switch(io.TextIOBase):
    """A text stream that forwards to ``target``, which can be swapped."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def write(self, text: str) -> int:
        return self.target.write(text)

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


@contextmanager
def quiet_output(log_path: str | os.PathLike[str], *, what: str, every_s: float = 15.0,
                 status: Callable[[], str] | None = None) -> Iterator[Path]:  # fmt: skip
    """Send everything this process prints (file descriptors 1 and 2, so C extensions and child
    processes too) to ``log_path`` while the block runs, and print ``… still <what> (N s<status>)``
    every ``every_s`` seconds instead: for libraries that print megabytes (GPTQModel)."""
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    real = os.fdopen(os.dup(1), "w", buffering=1)
    stop, t0 = threading.Event(), time.monotonic()

    def heartbeat() -> None:
        while not stop.wait(every_s):
            extra = status() if status else ""
            real.write(f"      … still {what} ({time.monotonic() - t0:.0f} s{extra})\n")

    streams = sys.stdout, sys.stderr
    with open(log_path, "a", buffering=1, encoding="utf-8", errors="replace") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        # Python-level writers too (a Jupyter kernel's streams are not fd 1/2). Through a switch:
        # a logging handler created inside the block keeps writing, to the real stream, after it.
        out, err = _Switch(fh), _Switch(fh)
        sys.stdout, sys.stderr = out, err
        beat = threading.Thread(target=heartbeat, daemon=True)
        beat.start()
        try:
            yield log_path
        finally:
            stop.set()
            beat.join()
            fh.flush()
            out.target, err.target = streams
            sys.stdout, sys.stderr = streams
            for fd, saved_fd in zip((1, 2), saved, strict=True):
                os.dup2(saved_fd, fd)
                os.close(saved_fd)
            real.close()
