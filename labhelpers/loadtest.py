"""Load test an OpenAI-compatible server on this machine (notebooks 05 and 06): per concurrency
level, ``requests`` streamed chat completions through ``openai.AsyncOpenAI`` with at most
``concurrency`` in flight; aggregate output tokens/s, TTFT and end-to-end latency at p50/p95,
errors. Bounded by design: loopback addresses only, a time budget per level, a timeout per
request. For real benchmarks of a vLLM server use ``vllm bench serve``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from labhelpers.measure import stream_piece, to_frame

DEFAULT_PROMPTS = (
    "Explain what a KV cache is in two sentences.",
    "Write a short poem about the sea.",
    "List three uses of a hash table.",
    "What is the difference between a process and a thread?",
    "Describe how a bicycle works.",
    "Give me three tips for writing clear documentation.",
    "Why is the sky blue?",
    "Summarize the plot of a detective story you invent.",
)


@dataclass
class _Request:
    """One request, in seconds on the level's clock; ``first_token_s``: the first text;
    ``completion_tokens`` from the usage report (else text chunks)."""

    start_s: float
    end_s: float
    first_token_s: float | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class LevelResult:
    """One concurrency level. ``aggregate_tokens_per_s``: output tokens of the successful
    requests / the level's wall time (what the server delivered to everyone together);
    ``per_request_tokens_per_s_p50``: what one user sees."""

    concurrency: int
    requests: int
    ok: int
    errors: int
    wall_s: float
    output_tokens: int
    aggregate_tokens_per_s: float | None
    per_request_tokens_per_s_p50: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    e2e_p50_s: float | None
    e2e_p95_s: float | None
    first_error: str | None = None
    records: list[_Request] = field(default_factory=list, repr=False)

    def as_row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "records"}


def _summarize(
    concurrency: int, records: Sequence[_Request], wall_s: float | None = None
) -> LevelResult:
    """One level's numbers (``wall_s``: default last end minus first start); percentiles are
    numpy's (linear between closest ranks)."""
    import numpy as np

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    if wall_s is None:
        wall_s = max(r.end_s for r in records) - min(r.start_s for r in records) if records else 0.0
    good = [r for r in records if r.error is None]
    tokens = sum(r.completion_tokens for r in good)
    ttfts = [r.first_token_s - r.start_s for r in good if r.first_token_s is not None]
    e2es = [r.end_s - r.start_s for r in good]
    per_request = [r.completion_tokens / (r.end_s - r.start_s) for r in good if r.end_s > r.start_s]
    errors = [r.error for r in records if r.error is not None]
    return LevelResult(
        concurrency, len(records), len(good), len(errors), wall_s, tokens,
        tokens / wall_s if wall_s > 0 and good else None, pct(per_request, 50),
        pct(ttfts, 50), pct(ttfts, 95), pct(e2es, 50), pct(e2es, 95),
        errors[0] if errors else None, list(records),
    )  # fmt: skip


def _check_loopback(base_url: str) -> None:
    """A load test against someone else's server is an attack: loopback only."""
    host = urllib.parse.urlsplit(base_url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"load tests only target loopback addresses (127.0.0.1, ::1, localhost), not {host!r}"
        )


async def _run_level(client: Any, model: str, concurrency: int, requests: int, *,
                     prompts: Sequence[str] = DEFAULT_PROMPTS, max_tokens: int = 64,
                     level_budget_s: float = 60, **create_kwargs: Any) -> LevelResult:  # fmt: skip
    """``requests`` streamed chat requests, ``concurrency`` at a time; none starts after
    ``level_budget_s``. Prompt i is ``prompts[i % len(prompts)]``."""
    if not 1 <= concurrency <= 64 or not 1 <= requests <= 256 or not prompts:
        raise ValueError("need 1 <= concurrency <= 64, 1 <= requests <= 256 and some prompts")
    t0, next_index, records = time.perf_counter(), 0, []

    async def one(prompt: str) -> _Request:
        start, first, chunks, usage = time.perf_counter() - t0, None, 0, None
        try:
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                stream=True, stream_options={"include_usage": True}, **create_kwargs,
            )  # fmt: skip
            async for chunk in stream:
                _text, generated, chunk_usage, _finish = stream_piece(chunk)
                usage = chunk_usage or usage
                if generated:
                    chunks += 1
                    first = first if first is not None else time.perf_counter() - t0
        except Exception as exc:  # a failed request is a data point of the load test
            return _Request(
                start, time.perf_counter() - t0, first, 0, f"{type(exc).__name__}: {exc}"
            )
        tokens = usage.completion_tokens if usage is not None else chunks
        return _Request(start, time.perf_counter() - t0, first, tokens)

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests and time.perf_counter() - t0 < level_budget_s:
            next_index += 1
            records.append(await one(prompts[(next_index - 1) % len(prompts)]))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return _summarize(concurrency, records, time.perf_counter() - t0)


def sweep(base_url: str, model: str, concurrencies: Sequence[int] = (1, 2, 4, 8), *,
          requests_per_level: int | Callable[[int], int] = lambda c: 2 * c, max_tokens: int = 64,
          prompts: Sequence[str] = DEFAULT_PROMPTS, api_key: str = "EMPTY",
          warmup_requests: int = 1, level_budget_s: float = 60, request_timeout_s: float = 120,
          log: Callable[[str], Any] | None = print,
          **create_kwargs: Any) -> list[LevelResult]:  # fmt: skip
    """Each concurrency level against ``base_url`` (the ``/v1`` URL of a loopback server).
    ``requests_per_level``: a number or a function of the concurrency (default 2x).
    ``temperature=0`` and, for vLLM, ``extra_body={"ignore_eos": True}`` in ``create_kwargs``
    make every answer exactly ``max_tokens`` long. Works inside Jupyter (its event loop is
    already running there: the sweep then runs in a helper thread)."""
    _check_loopback(base_url)
    count = requests_per_level if callable(requests_per_level) else (lambda _c: requests_per_level)
    kw: Mapping[str, Any] = dict(
        prompts=prompts, max_tokens=max_tokens, level_budget_s=level_budget_s
    )

    async def main() -> list[LevelResult]:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=request_timeout_s, max_retries=0
        )
        async with client:
            if warmup_requests:
                await _run_level(client, model, 1, warmup_requests, **kw, **create_kwargs)
            results = []
            for c in concurrencies:
                level = await _run_level(
                    client, model, int(c), int(count(c)), **kw, **create_kwargs
                )
                results.append(level)
                if log is not None:
                    log(_line(level))
            return results

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(main())
    box: dict[str, Any] = {}

    def in_thread() -> None:
        try:
            box["result"] = asyncio.run(main())
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


def _line(r: LevelResult) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    return (f"concurrency {r.concurrency:>3}: {r.ok}/{r.requests} ok, "
            f"{fmt(r.aggregate_tokens_per_s, '.1f')} tok/s aggregate, TTFT p50 "
            f"{fmt(r.ttft_p50_s, '.2f')} s, e2e p50 {fmt(r.e2e_p50_s, '.2f')} s"
            + (f", {r.errors} error(s): {r.first_error}" if r.errors else ""))  # fmt: skip


def plot_sweep(df: Any, *, by: str | None = None, baselines: Mapping[str, float] | None = None,
               title: str | None = None) -> Any:  # fmt: skip
    """Aggregate tokens/s, TTFT p50/p95 and end-to-end latency p50/p95 against concurrency, one
    line per value of column ``by``; ``baselines``: dotted lines (label -> tokens/s) on the
    throughput panel, in the color of the group whose name the label contains."""
    import matplotlib.pyplot as plt
    import pandas as pd

    df = df if isinstance(df, pd.DataFrame) else to_frame(df)
    groups = list(df.groupby(by, sort=False)) if by else [("", df)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colors = {}
    for i, (name, part) in enumerate(groups):
        color, label, part = f"C{i}", f"{name} " if name else "", part.sort_values("concurrency")
        colors[str(name)], x = color, part["concurrency"]
        axes[0].plot(x, part["aggregate_tokens_per_s"], "o-", color=color, label=label or None)
        for ax, metric in ((axes[1], "ttft"), (axes[2], "e2e")):
            ax.plot(x, part[f"{metric}_p50_s"], "o-", color=color, label=f"{label}p50")
            ax.plot(x, part[f"{metric}_p95_s"], "s--", color=color, alpha=0.6, label=f"{label}p95")
    for j, (name, value) in enumerate((baselines or {}).items()):
        color = next((c for g, c in colors.items() if g and g in name), f"C{len(groups) + j}")
        axes[0].axhline(value, color=color, linestyle=":", label=name)
    levels = sorted(df["concurrency"].unique())
    titles = ("aggregate output tokens/s (higher is better)", "time to first token, s (lower is "
              "better)", "end-to-end latency, s (lower is better)")  # fmt: skip
    for ax, text in zip(axes, titles, strict=True):
        ax.set_title(text, fontsize=10)
        ax.set(xlabel="concurrent requests", ylim=(0, None))
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
