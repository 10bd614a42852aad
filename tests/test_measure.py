"""labhelpers.measure: token timing, memory, streamed HTTP timing, perplexity, tables and plots
(fake clocks, fake streams, toy models; no network)."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from labhelpers import measure
from labhelpers.measure import GenerationResult, GenerationTimer, PeakMemory

torch = pytest.importorskip("torch")
MB = 1024 * 1024


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


# --------------------------------------------------------------------------- GenerationTimer


def test_generation_timer_exact_with_fake_clock():
    clock = FakeClock(100.0)
    timer = GenerationTimer(clock=clock)  # start = 100.0
    clock.advance(0.5)
    timer.put(torch.tensor([[1, 2, 3, 4, 5]]))  # the prompt at 100.5
    clock.advance(0.5)
    timer.put(torch.tensor([7]))  # first new token at 101.0 -> ttft 1.0
    for _ in range(4):
        clock.advance(0.25)
        timer.put(torch.tensor([8]))  # last token at 102.0
    clock.advance(0.5)
    timer.end()  # 102.5
    r = timer.result(label="fake")
    assert (r.new_tokens, r.prompt_tokens) == (5, 5)
    assert r.ttft_s == pytest.approx(1.0)
    assert r.decode_tokens_per_s == pytest.approx(4 / 1.0)
    assert r.total_s == pytest.approx(2.5)
    assert r.e2e_tokens_per_s == pytest.approx(5 / 2.5)
    row = r.as_row()
    assert row["label"] == "fake" and row["peak_rss_gb"] is None and row["peak_cuda_gb"] is None


def test_generation_timer_batches_restarts_and_edge_cases():
    import numpy as np

    clock = FakeClock(0.0)
    timer = GenerationTimer(clock=clock)
    clock.advance(10.0)
    timer.put([[1, 2, 3]])  # a plain list prompt
    clock.advance(2.0)
    timer.put([5])
    r = timer.result()
    assert r.ttft_s == pytest.approx(12.0) and r.new_tokens == 1
    assert r.decode_tokens_per_s is None, "one token has no decode rate"
    assert r.total_s == pytest.approx(12.0), "no end(): until now"
    timer.start()  # forgets everything, the clock restarts
    empty = timer.result()
    assert timer.new_tokens == 0 and empty.ttft_s is None and empty.total_s == 0.0
    # a batch of 2: each step brings 2 ids but is one token per sequence; a multi-token put
    # (assisted decoding) counts each token
    timer = GenerationTimer(clock=clock)
    timer.put(np.zeros((2, 6), dtype=np.int64))
    clock.advance(1.0)
    timer.put(torch.zeros(2, dtype=torch.int64))
    clock.advance(1.0)
    timer.put(torch.zeros((2, 3), dtype=torch.int64))
    r = timer.result()
    assert (timer.batch_size, r.prompt_tokens, r.new_tokens) == (2, 6, 4)
    assert r.decode_tokens_per_s == pytest.approx(3 / 1.0)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    inputs = {
        "input_ids": torch.tensor([[1, 5, 6, 7]]),
        "attention_mask": torch.ones(1, 4, dtype=torch.long),
    }
    return model, inputs


def test_generation_timer_with_a_real_generate(tiny_llama):
    model, inputs = tiny_llama
    timer = GenerationTimer()
    with PeakMemory() as mem:
        out = model.generate(
            **inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, streamer=timer
        )
    r = timer.result(label="tiny llama", memory=mem)
    assert out.shape[-1] == 4 + 8
    assert (r.new_tokens, r.prompt_tokens) == (8, 4)
    assert 0 < r.ttft_s <= r.total_s and r.decode_tokens_per_s > 0
    assert r.peak_rss_bytes == mem.peak_rss_bytes >= mem.start_rss_bytes
    assert len(timer.token_times) == 8 and timer.token_times == sorted(timer.token_times)


def test_time_generate_warms_up_then_times_each_run(tiny_llama):
    model, inputs = tiny_llama
    calls = []

    def generate(streamer):
        calls.append(streamer)
        return model.generate(
            **inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, streamer=streamer
        )

    res = measure.time_generate(generate, label="tiny", warmup=1, repeats=3)
    assert len(calls) == 4 and len({id(c) for c in calls}) == 4, "a fresh timer per call"
    assert [r.new_tokens for r in res.runs] == [4, 4, 4]
    assert res.median.decode_tokens_per_s == statistics.median(
        r.decode_tokens_per_s for r in res.runs
    )
    assert res.median.extra == {"repeats": 3} and res.median.label == "tiny"
    assert res.median.peak_rss_bytes == max(r.peak_rss_bytes for r in res.runs)
    assert res.last_output.shape[-1] == 8
    assert res.as_row()["decode_tokens_per_s"] == res.median.decode_tokens_per_s
    quick = measure.time_generate(generate, warmup=0, repeats=1, measure_memory=False)
    assert quick.median.peak_rss_bytes is None and len(calls) == 5


def test_time_generate_rejects_an_unused_streamer_and_bad_counts():
    with pytest.raises(RuntimeError, match="pass the streamer"):
        measure.time_generate(lambda streamer: None, warmup=0, repeats=1, measure_memory=False)
    with pytest.raises(ValueError):
        measure.time_generate(lambda streamer: None, repeats=0)
    with pytest.raises(ValueError):
        measure.time_generate(lambda streamer: None, warmup=-1)


def test_median_of_takes_per_metric_medians_and_the_highest_peak():
    runs = [
        GenerationResult("x", n, t, d, 1.0, e, peak_rss_bytes=m, prompt_tokens=12)
        for n, t, d, e, m in [
            (8, 0.3, 10.0, 5.0, 100),
            (8, 0.1, 30.0, None, 300),
            (6, 0.2, 20.0, 7.0, None),
        ]
    ]
    got = measure.median_of(runs, label="median")
    assert (got.label, got.new_tokens, got.ttft_s, got.decode_tokens_per_s) == (
        "median",
        8,
        0.2,
        20.0,
    )
    assert got.e2e_tokens_per_s == 6.0, "missing values are left out"
    assert (got.peak_rss_bytes, got.peak_cuda_bytes, got.prompt_tokens) == (300, None, 12)
    assert got.extra == {"repeats": 3}
    assert measure.median_of(runs).label == "x"


# --------------------------------------------------------------------------- memory


def test_peak_memory_sees_a_transient_allocation():
    import numpy as np

    with PeakMemory(cuda=False) as mem:
        block = np.empty(200 * MB, dtype=np.uint8)
        block.fill(1)  # touch every page
        del block  # freed inside the block: only the sampler thread sees it
        time.sleep(0.1)
    assert mem.peak_rss_delta_bytes >= 150 * MB
    assert mem.peak_cuda_bytes is None


@pytest.fixture
def child_with_100mb():
    code = (
        "import time\nb = bytearray(100 * 1024 * 1024)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\nprint('ready', flush=True)\ntime.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()


def test_process_tree_rss_and_peak_memory_of_another_process(child_with_100mb):
    import psutil

    own = psutil.Process().memory_info().rss
    assert measure._process_tree_rss_bytes() - own >= 90 * MB, "children count"
    assert measure._process_tree_rss_bytes(child_with_100mb.pid) >= 90 * MB
    with PeakMemory(include_children=True, cuda=False) as tree:
        pass
    assert tree.peak_rss_bytes - own >= 90 * MB
    with PeakMemory(pid=child_with_100mb.pid, interval_s=0.01, cuda=False) as child:
        time.sleep(0.05)
    assert 90 * MB <= child.peak_rss_bytes < own + 200 * MB


@pytest.mark.gpu
def test_peak_memory_cuda():
    with PeakMemory() as mem:
        x = torch.ones(64 * MB // 4, device="cuda")
        del x
    assert mem.peak_cuda_bytes >= 64 * MB


# --------------------------------------------------------------------------- OpenAI streams


def chunk(content=None, finish=None, usage=None, reasoning=None, choices=True):
    delta = SimpleNamespace(content=content, role="assistant", reasoning_content=reasoning)
    ch = [SimpleNamespace(index=0, delta=delta, finish_reason=finish)] if choices else []
    return SimpleNamespace(choices=ch, usage=usage)


def fake_client(clock: FakeClock, chunks: list):
    calls: list[dict] = []

    def create(**kwargs):
        calls.append(kwargs)

        def gen():
            for delay, c in chunks:
                clock.advance(delay)
                yield c

        return gen()

    return SimpleNamespace(chat=SimpleNamespace(completions=SimpleNamespace(create=create))), calls


def test_stream_piece():
    assert measure.stream_piece(chunk(content="Hi")) == ("Hi", True, None, None)
    assert measure.stream_piece(chunk(reasoning="hmm")) == ("", True, None, None)
    assert measure.stream_piece(chunk(content="")) == ("", False, None, None), "a role-only chunk"
    usage = SimpleNamespace(completion_tokens=3)
    assert measure.stream_piece(chunk(choices=False, usage=usage)) == ("", False, usage, None)
    assert measure.stream_piece(chunk(content="!", finish="stop"))[3] == "stop"


def test_time_openai_stream_with_usage(monkeypatch):
    clock = FakeClock(0.0)
    monkeypatch.setattr(measure.time, "perf_counter", clock)
    usage = SimpleNamespace(prompt_tokens=12, completion_tokens=4, total_tokens=16)
    chunks = [
        (0.1, chunk(content="")),  # role-only chunk: not a token
        (0.2, chunk(content="Hel")),  # first token at 0.3
        (0.1, chunk(content="lo")),
        (0.1, chunk(content=" wor")),
        (0.1, chunk(content="ld", finish="stop")),  # last token at 0.6
        (0.1, chunk(choices=False, usage=usage)),
    ]
    client, calls = fake_client(clock, chunks)
    r = measure.time_openai_stream(
        client,
        "qwen",
        [{"role": "user", "content": "hi"}],
        max_tokens=16,
        label="vllm",
        temperature=0,
    )
    assert calls == [
        {
            "model": "qwen",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 16,
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
        }
    ]
    assert (r.label, r.new_tokens, r.prompt_tokens) == ("vllm", 4, 12)
    assert r.ttft_s == pytest.approx(0.3)
    assert r.decode_tokens_per_s == pytest.approx(3 / 0.3)
    assert r.total_s == pytest.approx(0.7)
    assert r.e2e_tokens_per_s == pytest.approx(4 / 0.7)
    assert r.text == "Hello world" and r.extra == {"finish_reason": "stop"}


def test_time_openai_stream_counts_chunks_without_usage(monkeypatch):
    clock = FakeClock(0.0)
    monkeypatch.setattr(measure.time, "perf_counter", clock)
    chunks = [
        (0.5, chunk(reasoning="thinking")),  # reasoning tokens are tokens too
        (0.25, chunk(content="A")),
        (0.25, chunk(content="B", finish="length")),
    ]
    client, _ = fake_client(clock, chunks)
    r = measure.time_openai_stream(client, "m", [{"role": "user", "content": "x"}], 3)
    assert r.new_tokens == 3 and r.prompt_tokens is None
    assert r.ttft_s == pytest.approx(0.5)
    assert r.decode_tokens_per_s == pytest.approx(2 / 0.5)
    assert r.text == "AB" and r.extra["finish_reason"] == "length"


# --------------------------------------------------------------------------- perplexity


class FixedDistribution(torch.nn.Module):
    """Ignores its input: every position predicts the same distribution ``probs``."""

    def __init__(self, probs):
        super().__init__()
        self.log_probs = torch.nn.Parameter(torch.log(torch.tensor(probs)), requires_grad=False)

    def forward(self, ids):
        return self.log_probs.expand(ids.shape[0], ids.shape[1], -1)


class NextIsPlusOne(torch.nn.Module):
    """Predicts ``(token + 1) % V`` with probability ``p``, the rest spread evenly; records
    every window it is called with; returns an object with ``.logits`` like transformers."""

    def __init__(self, vocab: int, p: float):
        super().__init__()
        self.vocab, self.p = vocab, p
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.calls: list[tuple[int, int]] = []

    def forward(self, ids):
        self.calls.append((int(ids[0, 0]), ids.shape[1]))
        other = (1 - self.p) / (self.vocab - 1)
        probs = torch.full((*ids.shape, self.vocab), other)
        probs.scatter_(-1, ((ids + 1) % self.vocab).unsqueeze(-1), self.p)
        return SimpleNamespace(logits=torch.log(probs))


class PositionAware(torch.nn.Module):
    """logits[t] = table[token t] + bias[position t in the window]: a token's score depends on
    where its window starts, so only identical windowing gives equal numbers."""

    def __init__(self, vocab: int = 11, length: int = 64):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, generator=gen), False)
        self.bias = torch.nn.Parameter(torch.randn(length, vocab, generator=gen), False)

    def forward(self, ids):
        return self.table[ids] + self.bias[: ids.shape[1]]

    def logprobs(self, chunk: list[int]) -> list[float]:
        """What a server's prompt_logprobs gives: log p(token i | tokens < i), i >= 1."""
        with torch.no_grad():
            logp = torch.log_softmax(self(torch.tensor([chunk]))[0], -1)
        return [float(logp[i - 1, chunk[i]]) for i in range(1, len(chunk))]


@pytest.mark.parametrize(("window", "stride"), [(8, 8), (8, 3), (16, 16), (100, 50)])
def test_uniform_model_has_perplexity_equal_to_vocab_size(window: int, stride: int):
    vocab = 7
    ids = torch.randint(0, vocab, (50,), generator=torch.Generator().manual_seed(0))
    got = measure.perplexity(
        FixedDistribution([1 / vocab] * vocab), ids, window=window, stride=stride
    )
    assert got == pytest.approx(vocab, rel=1e-6)


def test_fixed_distribution_matches_the_analytic_cross_entropy():
    probs = [0.5, 0.25, 0.125, 0.125]
    ids = [0, 1, 2, 3, 0, 0, 1, 3, 2, 0, 1]
    expected = math.exp(-sum(math.log(probs[t]) for t in ids[1:]) / (len(ids) - 1))
    got = measure.perplexity(FixedDistribution(probs), torch.tensor([ids]), window=4, stride=2)
    assert got == pytest.approx(expected, rel=1e-6)


def test_sliding_window_scores_every_token_once_with_context():
    vocab, p = 10, 0.9
    model = NextIsPlusOne(vocab, p)
    got = measure.perplexity(model, torch.arange(23) % vocab, window=8, stride=5)
    assert got == pytest.approx(1 / p, rel=1e-6)  # each of the 22 targets scored once at p
    assert model.calls == [(0, 8), (5, 8), (0, 8), (5, 8)]  # starts 0, 5, 10, 15 (to the end)


@pytest.mark.parametrize(("window", "stride"), [(8, 8), (8, 3), (16, 5), (64, 64)])
def test_perplexity_from_logprobs_equals_perplexity(window: int, stride: int):
    model = PositionAware()
    ids = torch.randint(0, 11, (41,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = measure.perplexity(model, ids, window=window, stride=stride)
    got = measure.perplexity_from_logprobs(model.logprobs, ids, window=window, stride=stride)
    assert got == pytest.approx(expected, rel=1e-6)


def test_perplexity_rejects_bad_arguments():
    model = FixedDistribution([0.5, 0.5])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        measure.perplexity(model, [1])
    with pytest.raises(ValueError, match="stride"):
        measure.perplexity(model, [0, 1, 0], window=4, stride=8)
    with pytest.raises(ValueError, match="expected 3"):
        measure.perplexity_from_logprobs(lambda chunk: [0.0], [1, 2, 3, 4], window=4, stride=4)


def test_heldout_text_is_fixed_english_technical_text():
    text = measure.heldout_text()
    assert len(text) > 15_000 and text == measure.heldout_text()
    assert measure.heldout_text(["import"]) in text
    with pytest.raises(KeyError, match="unknown pydoc topics"):
        measure.heldout_text(["no-such-topic"])


@pytest.mark.slow
def test_chat_timings_and_batch_throughput_on_the_standin(standin_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(standin_path)
    model = AutoModelForCausalLM.from_pretrained(standin_path, dtype=torch.float32)
    prompts = ["What is the capital of France?", "用一句话解释量化。"]
    median, answers = measure.chat_timings(
        model, tok, prompts, max_new_tokens=6, repeats=2, label="s"
    )
    assert median.new_tokens == 6 and median.extra == {"repeats": 4}, "2 prompts x 2 repeats"
    assert median.decode_tokens_per_s > 0 and len(answers) == 2 and "Paris" in answers[0]
    lines: list[str] = []
    levels = measure.batch_throughput(
        model, tok, prompts, [1, 3], max_new_tokens=4, log=lines.append
    )
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    assert all(
        lv["aggregate_tok_s"] == pytest.approx(lv["concurrency"] * 4 / lv["wall_s"])
        for lv in levels
    )
    assert len(lines) == 2 and "batch of 3" in lines[1]


# --------------------------------------------------------------------------- tables and charts


def rows():
    a = GenerationResult("fp16", 64, 0.5, 10.0, 6.8, 9.4, peak_rss_bytes=2 * 10**9)
    b = GenerationResult("int4", 64, 0.4, 25.0, 3.0, 21.3, peak_rss_bytes=10**9)
    repeated = measure.RepeatedResult(median=b, runs=[b])
    return [a, repeated, {"label": "gguf", "decode_tokens_per_s": 30.0, "ttft_s": 0.2}]


def test_to_frame_and_plot_results():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    df = measure.to_frame(rows())
    assert list(df["label"]) == ["fp16", "int4", "gguf"]
    assert df.loc[1, "peak_rss_gb"] == pytest.approx(1.0)
    fig = measure.plot_results(df, title="Qwen on CPU")
    try:
        assert isinstance(fig, Figure) and len(fig.axes) == 3
        assert [t.get_text() for t in fig.axes[0].texts] == ["10", "25", "30"]
        assert [t.get_text() for t in fig.axes[2].texts] == ["2", "1", ""], "no 'nan' label"
        assert fig._suptitle.get_text() == "Qwen on CPU"
    finally:
        plt.close(fig)
    fig = measure.plot_results(rows(), metrics=("e2e_tokens_per_s",))
    assert len(fig.axes) == 1
    plt.close(fig)
    with pytest.raises(ValueError, match="not_a_metric"):
        measure.plot_results(df, metrics=("not_a_metric",))


# --------------------------------------------------------------------------- quality verdict

PARIS = "The capital of France is Paris."


@pytest.mark.parametrize(
    ("answer", "ppl", "level", "why"),
    [
        (PARIS, 14.0, "ok", "perplexity 14.00 vs 13.50 (x1.04)"),
        ("Paris is the capital.", 17.8, "degraded", "worse than x1.25"),
        ("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!", 14.0, "broken", "degenerate repetition"),
        ("Paris" + " ok" * 12, 14.0, "broken", "degenerate repetition"),
        ("", 14.0, "broken", "empty answer"),
        ("   \n", None, "broken", "empty answer"),
        ("\ufffd\ufffd\ufffd Par\ufffds", 14.0, "broken", "garbled bytes"),
        (PARIS, 812.0, "broken", "blow-up beyond x2"),
        (PARIS, float("nan"), "broken", "(xinf)"),
        (PARIS, None, "ok", ""),
        ("Paris!", None, "ok", ""),
    ],
)
def test_quality_verdict(answer: str, ppl: float | None, level: str, why: str):
    verdict = measure.quality_verdict(answer, PARIS, ppl, 13.5, label="GPTQ-Int4")
    assert verdict.level == level and verdict.broken is (level == "broken")
    assert why in "; ".join(verdict.reasons)
    text = str(verdict)
    assert text.startswith({"ok": "✅", "degraded": "⚠️", "broken": "❌"}[level])
    assert f"GPTQ-Int4: {level.upper()}" in text and repr(PARIS) in text
    if ppl is None and level == "ok":
        assert "(no perplexity)" in text


def test_quality_verdict_keeps_ordinary_answers_and_repeated_sentences():
    sentence = "The capital of France is Paris. " * 3  # a small model's loop is not broken output
    assert measure.quality_verdict(sentence, PARIS).level == "ok"
    assert measure.quality_verdict("1. Paris\n2. Lyon\n3. Nice", PARIS).level == "ok"
    assert measure.quality_verdict("1000000000", PARIS).level == "ok", "9 zeros: a number"


def test_quality_verdict_refuses_a_broken_reference():
    with pytest.raises(ValueError, match="reference fails the check too \\(empty answer\\)"):
        measure.quality_verdict(PARIS, "")
