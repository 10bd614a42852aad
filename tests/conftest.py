"""Shared fixtures and the test policy.

Markers (registered in pyproject.toml): ``slow`` loads a model, imports a serving engine or runs
a notebook-sized job; ``integration`` runs ./course, JupyterLab, a browser, a real server engine
or another course environment; ``gpu`` needs CUDA and is skipped here with the reason
``machine.gpu_status()`` gives. ``pytest -m "not slow and not integration" tests`` is the quick
run; plain ``pytest tests`` runs everything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))  # set-up commands

# tests/ipex/ needs the IPEX-LLM environment (transformers 4.37); the core run starts it there
# (tests/test_ipex_env.py).
collect_ignore = [] if importlib.util.find_spec("ipex_llm") else ["ipex"]

ROOT = Path(__file__).resolve().parent.parent


def require(condition: object, reason: str) -> None:
    """The policy for tests that need something set-up provides (chromium, a course kernel, a
    built stand-in): skip with ``reason`` when it is missing, but fail under ``CI=true``,
    where set-up always runs, so such a test never goes missing silently."""
    if condition:
        return
    _missing(reason)


def _missing(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: this test must run in CI)")
    pytest.skip(reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None:
        from labhelpers.machine import gpu_status

        usable, reason = gpu_status()
        if not usable:
            pytest.skip(f"needs a CUDA GPU: {reason}")


FAKE_SERVER = Path(__file__).with_name("fake_openai_server.py")


def fake_openai_server(log_dir: Path, *args: str, port: int | None = None, name: str = "fake",
                       **kwargs: Any) -> Any:  # fmt: skip
    """A ``serve.Server`` (not started) for tests/fake_openai_server.py on a free loopback port
    (or ``port``), its log ``<log_dir>/<name>.log``; ``args``: the fake's own flags
    (``--api-key``, ``--mode``, ``--model``, ``--token-delay``), ``kwargs``: the Server's."""
    from labhelpers import serve

    port = serve.free_port() if port is None else port
    argv = [sys.executable, str(FAKE_SERVER), "--port", str(port), *args]
    return serve.Server(argv, port=port, name=name, log_path=log_dir / f"{name}.log", **kwargs)


@pytest.fixture
def tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty course cache, an empty ModelScope cache and an empty HF cache."""
    cache = tmp_path / "course-cache"
    monkeypatch.setenv("QWEN_LAB_CACHE", str(cache))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "modelscope"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("QWEN_LAB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


@pytest.fixture
def standin_path() -> Path:
    """The real ``standin`` model built by set-up (required: see :func:`require`)."""
    from labhelpers import models
    from labhelpers.files import models_dir

    require(models.standin_built("standin"), "the stand-in is not built: run ./course setup")
    return models_dir() / "standin"


def write_fake_model(folder: Path, *, truncate: bool = False) -> Path:
    """A tiny but structurally complete model folder (config, safetensors, tokenizer)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 8}))
    (folder / "tokenizer.json").write_text("{}")
    weights = folder / "model.safetensors"
    save_file({"w": np.arange(64, dtype=np.float32).reshape(8, 8)}, str(weights))
    if truncate:
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 100])
    return folder
