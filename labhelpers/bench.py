"""Measurement bench: token timing, peak memory, streamed HTTP timing, bandwidth roofline.

Used by notebooks 01 (GPTQ inference), 03 (ipex-llm), 05 (vLLM serving) and
06 (comparison). The notebooks call ``model.generate`` / the OpenAI client themselves;
this module only *measures* around those calls:

* :class:`GenerationTimer` is a transformers streamer that timestamps every new token.
* :class:`PeakMemory` samples resident memory (RSS) in a background thread and reads the
  CUDA allocator's peak.
* :func:`time_generate` repeats a generate call and reports medians (shared machines are
  noisy; a single run proves little).
* :func:`time_openai_stream` times a streamed chat completion from an OpenAI-compatible
  server (vLLM, llama.cpp, ...).
* :func:`memory_bandwidth_gbps`, :func:`decode_bytes_per_token`,
  :func:`roofline_tokens_per_s` put a measured decode rate next to its memory-bandwidth
  ceiling.

Units: ``*_gb`` and ``*_gbps`` are decimal (1 GB = 1e9 bytes), the unit bandwidth is
quoted in; :func:`human_bytes` prints binary units (KiB, MiB, GiB) with IEC suffixes.

Importing this module is instant: numpy, torch, psutil, pandas and matplotlib are
imported inside the functions that use them.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BandwidthResult",
    "GenerationResult",
    "GenerationTimer",
    "PeakMemory",
    "RepeatedResult",
    "decode_bytes_per_token",
    "dir_size_bytes",
    "human_bytes",
    "kv_geometry",
    "memory_bandwidth_gbps",
    "model_weight_bytes",
    "percent_of_roofline",
    "plot_results",
    "process_tree_rss_bytes",
    "roofline_tokens_per_s",
    "rss_bytes",
    "time_generate",
    "time_openai_stream",
    "to_frame",
]

GB = 1e9  # decimal gigabyte, the unit of the *_gb columns and of GB/s

Clock = Callable[[], float]


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


def _gb(n: int | None) -> float | None:
    return None if n is None else n / GB


@dataclass
class GenerationResult:
    """One timed generation (notebooks 01, 03, 05, 06).

    ``ttft_s``: time from the start mark to the first new token (prefill + first step).
    ``decode_tokens_per_s``: ``(new_tokens - 1) / (t_last - t_first)``, the steady decode
    rate that excludes prefill; ``None`` with fewer than two tokens.
    ``total_s``: start mark to end of generation; ``e2e_tokens_per_s = new_tokens / total_s``.
    Counts are per sequence: with a batch of B prompts each step yields B tokens but
    counts as one.
    """

    label: str
    new_tokens: int
    ttft_s: float | None
    decode_tokens_per_s: float | None
    total_s: float | None
    e2e_tokens_per_s: float | None
    peak_rss_bytes: int | None = None
    peak_cuda_bytes: int | None = None
    prompt_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    text: str | None = field(default=None, repr=False)

    def as_row(self) -> dict[str, Any]:
        """Flat dict for ``pandas.DataFrame`` (``text`` left out; ``extra`` keys merged in,
        prefixed with ``extra_`` if they clash with a column). Adds ``peak_rss_gb`` and
        ``peak_cuda_gb`` (decimal GB)."""
        row: dict[str, Any] = {
            "label": self.label,
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
            "ttft_s": self.ttft_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "total_s": self.total_s,
            "e2e_tokens_per_s": self.e2e_tokens_per_s,
            "peak_rss_bytes": self.peak_rss_bytes,
            "peak_rss_gb": _gb(self.peak_rss_bytes),
            "peak_cuda_bytes": self.peak_cuda_bytes,
            "peak_cuda_gb": _gb(self.peak_cuda_bytes),
        }
        for key, value in self.extra.items():
            row[f"extra_{key}" if key in row else key] = value
        return row

    def with_memory(self, memory: PeakMemory) -> GenerationResult:
        """A copy carrying the peaks of a finished :class:`PeakMemory` (e.g. a server's
        process tree measured around :func:`time_openai_stream`, notebook 05)."""
        return dataclasses.replace(
            self,
            peak_rss_bytes=memory.peak_rss_bytes,
            peak_cuda_bytes=memory.peak_cuda_bytes,
            extra=dict(self.extra),
        )


def _rates(
    start: float, token_times: Sequence[float], end: float | None, new_tokens: int
) -> tuple[float | None, float | None, float | None, float | None]:
    """(ttft_s, decode_tokens_per_s, total_s, e2e_tokens_per_s) from raw timestamps."""
    if not token_times:
        total = None if end is None else end - start
        return None, None, total, None
    t_first, t_last = token_times[0], token_times[-1]
    ttft = t_first - start
    decode = None
    if new_tokens >= 2 and t_last > t_first:
        decode = (new_tokens - 1) / (t_last - t_first)
    finish = end if end is not None else t_last
    total = finish - start
    e2e = new_tokens / total if total > 0 else None
    return ttft, decode, total, e2e


# --------------------------------------------------------------------------------------
# Token timing
# --------------------------------------------------------------------------------------


def _numel(value: Any) -> int:
    numel = getattr(value, "numel", None)
    if callable(numel):  # torch.Tensor
        return int(numel())
    size = getattr(value, "size", None)
    if isinstance(size, int):  # numpy.ndarray
        return size
    if isinstance(value, int):
        return 1
    return len(value)


def _shape(value: Any) -> tuple[int, ...]:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return tuple(shape)
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], (list, tuple)):
            return (len(value), len(value[0]))
        return (len(value),)
    return ()


class GenerationTimer:
    """A transformers streamer that timestamps each new token (notebooks 01, 03, 06).

    Pass it as ``streamer=`` to ``model.generate``; transformers calls ``put`` once with
    the prompt ids, then once per decoding step with the new token(s), then ``end()``::

        timer = bench.GenerationTimer()
        with bench.PeakMemory() as mem:
            out = model.generate(**inputs, max_new_tokens=64, do_sample=False, streamer=timer)
        row = timer.result(label="GPTQ int4", memory=mem)

    Start mark: the moment the timer is created (``auto_start=True``) or ``start()`` is
    called (which also clears earlier recordings, so a timer can be reused). With
    ``auto_start=False`` and no ``start()``, the prompt ``put`` marks the start; that
    leaves out tokenization and input preparation but includes prefill.

    ``forward_to``: another streamer (``TextStreamer``, ``TextIteratorStreamer``) that
    receives every ``put``/``end`` call unchanged, so one generate both streams text and
    is timed. The timestamp is taken before forwarding.

    ``skip_prompt``: the first ``put`` is the prompt (always true for transformers
    ``generate``); set False for loops that only push new tokens.

    Duck-typed on transformers' ``BaseStreamer`` (``put``/``end``), so it works with
    transformers 4.x and 5.x without importing them. On CUDA, ``generate`` moves each
    token to the CPU before ``put``, which synchronizes, so timestamps are honest.
    """

    def __init__(
        self,
        forward_to: Any | None = None,
        *,
        skip_prompt: bool = True,
        auto_start: bool = True,
        clock: Clock = time.perf_counter,
    ) -> None:
        self.forward_to = forward_to
        self.skip_prompt = skip_prompt
        self.clock = clock
        self.start_time: float | None = None
        self.prompt_time: float | None = None
        self.end_time: float | None = None
        self.prompt_tokens: int | None = None
        self.batch_size = 1
        self.new_tokens = 0
        self.token_times: list[float] = []
        self._prompt_seen = False
        if auto_start:
            self.start()

    def start(self) -> None:
        """Mark the start now and forget earlier recordings."""
        self.start_time = self.clock()
        self.prompt_time = None
        self.end_time = None
        self.prompt_tokens = None
        self.batch_size = 1
        self.new_tokens = 0
        self.token_times = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        """Called by ``generate``: first with the prompt ids, then with each new token."""
        now = self.clock()
        if self.skip_prompt and not self._prompt_seen:
            self._prompt_seen = True
            self.prompt_time = now
            if self.start_time is None:
                self.start_time = now
            shape = _shape(value)
            self.batch_size = shape[0] if len(shape) >= 2 else 1
            self.prompt_tokens = shape[-1] if shape else _numel(value)
        else:
            if self.start_time is None:
                self.start_time = now
            steps = max(1, _numel(value) // max(1, self.batch_size))
            self.new_tokens += steps
            self.token_times.extend([now] * steps)
        if self.forward_to is not None:
            self.forward_to.put(value)

    def end(self) -> None:
        """Called by ``generate`` when generation is over."""
        self.end_time = self.clock()
        if self.forward_to is not None:
            self.forward_to.end()

    @property
    def timestamps(self) -> list[float]:
        """Arrival time of each new token in seconds since the start mark."""
        start = self.start_time or 0.0
        return [t - start for t in self.token_times]

    def result(
        self,
        label: str = "",
        *,
        peak_rss_bytes: int | None = None,
        peak_cuda_bytes: int | None = None,
        memory: PeakMemory | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> GenerationResult:
        """The measurements as a :class:`GenerationResult`. ``memory``: a finished
        :class:`PeakMemory` whose peaks fill ``peak_rss_bytes``/``peak_cuda_bytes``."""
        if memory is not None:
            peak_rss_bytes = memory.peak_rss_bytes if peak_rss_bytes is None else peak_rss_bytes
            if peak_cuda_bytes is None:
                peak_cuda_bytes = memory.peak_cuda_bytes
        start = self.start_time if self.start_time is not None else 0.0
        ttft, decode, total, e2e = _rates(start, self.token_times, self.end_time, self.new_tokens)
        info = dict(extra or {})
        if self.batch_size != 1:
            info.setdefault("batch_size", self.batch_size)
        return GenerationResult(
            label=label,
            new_tokens=self.new_tokens,
            ttft_s=ttft,
            decode_tokens_per_s=decode,
            total_s=total,
            e2e_tokens_per_s=e2e,
            peak_rss_bytes=peak_rss_bytes,
            peak_cuda_bytes=peak_cuda_bytes,
            prompt_tokens=self.prompt_tokens,
            extra=info,
        )


@dataclass
class RepeatedResult:
    """Output of :func:`time_generate`: ``median`` (a :class:`GenerationResult` of
    per-metric medians; memory peaks are the maximum over runs), every timed run in
    ``runs``, and the return value of the last call in ``last_output``."""

    median: GenerationResult
    runs: list[GenerationResult]
    last_output: Any = field(default=None, repr=False)

    def as_row(self) -> dict[str, Any]:
        """The median's row (for :func:`to_frame`)."""
        return self.median.as_row()

    def runs_frame(self) -> Any:
        """All timed runs as a pandas DataFrame (one row per run)."""
        return to_frame(self.runs)


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _max(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _median_result(label: str, runs: Sequence[GenerationResult]) -> GenerationResult:
    return GenerationResult(
        label=label,
        new_tokens=int(statistics.median_low([r.new_tokens for r in runs])),
        ttft_s=_median(r.ttft_s for r in runs),
        decode_tokens_per_s=_median(r.decode_tokens_per_s for r in runs),
        total_s=_median(r.total_s for r in runs),
        e2e_tokens_per_s=_median(r.e2e_tokens_per_s for r in runs),
        peak_rss_bytes=_max(r.peak_rss_bytes for r in runs),
        peak_cuda_bytes=_max(r.peak_cuda_bytes for r in runs),
        prompt_tokens=runs[-1].prompt_tokens,
        extra={},
    )


def time_generate(
    generate_fn: Callable[[GenerationTimer], Any],
    label: str = "",
    warmup: int = 1,
    repeats: int = 3,
    *,
    forward_to: Any | None = None,
    measure_memory: bool = True,
    extra: Mapping[str, Any] | None = None,
    clock: Clock = time.perf_counter,
) -> RepeatedResult:
    """Time ``generate_fn(streamer)`` ``repeats`` times after ``warmup`` untimed calls
    (notebooks 01, 03, 06).

    ``generate_fn`` receives a fresh :class:`GenerationTimer` and must pass it to
    ``generate`` as ``streamer=``; the notebook keeps the generate call visible::

        runs = bench.time_generate(
            lambda streamer: model.generate(**inputs, max_new_tokens=64,
                                            do_sample=False, streamer=streamer),
            label="GPTQ int4")
        runs.median.as_row()

    Warm-up runs absorb one-off costs (kernel compilation, allocator growth, page faults)
    and are not forwarded to ``forward_to``. Each timed run is wrapped in
    :class:`PeakMemory` when ``measure_memory`` (its sampling thread costs a little CPU).
    The median row takes the median of each timing metric separately and the maximum of
    the memory peaks; ``extra`` gets ``repeats`` and ``warmup``.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    if warmup < 0:
        raise ValueError("warmup must be >= 0")
    for _ in range(warmup):
        generate_fn(GenerationTimer(clock=clock))
    runs: list[GenerationResult] = []
    output: Any = None
    for _ in range(repeats):
        timer = GenerationTimer(forward_to=forward_to, clock=clock, auto_start=False)
        if measure_memory:
            with PeakMemory() as mem:
                timer.start()
                output = generate_fn(timer)
            run = timer.result(label, memory=mem, extra=extra)
        else:
            timer.start()
            output = generate_fn(timer)
            run = timer.result(label, extra=extra)
        if run.new_tokens == 0:
            raise RuntimeError(
                "generate_fn recorded no tokens: pass the streamer it receives to "
                "model.generate(..., streamer=streamer)"
            )
        runs.append(run)
    median = _median_result(label, runs)
    median.extra = {**(extra or {}), "repeats": repeats, "warmup": warmup}
    return RepeatedResult(median=median, runs=runs, last_output=output)


# --------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------


def _rss_from_proc(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/statm") as fh:
        resident_pages = int(fh.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def rss_bytes(pid: int | None = None) -> int:
    """Current resident set size (RSS) of a process, this one by default (notebooks 01,
    03, 05, 06). Uses psutil when installed, else ``/proc/<pid>/statm`` (Linux)."""
    try:
        import psutil
    except ImportError:
        try:
            return _rss_from_proc("self" if pid is None else pid)
        except OSError as exc:
            raise RuntimeError("rss_bytes needs psutil on this platform") from exc
    return int(psutil.Process(pid).memory_info().rss)


def rss_peak_bytes(pid: int | str = "self") -> int | None:
    """Highest RSS a process has had since it started (``VmHWM`` in /proc/<pid>/status), or
    None where /proc is missing (notebook 03: each format is measured in a fresh process, so
    this peak belongs to that format alone)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def _proc_children(pid: int) -> list[int]:
    """All descendants of ``pid`` found by scanning /proc (fallback without psutil)."""
    from labhelpers.procs import proc_stats

    parents: dict[int, list[int]] = {}
    for proc in proc_stats():
        parents.setdefault(proc.ppid, []).append(proc.pid)
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def process_tree_rss_bytes(pid: int | None = None) -> int:
    """RSS of a process plus all its descendants, e.g. a vLLM or llama.cpp server and its
    workers (notebooks 05, 06). Pages shared between processes are counted once per
    process, so the sum can exceed the memory really in use. Processes that exit during
    the reading are skipped."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil
    except ImportError:
        total = _rss_from_proc(pid)
        for child in _proc_children(pid):
            try:
                total += _rss_from_proc(child)
            except (OSError, IndexError):
                pass
        return total
    root = psutil.Process(pid)
    total = int(root.memory_info().rss)
    for child in root.children(recursive=True):
        try:
            total += int(child.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakMemory:
    """Context manager recording peak RSS (and peak CUDA memory) over a block (notebooks
    01, 03, 05, 06)::

        with bench.PeakMemory() as mem:
            out = model.generate(...)
        mem.peak_rss_bytes, mem.peak_rss_delta_bytes, mem.peak_cuda_bytes

    A daemon thread samples RSS every ``interval_s`` (5 ms); a last sample is taken on
    exit. Spikes shorter than the interval can be missed. ``pid``/``include_children``
    measure another process (tree), e.g. an inference server (notebook 05).

    CUDA (``cuda=None`` means: when torch is already imported and CUDA is available):
    ``torch.cuda.reset_peak_memory_stats()`` on entry, ``max_memory_allocated()`` (tensors)
    and ``max_memory_reserved()`` (allocator cache, closer to ``nvidia-smi``) on exit.
    Resetting is global, so nested PeakMemory blocks disturb the outer CUDA peak.
    """

    def __init__(
        self,
        interval_s: float = 0.005,
        *,
        pid: int | None = None,
        include_children: bool = False,
        cuda: bool | None = None,
    ) -> None:
        self.interval_s = interval_s
        self.pid = pid
        self.include_children = include_children
        self.cuda = cuda
        self.start_rss_bytes: int | None = None
        self.peak_rss_bytes: int | None = None
        self.end_rss_bytes: int | None = None
        self.peak_cuda_bytes: int | None = None
        self.peak_cuda_reserved_bytes: int | None = None
        self.samples = 0
        self._read: Callable[[], int] = self._make_reader()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._torch: Any = None

    def _make_reader(self) -> Callable[[], int]:
        if self.include_children:
            pid = self.pid if self.pid is not None else os.getpid()
            return lambda: process_tree_rss_bytes(pid)
        try:
            import psutil
        except ImportError:
            where: int | str = "self" if self.pid is None else self.pid
            return lambda: _rss_from_proc(where)
        proc = psutil.Process(self.pid)
        return lambda: int(proc.memory_info().rss)

    def _sample(self) -> None:
        try:
            value = self._read()
        except Exception:  # the measured process may have exited
            return
        self.samples += 1
        if self.peak_rss_bytes is None or value > self.peak_rss_bytes:
            self.peak_rss_bytes = value

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        torch = sys.modules.get("torch")
        use_cuda = self.cuda
        if use_cuda is None:
            use_cuda = torch is not None and torch.cuda.is_available()
        if use_cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
            self._torch = torch
        self.samples = 0
        self.start_rss_bytes = self._read()
        self.peak_rss_bytes = self.start_rss_bytes
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="PeakMemory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        try:
            self.end_rss_bytes = self._read()
        except Exception:
            self.end_rss_bytes = None
        if self._torch is not None:
            self.peak_cuda_bytes = int(self._torch.cuda.max_memory_allocated())
            self.peak_cuda_reserved_bytes = int(self._torch.cuda.max_memory_reserved())

    @property
    def peak_rss_delta_bytes(self) -> int | None:
        """Peak RSS minus RSS at entry: what the block added at its worst."""
        if self.peak_rss_bytes is None or self.start_rss_bytes is None:
            return None
        return self.peak_rss_bytes - self.start_rss_bytes


# --------------------------------------------------------------------------------------
# Streamed HTTP timing
# --------------------------------------------------------------------------------------


def _is_rejected_option(exc: Exception) -> bool:
    return type(exc).__name__ in ("BadRequestError", "UnprocessableEntityError")


def time_openai_stream(
    client: Any,
    model: str,
    messages: Sequence[Mapping[str, Any]],
    max_tokens: int = 128,
    label: str = "",
    *,
    include_usage: bool = True,
    clock: Clock = time.perf_counter,
    **create_kwargs: Any,
) -> GenerationResult:
    """Time one streamed chat completion from an OpenAI-compatible server (notebooks 05,
    06). ``client`` is a sync ``openai.OpenAI`` (``base_url`` pointing at vLLM, llama.cpp,
    ...); ``create_kwargs`` go to ``client.chat.completions.create`` (e.g.
    ``temperature=0``).

    The clock starts just before the request, so TTFT includes the HTTP round trip and
    the server's queueing and prefill. TTFT is taken at the first chunk carrying
    non-empty text (answer ``content``, or ``reasoning_content``/``reasoning`` from a
    reasoning parser: both are generated tokens). With ``include_usage`` the request asks
    for ``stream_options={"include_usage": True}`` (retried without it if the client or
    server rejects it) and the token count comes from the final usage chunk; otherwise
    text chunks are counted (servers usually send one token per chunk, but may batch).
    ``decode_tokens_per_s`` assumes the first text chunk holds one token.
    The answer text is in ``result.text``; ``extra`` holds ``chunks``,
    ``token_count_source`` and ``finish_reason``.
    """
    kwargs: dict[str, Any] = dict(
        model=model, messages=list(messages), max_tokens=max_tokens, stream=True
    )
    kwargs.update(create_kwargs)
    if include_usage:
        kwargs.setdefault("stream_options", {"include_usage": True})
    start = clock()
    try:
        stream = client.chat.completions.create(**kwargs)
    except Exception as exc:
        if "stream_options" not in kwargs or not (
            isinstance(exc, TypeError) or _is_rejected_option(exc)
        ):
            raise
        kwargs.pop("stream_options")
        start = clock()
        stream = client.chat.completions.create(**kwargs)

    times: list[float] = []
    pieces: list[str] = []
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    for chunk in stream:
        now = clock()
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            completion_tokens = getattr(usage, "completion_tokens", completion_tokens)
            prompt_tokens = getattr(usage, "prompt_tokens", prompt_tokens)
        for choice in getattr(chunk, "choices", None) or []:
            delta = getattr(choice, "delta", None)
            content = getattr(delta, "content", None) or ""
            reasoning = (
                getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
            ) or ""
            if content or reasoning:
                times.append(now)
                pieces.append(content)
            if getattr(choice, "finish_reason", None):
                finish_reason = choice.finish_reason
    end = clock()

    new_tokens = completion_tokens if completion_tokens is not None else len(times)
    ttft, decode, total, e2e = _rates(start, times, end, new_tokens)
    return GenerationResult(
        label=label,
        new_tokens=new_tokens,
        ttft_s=ttft,
        decode_tokens_per_s=decode,
        total_s=total,
        e2e_tokens_per_s=e2e,
        prompt_tokens=prompt_tokens,
        extra={
            "chunks": len(times),
            "token_count_source": "usage" if completion_tokens is not None else "chunks",
            "finish_reason": finish_reason,
        },
        text="".join(pieces),
    )


# --------------------------------------------------------------------------------------
# Tables and charts
# --------------------------------------------------------------------------------------


def to_frame(rows: Iterable[GenerationResult | RepeatedResult | Mapping[str, Any]]) -> Any:
    """A pandas DataFrame with one row per result (notebooks 01, 03, 05, 06). Accepts
    :class:`GenerationResult`, :class:`RepeatedResult` (its median) or plain dicts."""
    import pandas as pd

    flat = []
    for row in rows:
        if isinstance(row, (GenerationResult, RepeatedResult)):
            flat.append(row.as_row())
        else:
            flat.append(dict(row))
    return pd.DataFrame(flat)


_METRIC_TITLES = {
    "decode_tokens_per_s": "decode tokens/s (higher is better)",
    "e2e_tokens_per_s": "end-to-end tokens/s (higher is better)",
    "ttft_s": "time to first token, s (lower is better)",
    "total_s": "total time, s (lower is better)",
    "peak_rss_gb": "peak RSS, GB (lower is better)",
    "peak_cuda_gb": "peak CUDA memory, GB (lower is better)",
    "percent_of_roofline": "% of bandwidth roofline",
}


def plot_results(
    df: Any,
    x: str = "label",
    metrics: Sequence[str] = ("decode_tokens_per_s", "ttft_s", "peak_rss_gb"),
    title: str | None = None,
) -> Any:
    """Bar chart, one subplot per metric, values written on the bars (notebooks 01, 03,
    05, 06). ``df``: a DataFrame from :func:`to_frame` (a list of results also works).
    Returns the matplotlib Figure; assign it (``fig = bench.plot_results(df)``) and save
    it with ``fig.savefig(...)`` so Jupyter shows it once. Works on the Agg backend."""
    import matplotlib.pyplot as plt
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        df = to_frame(df)
    missing = [m for m in (x, *metrics) if m not in df.columns]
    if missing:
        raise ValueError(f"columns {missing} not in the table; it has {list(df.columns)}")
    if not metrics:
        raise ValueError("metrics is empty")
    n = len(metrics)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    labels = [str(v) for v in df[x]]
    for i, (ax, metric) in enumerate(zip(axes[0], metrics, strict=True)):
        values = pd.to_numeric(df[metric], errors="coerce")
        bars = ax.bar(labels, values.fillna(0.0), color=f"C{i}")
        ax.bar_label(bars, labels=["" if pd.isna(v) else f"{v:.3g}" for v in values])
        ax.set_title(_METRIC_TITLES.get(metric, metric), fontsize=10)
        ax.tick_params(axis="x", labelrotation=20)
        ax.margins(y=0.15)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------
# Bandwidth and roofline
# --------------------------------------------------------------------------------------


@dataclass
class BandwidthResult:
    """Sustained main-memory bandwidth from :func:`memory_bandwidth_gbps` (decimal GB/s).

    ``read_gbps`` is what the decode roofline uses (``bytes_per_s``): decoding one token
    streams every weight from memory once, a read-dominated access pattern.
    ``copy_gbps`` counts read + write bytes (2 x array size) and ignores write-allocate
    traffic, so it usually comes out lower.
    """

    read_gbps: float
    copy_gbps: float
    size_mb: float
    repeats: int
    threads: int
    backend: str
    read_samples_gbps: list[float] = field(default_factory=list, repr=False)
    copy_samples_gbps: list[float] = field(default_factory=list, repr=False)

    @property
    def bytes_per_s(self) -> float:
        """Read bandwidth in bytes/s, the input of :func:`roofline_tokens_per_s`."""
        return self.read_gbps * GB


def _last_level_cache_bytes() -> int | None:
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    best = None
    try:
        for index in base.glob("index*"):
            text = (index / "size").read_text().strip()
            units = {"K": 1024, "M": 1024**2, "G": 1024**3}
            size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
            best = size if best is None or size > best else best
    except (OSError, ValueError):
        return None
    return best


def memory_bandwidth_gbps(
    size_mb: float = 256,
    repeats: int = 5,
    threads: int | None = None,
    *,
    backend: str = "auto",
) -> BandwidthResult:
    """Measure sustained main-memory bandwidth in GB/s (notebooks 01, 03, 06).

    Sums a float32 array of ``size_mb`` MiB (bytes read = array size) and copies it into
    a second array (bytes moved = 2 x size), after one warm-up pass; reports the median of
    ``repeats`` timings. The array must be much larger than the last-level cache or the
    cache is measured instead (a warning is issued below 4x the LLC size).

    ``backend``: "torch" (multi-threaded reductions; ``threads`` sets
    ``torch.set_num_threads`` for the measurement, default ``torch.get_num_threads()``),
    "numpy" (one thread; its pairwise float sum can be compute-bound and read low) or
    "auto" (torch if importable). A single core often cannot
    saturate the memory bus, so compare bandwidth and decode speed at the same thread
    count; the result reports ``threads``. Use ``result.bytes_per_s`` (read bandwidth) for
    :func:`roofline_tokens_per_s`. Takes well under 3 s at the defaults.
    """
    if size_mb <= 0 or repeats < 1:
        raise ValueError("size_mb must be > 0 and repeats >= 1")
    nbytes_wanted = int(size_mb * 1024 * 1024)
    llc = _last_level_cache_bytes()
    if llc and nbytes_wanted < 4 * llc:
        warnings.warn(
            f"array of {human_bytes(nbytes_wanted)} is not much larger than the "
            f"{human_bytes(llc)} last-level cache: the result partly measures the cache",
            stacklevel=2,
        )
    n = max(1, nbytes_wanted // 4)

    if backend == "auto":
        try:
            import torch  # noqa: F401

            backend = "torch"
        except ImportError:
            backend = "numpy"

    def timed(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    if backend == "torch":
        import torch

        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            used = torch.get_num_threads()
            src = torch.ones(n, dtype=torch.float32)
            dst = torch.zeros(n, dtype=torch.float32)
            nbytes = src.numel() * src.element_size()
            read_fn: Callable[[], Any] = lambda: float(src.sum())  # noqa: E731
            copy_fn: Callable[[], Any] = lambda: dst.copy_(src)  # noqa: E731
            read_fn()
            copy_fn()
            read_t = [timed(read_fn) for _ in range(repeats)]
            copy_t = [timed(copy_fn) for _ in range(repeats)]
        finally:
            torch.set_num_threads(previous)
    elif backend == "numpy":
        import numpy as np

        if threads not in (None, 1):
            raise ValueError("the numpy backend runs on one thread; use backend='torch'")
        used = 1
        src_np = np.ones(n, dtype=np.float32)
        dst_np = np.zeros(n, dtype=np.float32)
        nbytes = src_np.nbytes
        read_fn = lambda: float(np.add.reduce(src_np))  # noqa: E731
        copy_fn = lambda: np.copyto(dst_np, src_np)  # noqa: E731
        read_fn()
        copy_fn()
        read_t = [timed(read_fn) for _ in range(repeats)]
        copy_t = [timed(copy_fn) for _ in range(repeats)]
    else:
        raise ValueError(f"backend must be 'auto', 'torch' or 'numpy', not {backend!r}")

    read_samples = [nbytes / t / GB for t in read_t]
    copy_samples = [2 * nbytes / t / GB for t in copy_t]
    return BandwidthResult(
        read_gbps=statistics.median(read_samples),
        copy_gbps=statistics.median(copy_samples),
        size_mb=nbytes / (1024 * 1024),
        repeats=repeats,
        threads=used,
        backend=backend,
        read_samples_gbps=read_samples,
        copy_samples_gbps=copy_samples,
    )


def decode_bytes_per_token(
    weight_bytes: int,
    *,
    num_layers: int = 0,
    num_kv_heads: int = 0,
    head_dim: int = 0,
    context_tokens: int = 0,
    kv_bytes_per_elem: float = 2,
) -> int:
    """Bytes read from memory to decode one token of one sequence (notebooks 01, 03, 06):
    all weights once, plus the KV cache of the context so far,
    ``2 (K and V) x layers x kv_heads x head_dim x context x kv_bytes_per_elem``
    (2 bytes for an fp16/bf16 cache). Accepts ``**kv_geometry(config)``. Ignores
    activations and the embedding rows not read (a lookup reads one row, the tied LM
    head reads them all)."""
    values = (weight_bytes, num_layers, num_kv_heads, head_dim, context_tokens)
    if min(values) < 0 or kv_bytes_per_elem < 0:
        raise ValueError("sizes must be non-negative")
    kv = 2 * num_layers * num_kv_heads * head_dim * context_tokens * kv_bytes_per_elem
    return int(weight_bytes + kv)


def roofline_tokens_per_s(bandwidth_bytes_per_s: float, bytes_per_token: float) -> float:
    """Upper bound on single-stream decode speed when memory bandwidth is the limit:
    ``bandwidth / bytes_per_token`` (notebooks 01, 03, 06). With a batch, the weights are
    read once per step for all sequences, so the aggregate bound is higher."""
    if bytes_per_token <= 0:
        raise ValueError("bytes_per_token must be > 0")
    return bandwidth_bytes_per_s / bytes_per_token


def percent_of_roofline(measured_tps: float, roofline_tps: float) -> float:
    """Measured decode rate as a percentage of the roofline (notebooks 01, 03, 06)."""
    if roofline_tps <= 0:
        raise ValueError("roofline_tps must be > 0")
    return 100.0 * measured_tps / roofline_tps


def model_weight_bytes(model: Any) -> int:
    """Bytes held by a torch module's parameters and buffers (notebooks 01, 03, 06).

    Buffers count because quantized layers keep their packed weights there (GPTQ:
    ``qweight``, ``qzeros``, ``scales``, ``g_idx``). Tensors sharing storage (tied
    embeddings / LM head) count once, keyed by device and ``data_ptr``. Small
    non-weight buffers (rotary ``inv_freq``) are included; they are negligible.
    """
    seen: dict[Any, int] = {}
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False)]
    for tensor in tensors:
        if tensor is None:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        ptr = tensor.data_ptr() if tensor.device.type != "meta" else 0
        key = (str(tensor.device), ptr) if ptr else ("id", id(tensor))
        seen[key] = max(seen.get(key, 0), nbytes)
    return int(sum(seen.values()))


def streamed_weight_bytes(model: Any) -> int:
    """Bytes one decode step reads from memory for the weights of a loaded model: its
    parameters and buffers (:func:`model_weight_bytes`) less the rotary position tables (one
    row read per step; transformers 4.37 keeps a float32 table in every layer) and less the
    input embedding table when the LM head does not share it (a lookup reads one row; the LM
    head reads all of its own). The input of the roofline (notebooks 03, 06)."""
    total = model_weight_bytes(model)
    seen: set[int] = set()
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            for buf in module.buffers(recurse=False):
                if buf.data_ptr() not in seen:
                    seen.add(buf.data_ptr())
                    total -= buf.numel() * buf.element_size()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and head is not None and emb.weight.data_ptr() != head.weight.data_ptr():
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def _config_get(config: Any, name: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def kv_geometry(config: Any) -> dict[str, int]:
    """``num_layers``, ``num_kv_heads`` and ``head_dim`` of a HF config object or dict
    (notebooks 01, 03, 06), ready for ``decode_bytes_per_token(..., **kv_geometry(cfg))``.

    Falls back as HF models do: ``num_key_value_heads`` missing means no GQA
    (``num_attention_heads``); ``head_dim`` missing means ``hidden_size //
    num_attention_heads``. Qwen3 sets ``head_dim`` explicitly and it differs from that
    ratio, so the explicit value wins. Multimodal configs are read from ``text_config``.
    """
    if _config_get(config, "num_hidden_layers") is None:
        text_config = _config_get(config, "text_config")
        if text_config is not None:
            config = text_config
    num_layers = _config_get(config, "num_hidden_layers")
    heads = _config_get(config, "num_attention_heads")
    if num_layers is None or heads is None:
        raise ValueError("config needs num_hidden_layers and num_attention_heads")
    kv_heads = _config_get(config, "num_key_value_heads") or heads
    head_dim = _config_get(config, "head_dim")
    if not head_dim:
        hidden = _config_get(config, "hidden_size")
        if hidden is None:
            raise ValueError("config needs head_dim or hidden_size")
        head_dim = hidden // heads
    return {"num_layers": int(num_layers), "num_kv_heads": int(kv_heads), "head_dim": int(head_dim)}


# --------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------


#: File endings of model weights (``dir_size_bytes(folder, WEIGHT_FILES)``: weights only).
WEIGHT_FILES = (".safetensors", ".bin")


def dir_size_bytes(path: str | os.PathLike[str], suffixes: Sequence[str] | None = None) -> int:
    """Size on disk of a model folder (notebooks 01, 02, 03, 05, 06). Symlinked files are
    resolved and their targets counted (the HF cache links snapshot files to blobs); a
    file reached twice (two links, hard links) counts once; broken links are skipped.
    ``suffixes``: count only files with these endings (:data:`WEIGHT_FILES`: the weights,
    not the tokenizer)."""
    root = Path(path)
    if root.is_file():
        return root.stat().st_size
    if not root.is_dir():
        raise FileNotFoundError(path)
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if suffixes is not None and not name.endswith(tuple(suffixes)):
                continue
            try:
                st = os.stat(os.path.join(dirpath, name))  # follows symlinks
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            total += st.st_size
    return total


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``: binary units with IEC suffixes (notebooks 01, 03, 05,
    06)."""
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{sign}{int(value)} B" if unit == "B" else f"{sign}{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
