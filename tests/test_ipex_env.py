"""Runs tests/ipex/ inside the IPEX-LLM environment (transformers 4.37), from the core test run,
so `./course test` covers both environments and pytest prints one closing line."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

from labhelpers.env import kernel_python

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "qwen-lab-ipex"


def test_kernel_python_of_unknown_kernel_is_none():
    assert kernel_python("no-such-kernel-qwen-lab") is None


def test_ipex_environment_unit_tests_pass():
    if importlib.util.find_spec("ipex_llm"):
        pytest.skip("already running in the IPEX-LLM environment")
    python = kernel_python(KERNEL)
    if python is None:
        message = f"Jupyter kernel '{KERNEL}' is not registered: run ./course setup"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    tests = ["tests/ipex", "tests/test_downgrade.py", "tests/test_lowbit.py"]
    run = subprocess.run(
        [str(python), "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "-x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    summary = run.stdout.strip().splitlines()[-1:] if run.stdout.strip() else ["(no output)"]
    print(f"IPEX-LLM environment ({python}): {summary[0]}")
    assert run.returncode == 0, f"{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
