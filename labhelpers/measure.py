"""Measuring around the calls a notebook makes (01, 02, 03, 05, 06): token timing
(:func:`time_generate`, :func:`time_openai_stream`), peak memory (:class:`PeakMemory`),
perplexity on held-out text, tables and charts. The notebooks call ``model.generate`` or the
OpenAI client themselves; a shared machine is noisy, so runs are warmed up and repeated.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from labhelpers.files import GB


@dataclass
class GenerationResult:
    """One timed generation. ``ttft_s``: start to the first new token (prefill + first step);
    ``decode_tokens_per_s``: ``(new_tokens - 1) / (t_last - t_first)``, the steady rate without
    prefill; ``e2e_tokens_per_s``: ``new_tokens / total_s``."""

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
        """A flat dict for a table (``extra`` merged in; ``peak_*_gb`` in decimal GB)."""
        names = "label new_tokens prompt_tokens ttft_s decode_tokens_per_s total_s e2e_tokens_per_s"
        row = {k: getattr(self, k) for k in names.split()}
        for kind in ("rss", "cuda"):
            value = getattr(self, f"peak_{kind}_bytes")
            row[f"peak_{kind}_gb"] = None if value is None else value / GB
        return row | self.extra


def _rates(start: float, times: Sequence[float], end: float, n: int) -> dict[str, float | None]:
    total = end - start
    if not times:
        return dict(ttft_s=None, decode_tokens_per_s=None, total_s=total, e2e_tokens_per_s=None)
    decode = (n - 1) / (times[-1] - times[0]) if n >= 2 and times[-1] > times[0] else None
    e2e = n / total if total > 0 else None
    return dict(
        ttft_s=times[0] - start, decode_tokens_per_s=decode, total_s=total, e2e_tokens_per_s=e2e
    )


class GenerationTimer:
    """A transformers streamer that timestamps each new token: pass it as ``streamer=`` to
    ``generate``, which calls ``put`` with the prompt, then with each new token, then ``end()``.
    The clock starts at creation (or :meth:`start`). On CUDA, generate copies each token to the
    CPU before ``put``, which synchronizes: the timestamps are honest."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.start()

    def start(self) -> None:
        """Mark the start now and forget earlier recordings."""
        self.start_time, self.end_time = self.clock(), None
        self.prompt_tokens: int | None = None
        self.batch_size, self.new_tokens = 1, 0
        self.token_times: list[float] = []

    def put(self, value: Any) -> None:
        now = self.clock()
        shape = tuple(getattr(value, "shape", ()))
        if self.prompt_tokens is None:  # the first put is the prompt
            self.batch_size = shape[0] if len(shape) >= 2 else 1
            self.prompt_tokens = shape[-1] if shape else len(value)
            return
        numel = int(value.numel()) if hasattr(value, "numel") else 1
        steps = max(1, numel // self.batch_size)
        self.new_tokens += steps
        self.token_times += [now] * steps

    def end(self) -> None:
        self.end_time = self.clock()

    def result(self, label: str = "", memory: PeakMemory | None = None) -> GenerationResult:
        """The measurements; ``memory``: a finished :class:`PeakMemory` for the peaks."""
        end = self.end_time if self.end_time is not None else self.clock()
        rates = _rates(self.start_time, self.token_times, end, self.new_tokens)
        result = GenerationResult(label, self.new_tokens, **rates, prompt_tokens=self.prompt_tokens)
        if memory is not None:
            result.peak_rss_bytes = memory.peak_rss_bytes
            result.peak_cuda_bytes = memory.peak_cuda_bytes
        return result


def median_of(runs: Sequence[GenerationResult], label: str | None = None) -> GenerationResult:
    """Per-metric medians of repeated runs; memory peaks are the maximum."""

    def values(name: str) -> list[Any]:
        return [getattr(r, name) for r in runs if getattr(r, name) is not None]

    def median(name: str) -> float | None:
        return statistics.median(values(name)) if values(name) else None

    rates = {k: median(k) for k in ("ttft_s", "decode_tokens_per_s", "total_s", "e2e_tokens_per_s")}
    peaks = {k: max(values(k), default=None) for k in ("peak_rss_bytes", "peak_cuda_bytes")}
    new_tokens = int(statistics.median_low([r.new_tokens for r in runs]))
    return GenerationResult(
        runs[-1].label if label is None else label, new_tokens, **rates, **peaks,
        prompt_tokens=runs[-1].prompt_tokens, extra={"repeats": len(runs)}, text=runs[-1].text,
    )  # fmt: skip


@dataclass
class RepeatedResult:
    """:func:`time_generate`'s result: the medians, every timed run, the last output."""

    median: GenerationResult
    runs: list[GenerationResult]
    last_output: Any = field(default=None, repr=False)

    def as_row(self) -> dict[str, Any]:
        return self.median.as_row()


def time_generate(generate_fn: Callable[[GenerationTimer], Any], label: str = "", warmup: int = 1,
                  repeats: int = 3, *, measure_memory: bool = True) -> RepeatedResult:  # fmt: skip
    """Call ``generate_fn(streamer)`` ``warmup`` times untimed (compilation, repacking,
    allocator growth), then ``repeats`` times timed, each inside :class:`PeakMemory` when
    ``measure_memory``. ``generate_fn`` must pass the streamer it gets to ``generate``::

        runs = measure.time_generate(lambda streamer: model.generate(
            **inputs, max_new_tokens=64, do_sample=False, streamer=streamer), label="int4")
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("need repeats >= 1 and warmup >= 0")
    for _ in range(warmup):
        generate_fn(GenerationTimer())
    runs, output = [], None
    for _ in range(repeats):
        timer = GenerationTimer()
        with PeakMemory() if measure_memory else nullcontext() as memory:
            timer.start()
            output = generate_fn(timer)
        if timer.new_tokens == 0:
            raise RuntimeError("no tokens recorded: pass the streamer to generate(streamer=...)")
        runs.append(timer.result(label, memory))
    return RepeatedResult(median_of(runs, label), runs, output)


def chat_timings(model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
                 repeats: int = 3,
                 label: str = "") -> tuple[GenerationResult, list[str]]:  # fmt: skip
    """A transformers (or IPEX-LLM) model answering each prompt as one chat turn, greedy,
    exactly ``max_new_tokens`` tokens, warmed up once, timed ``repeats`` times per prompt:
    the medians over all runs and the greedy answers (notebooks 03, 06)."""
    runs, answers = [], []
    greedy = dict(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    for i, prompt in enumerate(prompts):
        batch = _encode(tokenizer, [prompt], model.device)

        def generate(streamer: Any, batch: Any = batch) -> Any:
            return model.generate(
                **batch, **greedy, min_new_tokens=max_new_tokens, streamer=streamer
            )

        runs += time_generate(generate, label, int(i == 0), repeats, measure_memory=False).runs
        answer = model.generate(**batch, **greedy)[0, batch["input_ids"].shape[1] :]
        answers.append(tokenizer.decode(answer, skip_special_tokens=True).strip())
    return median_of(runs, label), answers


def batch_throughput(model: Any, tokenizer: Any, prompts: Sequence[str], batch_sizes: Sequence[int],
                     *, max_new_tokens: int = 64,
                     log: Callable[[str], Any] = print) -> list[dict[str, float]]:  # fmt: skip
    """Static batching, the best one ``generate`` call can do for many users: per batch size,
    one left-padded batch of that many prompts, each forced to ``max_new_tokens``; aggregate
    tokens/s = all new tokens / wall time (notebook 06)."""
    levels = []
    for size in batch_sizes:
        batch = _encode(tokenizer, [prompts[i % len(prompts)] for i in range(size)], model.device)
        t0 = time.perf_counter()
        model.generate(**batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                       do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        wall = time.perf_counter() - t0
        levels.append(
            dict(concurrency=size, aggregate_tok_s=size * max_new_tokens / wall, wall_s=wall)
        )
        log(f"    batch of {size}: {size * max_new_tokens / wall:.1f} tokens/s aggregate")
    return levels


def _encode(tokenizer: Any, prompts: Sequence[str], device: Any) -> Any:
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kw = dict(tokenize=False, add_generation_prompt=True)  # one at a time: 4.37 has no batches
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], **kw) for p in prompts]
    # transformers 4.37's fast tokenizer returns token_type_ids, which generate refuses
    batch = tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    return batch.to(device)


# --------------------------------------------------------------------------- memory


def _process_tree_rss_bytes(pid: int | None = None) -> int:
    """RSS of a process and all its descendants (a server and its workers). Pages shared
    between them count once per process, so the sum can exceed what is really used."""
    import psutil

    root = psutil.Process(pid)
    total = root.memory_info().rss
    for child in root.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:  # exited while we read
            pass
    return int(total)


class PeakMemory:
    """Peak RSS (and peak CUDA memory) over a block::

        with measure.PeakMemory() as mem:
            model.generate(...)
        mem.peak_rss_bytes, mem.peak_rss_delta_bytes, mem.peak_cuda_bytes

    A thread samples RSS every ``interval_s`` (shorter spikes can be missed); ``pid`` /
    ``include_children`` measure another process (tree), e.g. a server. CUDA (when torch is
    imported and a GPU is usable, or ``cuda=True``): ``torch.cuda.max_memory_allocated()``."""

    def __init__(self, interval_s: float = 0.005, *, pid: int | None = None,
                 include_children: bool = False, cuda: bool | None = None) -> None:  # fmt: skip
        import psutil

        proc = psutil.Process(pid)
        tree = lambda: _process_tree_rss_bytes(proc.pid)  # noqa: E731
        self._read = tree if include_children else lambda: proc.memory_info().rss
        self.interval_s, self.cuda = interval_s, cuda
        self.start_rss_bytes = self.peak_rss_bytes = self.peak_cuda_bytes = None
        self._stop, self._thread, self._torch = threading.Event(), None, None

    def _sample(self) -> None:
        try:
            self.peak_rss_bytes = max(self.peak_rss_bytes or 0, self._read())
        except Exception:  # the measured process may have exited
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakMemory:
        torch = sys.modules.get("torch")
        if self.cuda or (self.cuda is None and torch is not None and torch.cuda.is_available()):
            import torch

            torch.cuda.reset_peak_memory_stats()
            self._torch = torch
        self.start_rss_bytes = self.peak_rss_bytes = self._read()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if self._torch is not None:
            self.peak_cuda_bytes = int(self._torch.cuda.max_memory_allocated())

    @property
    def peak_rss_delta_bytes(self) -> int | None:
        """Peak RSS minus RSS at entry: what the block added at its worst."""
        return None if self.peak_rss_bytes is None else self.peak_rss_bytes - self.start_rss_bytes


# --------------------------------------------------------------------------- servers


def stream_piece(chunk: Any) -> tuple[str, bool, Any, str | None]:
    """``(answer text, carried any generated text, usage or None, finish_reason)`` of one chunk
    of an OpenAI chat stream. Reasoning text (``reasoning_content`` / ``reasoning`` from a
    reasoning parser) counts as generated but is not part of the answer."""
    text, generated, finish = "", False, None
    for choice in getattr(chunk, "choices", None) or []:
        delta = getattr(choice, "delta", None)
        content = getattr(delta, "content", None) or ""
        reasoning = getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
        text += content
        generated = generated or bool(content or reasoning)
        finish = getattr(choice, "finish_reason", None) or finish
    return text, generated, getattr(chunk, "usage", None), finish


def time_openai_stream(client: Any, model: str, messages: Sequence[Mapping[str, Any]],
                       max_tokens: int = 128, label: str = "",
                       **create_kwargs: Any) -> GenerationResult:  # fmt: skip
    """Time one streamed chat completion from an OpenAI-compatible server (vLLM, llama.cpp,
    trtllm-serve) through a sync ``openai.OpenAI`` client. TTFT includes the HTTP round trip,
    queueing and prefill. Token counts come from the final usage chunk, else one per text
    chunk. The answer is in ``.text``; ``extra`` holds ``finish_reason``."""
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=list(messages), max_tokens=max_tokens, stream=True,
        stream_options={"include_usage": True}, **create_kwargs,
    )  # fmt: skip
    times, pieces, usage, finish = [], [], None, None
    for chunk in stream:
        text, generated, chunk_usage, chunk_finish = stream_piece(chunk)
        if generated:
            times.append(time.perf_counter())
            pieces.append(text)
        usage, finish = chunk_usage or usage, chunk_finish or finish
    n = usage.completion_tokens if usage is not None else len(times)
    rates = _rates(start, times, time.perf_counter(), n)
    prompt = usage.prompt_tokens if usage is not None else None
    extra = {"finish_reason": finish}
    return GenerationResult(
        label, n, **rates, prompt_tokens=prompt, extra=extra, text="".join(pieces)
    )


# --------------------------------------------------------------------------- quality


def heldout_text(topics: Sequence[str] = ("execmodel", "import")) -> str:
    """English technical text for perplexity: chapters of the Python Language Reference shipped
    with Python (``pydoc_data.topics``), the same offline on every machine."""
    from pydoc_data.topics import topics as docs

    unknown = [t for t in topics if t not in docs]
    if unknown:
        raise KeyError(f"unknown pydoc topics {unknown}; e.g. {sorted(docs)[:8]}")
    return "\n\n".join(docs[t].strip() for t in topics)


def perplexity(model: Any, input_ids: Any, *, window: int = 512, stride: int = 256) -> float:
    """Perplexity, ``exp(mean negative log-likelihood per token)``, of ``model`` on one long
    token sequence with a sliding window (the Hugging Face perplexity guide's method): windows
    of ``window`` tokens start every ``stride`` tokens and each token is scored once, in the
    first window that reaches it, with at least ``window - stride`` tokens of context."""
    import torch

    device = next(iter(model.parameters()), torch.empty(0)).device

    def score(chunk: list[int]) -> list[float]:
        with torch.inference_mode():
            tokens = torch.tensor([chunk], device=device)
            out = model(tokens)
            logits = (out if hasattr(out, "shape") else out.logits)[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            return logprobs.gather(1, tokens[0, 1:, None])[:, 0].tolist()

    ids = torch.as_tensor(input_ids).reshape(-1).tolist()
    return perplexity_from_logprobs(score, ids, window=window, stride=stride)


def perplexity_from_logprobs(score: Callable[[list[int]], Sequence[float]],
                             input_ids: Sequence[int], *, window: int = 512,
                             stride: int = 256) -> float:  # fmt: skip
    """:func:`perplexity` for anything that returns log-probabilities: ``score(chunk)`` gets a
    window of token ids and returns the natural-log probability of each token after the first.
    A server (vLLM's ``prompt_logprobs``) scores exactly the same tokens, so numbers compare."""
    ids = [int(i) for i in input_ids]
    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window; got stride={stride}, window={window}")
    nll, counted, scored_up_to = 0.0, 0, 1  # token 0 has no context: never scored
    for begin in range(0, len(ids), stride):
        chunk = ids[begin : begin + window]
        logprobs = list(score(chunk))
        if len(logprobs) != len(chunk) - 1:
            raise ValueError(
                f"score() returned {len(logprobs)} log-probabilities for {len(chunk)} tokens; "
                f"expected {len(chunk) - 1} (one per token after the first)"
            )
        first = max(0, scored_up_to - begin - 1)  # the first token not scored yet
        nll -= sum(logprobs[first:])
        counted += len(logprobs) - first
        scored_up_to = begin + len(chunk)
        if scored_up_to == len(ids):
            break
    return math.exp(nll / counted)


# ---------------------------------------------- issue 16: is the quantized model broken?

#: The quality sanity check's fixed prompt (greedy answer) and perplexity text (notebooks 01,
#: 02, 03, 05, 06, 08): ``heldout_text(SANITY_TOPICS)``, scored by each notebook's own API.
SANITY_PROMPT = "What is the capital of France? Answer in one sentence."
SANITY_TOPICS = ("execmodel",)
_REPEATED = re.compile(r"(.{1,8}?)\1{7,}", re.S)  # one short piece, 8+ times in a row


@dataclass
class QualityVerdict:
    """:func:`quality_verdict`'s answer: ``level`` 'ok' | 'degraded' | 'broken', why, and
    the numbers it was judged on."""

    label: str
    level: str
    reasons: list[str]
    answer: str
    reference_answer: str
    perplexity_ratio: float | None = None

    @property
    def broken(self) -> bool:
        return self.level == "broken"

    def __str__(self) -> str:
        icon = {"ok": "✅", "degraded": "⚠️ ", "broken": "❌"}[self.level]
        why = "; ".join(self.reasons) or "answer not empty, repeated or garbled (no perplexity)"
        answers = f"answer:    {self.answer[:120]!r}\n   reference: {self.reference_answer[:120]!r}"
        return f"{icon} {self.label}: {self.level.upper()} — {why}\n   {answers}"


def _answer_problems(text: str) -> list[str]:
    stripped = text.strip()
    if not stripped:
        return ["empty answer"]
    problems = []
    longest = max((m.end() - m.start() for m in _REPEATED.finditer(stripped)), default=0)
    if longest >= max(16, len(stripped) // 2):
        problems.append(f"degenerate repetition ({stripped[:24]!r}…)")
    if stripped.count("\ufffd") > len(stripped) // 10:
        problems.append("garbled bytes (U+FFFD)")
    return problems


def quality_verdict(
    answer: str,
    reference_answer: str,
    perplexity: float | None = None,
    reference_perplexity: float | None = None,
    *,
    label: str = "quantized",
    degraded_ratio: float = 1.25,
    broken_ratio: float = 2.0,
) -> QualityVerdict:
    """Is a quantized model broken? Compares its greedy answer to :data:`SANITY_PROMPT` and
    its perplexity on :data:`SANITY_TOPICS` with the unquantized twin's, measured in the same
    run. Broken: an empty answer, one short piece repeated ("!!!!!!"), garbled bytes, a
    non-finite perplexity or more than ``broken_ratio`` x the twin's; degraded: more than
    ``degraded_ratio`` x. Raises ValueError when the twin fails the same checks (then the
    prompt, template or twin is at fault, not the quantization)."""
    if problems := _answer_problems(reference_answer):
        raise ValueError(f"the unquantized reference fails the check too ({problems[0]}): "
                         "fix the prompt, chat template or reference model first")  # fmt: skip
    reasons, ratio = _answer_problems(answer), None
    level = "broken" if reasons else "ok"
    if perplexity is not None and reference_perplexity is not None:
        ratio = perplexity / reference_perplexity if math.isfinite(perplexity) else math.inf
        text = f"perplexity {perplexity:.2f} vs {reference_perplexity:.2f} (x{ratio:.2f})"
        if ratio > broken_ratio:
            level = "broken"
            reasons.append(f"{text}: blow-up beyond x{broken_ratio:g}")
        elif ratio > degraded_ratio:
            level = "broken" if level == "broken" else "degraded"
            reasons.append(f"{text}: worse than x{degraded_ratio:g}")
        else:
            reasons.append(text)
    return QualityVerdict(label, level, reasons, answer, reference_answer, ratio)


# --------------------------------------------------------------------------- tables, charts


def to_frame(rows: Iterable[Any], **columns: Any) -> Any:
    """A pandas DataFrame, one row per result (anything with ``as_row()``, or a dict);
    ``columns`` become constant columns (``model="GPTQ-Int4"``) so tables can be concatenated."""
    import pandas as pd

    return pd.DataFrame([(r.as_row() if hasattr(r, "as_row") else dict(r)) | columns for r in rows])


_TITLES = {
    "decode_tokens_per_s": "decode tokens/s (higher is better)",
    "ttft_s": "time to first token, s (lower is better)",
    "peak_rss_gb": "peak RSS, GB (lower is better)",
    "percent_of_roofline": "% of the bandwidth roofline",
    "perplexity": "perplexity (lower is better)",
}


def plot_results(df: Any, x: str = "label",
                 metrics: Sequence[str] = ("decode_tokens_per_s", "ttft_s", "peak_rss_gb"),
                 title: str | None = None) -> Any:  # fmt: skip
    """Bar charts, one panel per metric, values on the bars. Returns the Figure (assign it:
    ``fig = measure.plot_results(df)``, so Jupyter shows it once)."""
    import matplotlib.pyplot as plt
    import pandas as pd

    df = df if isinstance(df, pd.DataFrame) else to_frame(df)
    missing = [m for m in (x, *metrics) if m not in df.columns]
    if missing or not metrics:
        raise ValueError(f"columns {missing} not in the table; it has {list(df.columns)}")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
    for i, (ax, metric) in enumerate(zip(axes[0], metrics, strict=True)):
        values = pd.to_numeric(df[metric], errors="coerce")
        bars = ax.bar([str(v) for v in df[x]], values.fillna(0.0), color=f"C{i}")
        ax.bar_label(bars, labels=["" if pd.isna(v) else f"{v:.3g}" for v in values])
        ax.set_title(_TITLES.get(metric, metric), fontsize=10)
        ax.tick_params(axis="x", labelrotation=20)
        ax.margins(y=0.15)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
