"""Write a folder atomically: build it under a temporary name, then rename it into place.

A crash, Ctrl-C or full disk half-way through never leaves a folder at the final path that
looks complete. Used by the stand-in builder and by model downloads (labhelpers.models).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(dest: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``dest``; on success rename it to ``dest``.

    On any exception the temporary folder is removed and ``dest`` is left as it was.
    If ``dest`` exists: raise ``FileExistsError`` unless ``overwrite=True``, in which
    case the old folder is replaced only after the new one is complete.
    """
    dest = Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(
            f"{dest} already exists. Remove it first or pass overwrite=True to replace it."
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clean_stale_temps(parent: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.tmp-*`` / ``.old-*`` folders a killed process left in ``parent``."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for child in parent.iterdir():
        if child.is_dir() and child.name.startswith((".tmp-", ".old-")):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed
