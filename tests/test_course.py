"""The README's first command: `./course lab` sets up (idempotently) and serves the course.

Runs the real script against the real environment that set-up created; skipped when
set-up has not run yet (plain `pytest` on a fresh checkout), failed then under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import require

from labhelpers import models
from labhelpers.files import models_dir

ROOT = Path(__file__).resolve().parent.parent
STAMP = ROOT / ".venvs" / "core" / ".course-stamp"

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def set_up() -> None:
    require(STAMP.exists(), "the core environment is not set up: run ./course setup first")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def test_second_setup_is_fast_and_changes_nothing():
    kernel_json = (
        Path(
            subprocess.run(
                [
                    str(ROOT / ".venvs/core/bin/python"),
                    "-c",
                    "from jupyter_core.paths import jupyter_data_dir; print(jupyter_data_dir())",
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        )
        / "kernels"
        / "qwen-lab-core"
        / "kernel.json"
    )
    stamps = [STAMP, kernel_json] + [
        models_dir() / name / models._STANDIN_STAMP for name in ("standin", "standin-gptq-int4")
    ]
    before = [path.stat().st_mtime_ns for path in stamps]
    t0 = time.monotonic()
    subprocess.run(
        ["bash", str(ROOT / "course"), "setup"], capture_output=True, text=True, check=True
    )
    elapsed = time.monotonic() - t0
    assert [path.stat().st_mtime_ns for path in stamps] == before, "nothing was rebuilt"
    assert elapsed < 60, f"a set-up with nothing to do took {elapsed:.0f} s"


def test_course_lab_serves_notebooks_on_loopback_with_the_course_kernel(tmp_path):
    port = free_port()
    env = os.environ | {
        "QWEN_LAB_PORT": str(port),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "settings"),
        "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
    }
    proc = subprocess.Popen(
        ["bash", str(ROOT / "course"), "lab"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            match = re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=(\w+)", "".join(lines))
            url = match and match.group(0)
            time.sleep(0.5)
        assert url, "JupyterLab did not print its URL:\n" + "".join(lines)[-3000:]
        token = url.rsplit("=", 1)[1]
        base = f"http://127.0.0.1:{port}"
        specs = get_json(f"{base}/api/kernelspecs?token={token}")["kernelspecs"]
        assert {"qwen-lab-core", "qwen-lab-trtllm"} <= set(specs)
        contents = get_json(f"{base}/api/contents?token={token}")["content"]
        assert "00_env_check.ipynb" in {c["name"] for c in contents}
        with socket.socket() as s:  # bound to loopback only
            s.settimeout(2)
            assert s.connect_ex(("127.0.0.1", port)) == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    listening = subprocess.run(
        ["bash", "-c", f"ss -ltn 'sport = :{port}' | tail -n +2"], capture_output=True, text=True
    ).stdout
    assert listening.strip() == "", "JupyterLab still listening after stop"
