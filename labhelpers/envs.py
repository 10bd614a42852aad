"""The course's environments (one venv and Jupyter kernel per conflicting stack) and the one way
to run a measurement in another of them (notebooks 03, 06): :func:`run_in_env` runs a job,
``module:function`` plus JSON keyword arguments, in a fresh interpreter and returns its dict::

    row = envs.run_in_env(envs.kernel_python("qwen-lab-ipex", "ipex"),
                          "labhelpers.ipex:measure_format", model_dir=..., low_bit="sym_int4")
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from labhelpers.files import cache_dir


def kernel_python(kernel: str, venv: str | None = None) -> Path | None:
    """The interpreter behind a registered Jupyter kernel (``qwen-lab-ipex``), else the
    checkout's ``.venvs/<venv>/bin/python``; None when neither exists."""
    from jupyter_client.kernelspec import KernelSpecManager

    try:
        python = Path(KernelSpecManager().get_kernel_spec(kernel).argv[0])
        if python.is_file():
            return python
    except Exception:  # no such kernel, or a broken kernel.json
        pass
    checkout = Path(__file__).resolve().parent.parent  # the course checkout, if installed from one
    candidate = checkout / ".venvs" / (venv or "-") / "bin" / "python"
    return candidate if venv and candidate.is_file() else None


def dist_version(dist: str, python: str | os.PathLike[str] | None = None) -> str | None:
    """Installed version of distribution ``dist`` here, or for another interpreter; else None."""
    if python is None:
        from importlib import metadata

        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    done = subprocess.run([os.fspath(python), "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or None if done.returncode == 0 else None


def jsonable(value: Any) -> Any:
    """A JSON-safe copy: NaN and infinities become None, tuples lists, keys strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a whole process group (a worker and everything it started)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_in_env(python: str | os.PathLike[str] | None, function: str, *, timeout_s: float = 1800,
               env: Mapping[str, str] | None = None, log: Callable[[str], Any] = print,
               name: str | None = None, **kwargs: Any) -> dict[str, Any]:  # fmt: skip
    """Run ``function`` ("module:function") with ``kwargs`` in a fresh ``python`` (default:
    this interpreter) and return the dict it returns.

    Lines the function passes to its ``log`` argument are shown here; everything else the worker
    prints goes to ``<cache>/logs/workers/<name>.log``. The worker runs in its own process
    group, killed on timeout or interrupt. A failure raises RuntimeError with the log's end."""
    name = name or function.rsplit(":", 1)[-1]
    log_path = cache_dir() / "logs" / "workers" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(env or {})
    root = str(Path(__file__).resolve().parent.parent)  # labhelpers importable in any venv
    paths = (env.pop("PYTHONPATH", None), root, os.environ.get("PYTHONPATH"))
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error", **env}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    with tempfile.TemporaryDirectory(prefix="labhelpers-job-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"function": function, "kwargs": jsonable(kwargs)}))
        argv = [os.fspath(python or sys.executable), "-m", "labhelpers.envs", str(job)]
        with open(log_path, "w") as err:
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=tmp, env=full_env,
                start_new_session=True,
            )  # fmt: skip
            timer = threading.Timer(timeout_s, _kill_group, (proc.pid,))
            timer.start()
            try:
                for line in proc.stdout or ():
                    log(line.rstrip())
                code = proc.wait()
            finally:
                timer.cancel()
                if proc.poll() is None:  # interrupted: leave no worker behind
                    _kill_group(proc.pid)
                    proc.wait()
        result = Path(tmp) / "result.json"
        if code != 0 or not result.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
            how = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
            raise RuntimeError(f"{name} failed ({how}); end of {log_path}:\n{tail}")
        return json.loads(result.read_text())


def _worker(job_path: str) -> int:
    """``python -m labhelpers.envs JOB``: stdout becomes the progress channel and whatever the
    libraries print goes to stderr (the log file); the result lands next to the job."""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    job = json.loads(Path(job_path).read_text())
    module, _, attr = job["function"].partition(":")
    function = getattr(importlib.import_module(module), attr)
    kwargs = dict(job["kwargs"])
    if "log" in inspect.signature(function).parameters:
        kwargs["log"] = lambda line: print(line, file=channel, flush=True)
    result = function(**kwargs)
    (Path(job_path).parent / "result.json").write_text(json.dumps(jsonable(result)))
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
