"""labhelpers.envs: the course environments and the one worker protocol, ``run_in_env``.

The jobs live in tests/envs_jobs.py; each test runs them in a real fresh interpreter."""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from labhelpers import envs
from labhelpers.envs import run_in_env

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": f"{TESTS}{os.pathsep}{ROOT}"}  # the worker imports envs_jobs by name


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(gone(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- run_in_env


def test_the_result_comes_back_as_json(tmp_cache: Path):
    got = run_in_env(
        None,
        "envs_jobs:add",
        env={**ENV, "QWEN_LAB_TEST_VAR": "set"},
        log=lambda _: None,
        a=1,
        b=2.5,
        items=(1, math.inf),
    )
    assert got == {
        "sum": 3.5,
        "nan": None,  # NaN and infinities are not JSON: they become None
        "items": [1, None],
        "python": sys.executable,
        "course_var": "set",
    }


def test_another_interpreter_can_be_named(tmp_cache: Path):
    got = run_in_env(sys.executable, "envs_jobs:add", env=ENV, log=lambda _: None, a=0, b=0)
    assert got["python"] == sys.executable


def test_progress_lines_are_shown_and_library_output_goes_to_the_log(tmp_cache: Path):
    lines: list[str] = []
    got = run_in_env(None, "envs_jobs:chatty", env=ENV, log=lines.append, name="chatty-job", n=3)
    assert got == {"steps": 3}
    assert lines == ["step 1 of 3", "step 2 of 3", "step 3 of 3"]
    log = (tmp_cache / "logs" / "workers" / "chatty-job.log").read_text()
    assert "library noise 2" in log and "C-level noise 2" in log


def test_a_failure_raises_with_the_end_of_the_log(tmp_cache: Path):
    with pytest.raises(RuntimeError) as info:
        run_in_env(None, "envs_jobs:fail", env=ENV, log=lambda _: None, message="no such layer")
    text = str(info.value)
    assert text.startswith("fail failed (exit code 1); end of ")
    assert "loading the model ..." in text and "ValueError: no such layer" in text
    with pytest.raises(RuntimeError, match="ModuleNotFoundError"):
        run_in_env(None, "no_such_module_qwen:job", env=ENV, log=lambda _: None)


def test_a_timeout_kills_the_worker_and_everything_it_started(tmp_cache: Path, tmp_path: Path):
    pid_file = tmp_path / "pids"
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="killed by signal 9"):
        run_in_env(
            None, "envs_jobs:hang", env=ENV, log=lambda _: None, timeout_s=2, pid_file=str(pid_file)
        )
    assert time.monotonic() - t0 < 20
    pids = [int(p) for p in pid_file.read_text().split()]
    assert wait_gone(pids), "the worker's child outlived the timeout"


def test_an_interrupted_caller_leaves_no_worker_behind(tmp_cache: Path, tmp_path: Path):
    pid_file = tmp_path / "pids"

    def interrupt(line: str) -> None:
        raise KeyboardInterrupt  # Ctrl-C in the notebook while the worker runs

    with pytest.raises(KeyboardInterrupt):
        run_in_env(None, "envs_jobs:hang", env=ENV, log=interrupt, pid_file=str(pid_file))
    assert wait_gone([int(p) for p in pid_file.read_text().split()])


# --------------------------------------------------------------------------- helpers


def test_jsonable():
    value = {1: (1.0, math.nan, [-math.inf]), "x": {"y": None, "z": "s"}, "b": True}
    assert envs.jsonable(value) == {"1": [1.0, None, [None]], "x": {"y": None, "z": "s"}, "b": True}


def test_kill_group_of_a_missing_process_is_harmless():
    envs._kill_group(2**22 + 12345)


def test_dist_version_for_this_and_another_interpreter():
    from importlib import metadata

    assert envs.dist_version("packaging") == metadata.version("packaging")
    assert envs.dist_version("packaging", sys.executable) == metadata.version("packaging")
    assert envs.dist_version("no-such-dist-qwen-lab") is None
    assert envs.dist_version("no-such-dist-qwen-lab", sys.executable) is None
    assert envs.dist_version("Packaging", sys.executable) == metadata.version("packaging")


def test_kernel_python_finds_kernels_and_the_checkouts_venvs():
    assert envs.kernel_python("no-such-kernel-qwen-lab") is None
    assert envs.kernel_python("no-such-kernel-qwen-lab", "no-such-venv") is None
    venv = ROOT / ".venvs" / "core" / "bin" / "python"
    found = envs.kernel_python("no-such-kernel-qwen-lab", "core")
    assert found == (venv if venv.is_file() else None)
