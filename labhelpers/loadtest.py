"""Load test an OpenAI-compatible server: concurrent streamed chat requests, swept over
concurrency levels, summarized as throughput and latency percentiles.

Used by notebook 05_vllm_serving (and 04_tensorrt_llm for ``trtllm-serve``). Each level
runs ``requests`` chat completions through the ``openai`` async client with at most
``concurrency`` in flight (a closed loop: a new request starts when one finishes). Per
level it reports aggregate output tokens/s, time to first token (TTFT) and end-to-end
latency at p50/p95, and errors.

Bounded by design: a level stops *starting* requests after ``level_budget_s`` seconds,
every request has a timeout, the request count per level is capped, and only loopback
addresses (127.0.0.0/8, ::1, localhost) may be targeted.

The arithmetic (:func:`percentile`, :func:`summarize`) is plain Python and unit-tested;
pandas, matplotlib and openai are imported inside the functions that use them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import threading
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

__all__ = [
    "DEFAULT_PROMPTS",
    "LevelResult",
    "RequestRecord",
    "check_loopback",
    "percentile",
    "plot_sweep",
    "run_level",
    "summarize",
    "sweep",
    "to_frame",
]

MAX_REQUESTS_PER_LEVEL = 256
MAX_CONCURRENCY = 64

DEFAULT_PROMPTS: tuple[str, ...] = (
    "Explain what a KV cache is in two sentences.",
    "Write a short poem about the sea.",
    "List three uses of a hash table.",
    "What is the difference between a process and a thread?",
    "Describe how a bicycle works.",
    "Give me three tips for writing clear documentation.",
    "Why is the sky blue?",
    "Summarize the plot of a detective story you invent.",
)

T = TypeVar("T")
Clock = Callable[[], float]


# --------------------------------------------------------------------------------------
# Records and arithmetic
# --------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request of a load test. Times are seconds on the level's clock.

    ``first_token_s`` is when the first chunk carrying text arrived (None if none did);
    ``completion_tokens`` comes from the server's usage report (else the number of text
    chunks); ``error`` holds ``"ExceptionType: message"`` for a failed request."""

    start_s: float
    end_s: float
    first_token_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.start_s

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation between the closest
    ranks (numpy's default method); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError("q must be between 0 and 100")
    data = sorted(values)
    if not data:
        return None
    pos = (len(data) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


@dataclass
class LevelResult:
    """Summary of one concurrency level (notebooks 04, 05).

    ``aggregate_tokens_per_s``: output tokens of successful requests divided by the
    level's wall time (first request sent to last answer received) — what the server
    delivered to all clients together. ``per_request_tokens_per_s_p50``: median of each
    request's own ``completion_tokens / e2e_s`` — what one user sees."""

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
    error_samples: list[str] = field(default_factory=list)
    records: list[RequestRecord] = field(default_factory=list, repr=False)

    def as_row(self) -> dict[str, Any]:
        """Flat dict for a table (records left out, first error kept)."""
        row = {k: v for k, v in asdict(self).items() if k not in ("records", "error_samples")}
        row["first_error"] = self.error_samples[0] if self.error_samples else None
        return row


def summarize(
    concurrency: int, records: Sequence[RequestRecord], wall_s: float | None = None
) -> LevelResult:
    """Aggregate one level's records. ``wall_s`` defaults to last end minus first start."""
    if wall_s is None:
        wall_s = max(r.end_s for r in records) - min(r.start_s for r in records) if records else 0.0
    good = [r for r in records if r.ok]
    tokens = sum(r.completion_tokens for r in good)
    ttfts = [r.ttft_s for r in good if r.ttft_s is not None]
    e2es = [r.e2e_s for r in good]
    per_request = [r.completion_tokens / r.e2e_s for r in good if r.e2e_s > 0]
    errors = [r.error for r in records if r.error is not None]
    return LevelResult(
        concurrency=concurrency,
        requests=len(records),
        ok=len(good),
        errors=len(errors),
        wall_s=wall_s,
        output_tokens=tokens,
        aggregate_tokens_per_s=tokens / wall_s if wall_s > 0 and good else None,
        per_request_tokens_per_s_p50=percentile(per_request, 50),
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p95_s=percentile(ttfts, 95),
        e2e_p50_s=percentile(e2es, 50),
        e2e_p95_s=percentile(e2es, 95),
        error_samples=list(dict.fromkeys(errors))[:3],
        records=list(records),
    )


# --------------------------------------------------------------------------------------
# Running requests
# --------------------------------------------------------------------------------------


def check_loopback(base_url: str) -> None:
    """Raise ValueError unless ``base_url`` points at this machine (load tests never
    target other hosts)."""
    host = urllib.parse.urlsplit(base_url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(
        f"load tests only target loopback addresses (127.0.0.1, ::1, localhost), not "
        f"{host!r}: a load test against someone else's server is an attack"
    )


async def _one_request(
    client: Any,
    model: str,
    messages: list[dict[str, Any]],
    max_tokens: int,
    clock: Clock,
    create_kwargs: Mapping[str, Any],
) -> RequestRecord:
    start = clock()
    first: float | None = None
    chunks = 0
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
            **create_kwargs,
        )
        async for chunk in stream:
            usage = getattr(chunk, "usage", None)
            if usage is not None:
                usage_tokens = getattr(usage, "completion_tokens", usage_tokens)
                prompt_tokens = getattr(usage, "prompt_tokens", prompt_tokens)
            for choice in getattr(chunk, "choices", None) or []:
                delta = getattr(choice, "delta", None)
                text = (getattr(delta, "content", None) or "") or (
                    getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
                )
                if text:
                    chunks += 1
                    if first is None:
                        first = clock()
    except Exception as exc:  # any failure is a data point of the load test
        return RequestRecord(start, clock(), first, 0, None, f"{type(exc).__name__}: {exc}")
    tokens = usage_tokens if usage_tokens is not None else chunks
    return RequestRecord(start, clock(), first, tokens, prompt_tokens)


async def run_level(
    client: Any,
    model: str,
    concurrency: int,
    requests: int,
    *,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_tokens: int = 64,
    level_budget_s: float = 60,
    clock: Clock = time.perf_counter,
    **create_kwargs: Any,
) -> LevelResult:
    """Send ``requests`` streamed chat requests, ``concurrency`` at a time, through an
    ``openai.AsyncOpenAI`` ``client``; no new request starts after ``level_budget_s``.
    Prompt i is ``prompts[i % len(prompts)]``; ``create_kwargs`` go to
    ``chat.completions.create`` (e.g. ``temperature=0``, ``extra_body=...``)."""
    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise ValueError(f"concurrency must be between 1 and {MAX_CONCURRENCY}")
    if not 1 <= requests <= MAX_REQUESTS_PER_LEVEL:
        raise ValueError(f"requests must be between 1 and {MAX_REQUESTS_PER_LEVEL}")
    if not prompts:
        raise ValueError("prompts is empty")
    next_index = 0
    records: list[RequestRecord] = []
    t0 = clock()

    async def worker() -> None:
        nonlocal next_index
        while next_index < requests and clock() - t0 < level_budget_s:
            i = next_index
            next_index += 1
            messages = [{"role": "user", "content": prompts[i % len(prompts)]}]
            records.append(
                await _one_request(client, model, messages, max_tokens, clock, create_kwargs)
            )

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(concurrency, records, clock() - t0)


def _run_async(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, also inside Jupyter (whose event loop
    is already running in this thread): then it runs on a fresh loop in a helper thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(make())
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name="loadtest")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def sweep(
    base_url: str,
    model: str,
    concurrencies: Sequence[int] = (1, 2, 4, 8),
    *,
    requests_per_level: int | Callable[[int], int] = lambda c: 2 * c,
    max_tokens: int = 64,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    api_key: str = "EMPTY",
    warmup_requests: int = 1,
    level_budget_s: float = 60,
    request_timeout_s: float = 120,
    log: Callable[[str], None] | None = print,
    **create_kwargs: Any,
) -> list[LevelResult]:
    """Run :func:`run_level` for each concurrency (notebooks 04, 05) against the server
    at ``base_url`` (its ``/v1`` URL, e.g. ``server.openai_base_url``; loopback only).

    ``requests_per_level``: a number, or a function of the concurrency (default 2x, so
    every slot serves at least two requests). ``warmup_requests`` untimed requests go
    first. ``create_kwargs`` go to every request: ``temperature=0`` and, for vLLM,
    ``extra_body={"ignore_eos": True}`` make every answer exactly ``max_tokens`` long.
    Prints one line per level unless ``log`` is None."""
    check_loopback(base_url)
    levels = [int(c) for c in concurrencies]
    if not levels:
        raise ValueError("concurrencies is empty")

    def count(c: int) -> int:
        n = requests_per_level(c) if callable(requests_per_level) else requests_per_level
        return int(n)

    async def main() -> list[LevelResult]:
        from openai import AsyncOpenAI

        results = []
        async with AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=request_timeout_s, max_retries=0
        ) as client:
            if warmup_requests:
                await run_level(
                    client,
                    model,
                    1,
                    warmup_requests,
                    prompts=prompts,
                    max_tokens=max_tokens,
                    level_budget_s=level_budget_s,
                    **create_kwargs,
                )
            for c in levels:
                result = await run_level(
                    client,
                    model,
                    c,
                    count(c),
                    prompts=prompts,
                    max_tokens=max_tokens,
                    level_budget_s=level_budget_s,
                    **create_kwargs,
                )
                if log is not None:
                    log(_level_line(result))
                results.append(result)
        return results

    return _run_async(main)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _level_line(r: LevelResult) -> str:
    return (
        f"concurrency {r.concurrency:>3}: {r.ok}/{r.requests} ok, "
        f"{_fmt(r.aggregate_tokens_per_s, '.1f')} tok/s aggregate, "
        f"TTFT p50 {_fmt(r.ttft_p50_s, '.2f')} s, e2e p50 {_fmt(r.e2e_p50_s, '.2f')} s"
        + (f", {r.errors} error(s): {r.error_samples[0]}" if r.errors else "")
    )


# --------------------------------------------------------------------------------------
# Tables and charts
# --------------------------------------------------------------------------------------


def to_frame(levels: Sequence[LevelResult], **columns: Any) -> Any:
    """A pandas DataFrame, one row per level; ``columns`` are added as constant columns
    (e.g. ``model="GPTQ-Int4"``) so several sweeps can be concatenated."""
    import pandas as pd

    df = pd.DataFrame([lvl.as_row() for lvl in levels])
    for name, value in columns.items():
        df[name] = value
    return df


def plot_sweep(
    df: Any,
    *,
    by: str | None = None,
    baselines: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Any:
    """Three panels against concurrency: aggregate tokens/s, TTFT p50/p95, end-to-end
    latency p50/p95 (notebooks 04, 05). ``df``: :func:`to_frame` output or a list of
    :class:`LevelResult`; ``by``: a column whose values get one line each (e.g. "model");
    ``baselines``: horizontal dotted lines on the throughput panel, label -> tokens/s; a
    label containing a group's name is drawn in that group's color. Returns the Figure."""
    import matplotlib.pyplot as plt
    import pandas as pd

    if not isinstance(df, pd.DataFrame):
        df = to_frame(df)
    groups = list(df.groupby(by, sort=False)) if by else [(None, df)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, (name, part) in enumerate(groups):
        color = f"C{i}"
        part = part.sort_values("concurrency")
        label = "" if name is None else f"{name} "
        x = part["concurrency"]
        axes[0].plot(x, part["aggregate_tokens_per_s"], "o-", color=color, label=label or None)
        for ax, metric in ((axes[1], "ttft"), (axes[2], "e2e")):
            ax.plot(x, part[f"{metric}_p50_s"], "o-", color=color, label=f"{label}p50")
            ax.plot(x, part[f"{metric}_p95_s"], "s--", color=color, alpha=0.6, label=f"{label}p95")
    colors = {str(name): f"C{i}" for i, (name, _part) in enumerate(groups) if name is not None}
    for j, (name, value) in enumerate((baselines or {}).items()):
        # a baseline labelled with a group's name (e.g. "transformers (GPTQ-Int4)") takes its color
        color = next((c for g, c in colors.items() if g in name), f"C{len(groups) + j}")
        axes[0].axhline(value, color=color, linestyle=":", label=name)
    titles = (
        "aggregate output tokens/s (higher is better)",
        "time to first token, s (lower is better)",
        "end-to-end latency, s (lower is better)",
    )
    levels = sorted(df["concurrency"].unique())
    for ax, text in zip(axes, titles, strict=True):
        ax.set_title(text, fontsize=10)
        ax.set_xlabel("concurrent requests")
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(c) for c in levels])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
