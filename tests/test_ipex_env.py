"""Runs tests/ipex/ and tests/test_ipex.py inside the IPEX-LLM environment (transformers 4.37),
from the core test run, so `./course test` covers both environments."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
from conftest import require

from labhelpers.envs import kernel_python

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "qwen-lab-ipex"


@pytest.mark.integration
def test_ipex_environment_tests_pass():
    if importlib.util.find_spec("ipex_llm"):
        pytest.skip("already running in the IPEX-LLM environment")
    python = kernel_python(KERNEL, "ipex")
    require(python, f"the IPEX-LLM environment (kernel '{KERNEL}') is missing: run ./course setup")
    tests = ["tests/ipex", "tests/test_ipex.py"]
    run = subprocess.run(
        [str(python), "-m", "pytest", *tests, "-q", "-p", "no:cacheprovider", "-x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    summary = run.stdout.strip().splitlines()[-1:] if run.stdout.strip() else ["(no output)"]
    print(f"IPEX-LLM environment ({python}): {summary[0]}")
    assert run.returncode == 0, f"{run.stdout[-6000:]}\n{run.stderr[-3000:]}"
