"""Shared fixtures: every test gets its own course cache unless it asks for the real one."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

# tests/ipex/ needs the IPEX-LLM environment (transformers 4.37); the core run starts it there
# (tests/test_ipex_env.py).
collect_ignore = [] if importlib.util.find_spec("ipex_llm") else ["ipex"]


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
