"""Where the course keeps its files (model cache, stand-ins, run outputs)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "QWEN_LAB_CACHE"


def cache_dir() -> Path:
    """The course cache: ``$QWEN_LAB_CACHE``, else ``$XDG_CACHE_HOME/qwen-deploy-lab``,
    else ``~/.cache/qwen-deploy-lab``. Created on first use."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        path = Path(explicit).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
        path = Path(base).expanduser() / "qwen-deploy-lab"
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """Folder holding downloaded and built models (one sub-folder per model)."""
    path = cache_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def repo_root() -> Path | None:
    """The course checkout this package was installed from (editable install), if any."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "notebooks").is_dir() else None
