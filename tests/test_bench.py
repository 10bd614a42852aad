"""Tests for labhelpers.bench (fast: a few seconds, no network, no GPU)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from labhelpers import bench

# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


class FakeClock:
    """A clock that only moves when told to."""

    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


class RecordingStreamer:
    def __init__(self) -> None:
        self.puts: list[object] = []
        self.ended = 0

    def put(self, value: object) -> None:
        self.puts.append(value)

    def end(self) -> None:
        self.ended += 1


# --------------------------------------------------------------------------------------
# import hygiene
# --------------------------------------------------------------------------------------


def test_import_pulls_no_heavy_libraries():
    code = (
        "import sys, labhelpers.bench\n"
        "heavy = {'torch', 'transformers', 'pandas', 'matplotlib', 'numpy', 'psutil', 'openai'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------
# roofline arithmetic
# --------------------------------------------------------------------------------------


def test_roofline_arithmetic_exact():
    assert bench.roofline_tokens_per_s(100e9, 1e9) == 100.0
    assert bench.percent_of_roofline(25.0, 100.0) == 25.0
    assert bench.decode_bytes_per_token(1000) == 1000
    kv = bench.decode_bytes_per_token(
        0, num_layers=2, num_kv_heads=2, head_dim=4, context_tokens=10, kv_bytes_per_elem=2
    )
    assert kv == 2 * 2 * 2 * 4 * 10 * 2 == 640
    assert bench.decode_bytes_per_token(
        1000, num_layers=2, num_kv_heads=2, head_dim=4, context_tokens=10
    ) == (1000 + 640)
    with pytest.raises(ValueError):
        bench.roofline_tokens_per_s(1e9, 0)
    with pytest.raises(ValueError):
        bench.decode_bytes_per_token(-1)


def test_kv_geometry_explicit_and_fallbacks():
    qwen3 = {
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "hidden_size": 1024,
        "head_dim": 128,
    }
    assert bench.kv_geometry(qwen3) == {"num_layers": 28, "num_kv_heads": 8, "head_dim": 128}
    # no num_key_value_heads -> MHA; no head_dim -> hidden // heads
    mha = SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=32)
    assert bench.kv_geometry(mha) == {"num_layers": 2, "num_kv_heads": 4, "head_dim": 8}
    # head_dim present but None (some HF configs) -> fallback too
    cfg = {"num_hidden_layers": 3, "num_attention_heads": 8, "hidden_size": 256, "head_dim": None}
    assert bench.kv_geometry(cfg)["head_dim"] == 32
    # multimodal wrapper
    wrapped = {"text_config": qwen3}
    assert bench.kv_geometry(wrapped)["num_layers"] == 28
    # usable straight into decode_bytes_per_token
    geo = bench.kv_geometry(mha)
    assert bench.decode_bytes_per_token(0, context_tokens=1, **geo) == 2 * 2 * 4 * 8 * 1 * 2
    with pytest.raises(ValueError):
        bench.kv_geometry({"hidden_size": 8})


def test_kv_geometry_from_transformers_config():
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    assert bench.kv_geometry(cfg) == {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8}


def test_model_weight_bytes_counts_buffers_and_dedups_tied():
    import torch
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)  # 40 fp32 = 160 B
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight  # tied: counted once
            self.proj = nn.Linear(4, 4)  # 16 + 4 fp32 = 80 B
            # GPTQ-like packed weight kept as a buffer: 8 int32 = 32 B
            self.register_buffer("qweight", torch.zeros(2, 4, dtype=torch.int32))
            # another module sharing the same buffer tensor: counted once
            self.alias = nn.Module()
            self.alias.register_buffer("qweight", self.qweight)

    assert bench.model_weight_bytes(Tiny()) == 160 + 80 + 32


# --------------------------------------------------------------------------------------
# GenerationTimer
# --------------------------------------------------------------------------------------


def test_generation_timer_exact_with_fake_clock():
    import torch

    clock = FakeClock(100.0)
    timer = bench.GenerationTimer(clock=clock)  # start = 100.0
    clock.advance(0.5)
    timer.put(torch.tensor([[1, 2, 3, 4, 5]]))  # prompt at 100.5
    clock.advance(0.5)
    timer.put(torch.tensor([7]))  # first new token at 101.0 -> ttft 1.0
    for _ in range(4):
        clock.advance(0.25)
        timer.put(torch.tensor([8]))  # last token at 102.0
    clock.advance(0.5)
    timer.end()  # 102.5
    r = timer.result(label="fake", peak_rss_bytes=3 * 10**9, extra={"quant": "int4"})
    assert r.new_tokens == 5
    assert r.prompt_tokens == 5
    assert r.ttft_s == pytest.approx(1.0)
    assert r.decode_tokens_per_s == pytest.approx(4 / 1.0)
    assert r.total_s == pytest.approx(2.5)
    assert r.e2e_tokens_per_s == pytest.approx(5 / 2.5)
    assert timer.timestamps == pytest.approx([1.0, 1.25, 1.5, 1.75, 2.0])
    row = r.as_row()
    assert row["label"] == "fake" and row["quant"] == "int4"
    assert row["peak_rss_gb"] == pytest.approx(3.0)
    assert row["peak_cuda_gb"] is None


def test_generation_timer_start_modes_and_edge_cases():
    clock = FakeClock(0.0)
    # auto_start=False: the prompt put marks the start
    timer = bench.GenerationTimer(clock=clock, auto_start=False)
    clock.advance(10.0)
    timer.put([[1, 2, 3]])
    clock.advance(2.0)
    timer.put([5])
    r = timer.result()
    assert r.ttft_s == pytest.approx(2.0)
    assert r.new_tokens == 1
    assert r.decode_tokens_per_s is None  # n < 2
    assert r.total_s == pytest.approx(2.0)  # no end(): last token
    # start() resets
    timer.start()
    assert timer.new_tokens == 0 and timer.result().ttft_s is None
    # batch of 2: each step brings 2 ids but counts as one token per sequence;
    # a multi-token put (assisted decoding) counts each token
    import numpy as np

    timer = bench.GenerationTimer(clock=clock)
    timer.put(np.zeros((2, 6), dtype=np.int64))
    clock.advance(1.0)
    timer.put(np.zeros(2, dtype=np.int64))
    clock.advance(1.0)
    timer.put(np.zeros((2, 3), dtype=np.int64))
    r = timer.result()
    assert r.new_tokens == 4
    assert r.extra["batch_size"] == 2
    assert r.decode_tokens_per_s == pytest.approx(3 / 1.0)


def test_generation_timer_forwards_calls():
    inner = RecordingStreamer()
    timer = bench.GenerationTimer(forward_to=inner)
    values = [[[1, 2]], [3], [4]]
    for v in values:
        timer.put(v)
    timer.end()
    assert inner.puts == values
    assert inner.ended == 1
    assert timer.new_tokens == 2


@pytest.fixture(scope="module")
def tiny_llama():
    import torch
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


def test_generation_timer_real_tiny_generate(tiny_llama):
    model, inputs = tiny_llama
    inner = RecordingStreamer()
    timer = bench.GenerationTimer(forward_to=inner)
    with bench.PeakMemory() as mem:
        out = model.generate(
            **inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False, streamer=timer
        )
    r = timer.result(label="tiny llama", memory=mem)
    assert out.shape[-1] == 4 + 8
    assert r.new_tokens == 8
    assert r.prompt_tokens == 4
    assert r.ttft_s is not None and r.ttft_s > 0
    assert r.decode_tokens_per_s is not None and r.decode_tokens_per_s > 0
    assert r.total_s >= r.ttft_s
    assert r.peak_rss_bytes is not None and r.peak_rss_bytes >= mem.start_rss_bytes
    # the forwarded streamer saw the prompt, 8 tokens and the end, exactly as sent
    assert len(inner.puts) == 1 + 8 and inner.ended == 1
    assert inner.puts[0].tolist() == inputs["input_ids"].tolist()
    new_ids = [int(t.reshape(-1)[0]) for t in inner.puts[1:]]
    assert new_ids == out[0, 4:].tolist()


def test_time_generate_real_model(tiny_llama):
    model, inputs = tiny_llama
    res = bench.time_generate(
        lambda streamer: model.generate(
            **inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, streamer=streamer
        ),
        label="tiny",
        warmup=1,
        repeats=2,
    )
    assert [r.new_tokens for r in res.runs] == [4, 4]
    assert res.median.new_tokens == 4
    assert res.median.peak_rss_bytes is not None
    assert res.last_output.shape[-1] == 8


# --------------------------------------------------------------------------------------
# time_generate with a fake generate
# --------------------------------------------------------------------------------------


def test_time_generate_median_over_repeats():
    clock = FakeClock(0.0)
    step_s = iter([0.5, 0.1, 0.05, 0.025])  # warm-up, then 3 timed runs
    calls = []
    forwarded = RecordingStreamer()

    def fake_generate(streamer):
        dt = next(step_s)
        calls.append(dt)
        streamer.put([[1, 2, 3]])
        for _ in range(5):
            clock.advance(dt)
            streamer.put([9])
        streamer.end()
        return f"output {len(calls)}"

    res = bench.time_generate(
        fake_generate,
        label="fake",
        warmup=1,
        repeats=3,
        forward_to=forwarded,
        measure_memory=False,
        extra={"engine": "fake"},
        clock=clock,
    )
    assert len(calls) == 4
    assert [r.decode_tokens_per_s for r in res.runs] == pytest.approx([10.0, 20.0, 40.0])
    assert res.median.decode_tokens_per_s == pytest.approx(20.0)
    assert res.median.ttft_s == pytest.approx(0.05)
    assert res.median.new_tokens == 5
    assert res.median.extra == {"engine": "fake", "repeats": 3, "warmup": 1}
    assert res.last_output == "output 4"
    # warm-up is not forwarded; the 3 timed runs are (1 prompt + 5 tokens each)
    assert len(forwarded.puts) == 3 * 6 and forwarded.ended == 3
    assert res.as_row()["decode_tokens_per_s"] == pytest.approx(20.0)
    assert len(res.runs_frame()) == 3


def test_time_generate_rejects_unused_streamer():
    with pytest.raises(RuntimeError, match="streamer"):
        bench.time_generate(lambda streamer: None, warmup=0, repeats=1)
    with pytest.raises(ValueError):
        bench.time_generate(lambda streamer: None, repeats=0)


# --------------------------------------------------------------------------------------
# memory
# --------------------------------------------------------------------------------------


def test_peak_memory_sees_transient_allocation():
    import numpy as np

    with bench.PeakMemory() as mem:
        block = np.empty(200 * 1024 * 1024, dtype=np.uint8)
        block.fill(1)  # touch every page
        del block  # freed inside the block: only the sampler thread can see it
        time.sleep(0.1)
    assert mem.samples > 3
    assert mem.peak_rss_delta_bytes >= 150 * 1024 * 1024
    assert mem.peak_cuda_bytes is None  # no CUDA here
    assert mem.end_rss_bytes < mem.peak_rss_bytes


def test_rss_readings_agree():
    psutil = pytest.importorskip("psutil")
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("no /proc")
    via_proc = bench._rss_from_proc()
    via_psutil = psutil.Process().memory_info().rss
    assert abs(via_proc - via_psutil) < 32 * 1024 * 1024
    assert abs(bench.rss_bytes() - via_psutil) < 32 * 1024 * 1024


@pytest.fixture
def child_with_100mb():
    code = (
        "import sys, time\n"
        "b = bytearray(100 * 1024 * 1024)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()


def test_process_tree_rss_includes_children(child_with_100mb, monkeypatch):
    mb = 1024 * 1024
    assert bench.process_tree_rss_bytes() - bench.rss_bytes() >= 90 * mb
    assert bench.rss_bytes(child_with_100mb.pid) >= 90 * mb
    # same answer from the /proc fallback (psutil hidden)
    if os.path.exists("/proc/self/stat"):
        monkeypatch.setitem(sys.modules, "psutil", None)
        assert child_with_100mb.pid in bench._proc_children(os.getpid())
        assert bench.process_tree_rss_bytes() - bench.rss_bytes() >= 90 * mb
    # a PeakMemory on the tree sees the child too
    monkeypatch.undo()
    with bench.PeakMemory(include_children=True) as mem:
        pass
    assert mem.peak_rss_bytes - bench.rss_bytes() >= 90 * mb


# --------------------------------------------------------------------------------------
# OpenAI-compatible stream
# --------------------------------------------------------------------------------------


def _chunk(content=None, finish=None, usage=None, reasoning=None, choices=True):
    delta = SimpleNamespace(content=content, role="assistant", reasoning_content=reasoning)
    ch = [SimpleNamespace(index=0, delta=delta, finish_reason=finish)] if choices else []
    return SimpleNamespace(choices=ch, usage=usage)


class FakeCompletions:
    def __init__(self, clock, chunks, reject_stream_options=False):
        self.clock = clock
        self.chunks = chunks
        self.reject = reject_stream_options
        self.calls = []

    def create(self, **kwargs):
        self.calls.append(kwargs)
        if self.reject and "stream_options" in kwargs:
            raise TypeError("unexpected keyword argument 'stream_options'")

        def gen():
            for delay, chunk in self.chunks:
                self.clock.advance(delay)
                yield chunk

        return gen()


def fake_client(clock, chunks, **kw):
    completions = FakeCompletions(clock, chunks, **kw)
    return SimpleNamespace(chat=SimpleNamespace(completions=completions)), completions


def test_time_openai_stream_with_usage():
    clock = FakeClock(0.0)
    usage = SimpleNamespace(prompt_tokens=12, completion_tokens=4, total_tokens=16)
    chunks = [
        (0.1, _chunk(content="")),  # role-only chunk: not a token
        (0.2, _chunk(content="Hel")),  # first token at 0.3
        (0.1, _chunk(content="lo")),
        (0.1, _chunk(content=" wor")),
        (0.1, _chunk(content="ld", finish="stop")),  # last token at 0.6
        (0.1, _chunk(choices=False, usage=usage)),
    ]
    client, completions = fake_client(clock, chunks)
    messages = [{"role": "user", "content": "hi"}]
    r = bench.time_openai_stream(
        client, "qwen", messages, max_tokens=16, label="vllm", temperature=0, clock=clock
    )
    call = completions.calls[0]
    assert call["stream"] is True and call["stream_options"] == {"include_usage": True}
    assert call["temperature"] == 0 and call["max_tokens"] == 16
    assert r.label == "vllm"
    assert r.new_tokens == 4 and r.prompt_tokens == 12
    assert r.ttft_s == pytest.approx(0.3)
    assert r.decode_tokens_per_s == pytest.approx(3 / 0.3)
    assert r.total_s == pytest.approx(0.7)
    assert r.e2e_tokens_per_s == pytest.approx(4 / 0.7)
    assert r.text == "Hello world"
    assert r.extra == {"chunks": 4, "token_count_source": "usage", "finish_reason": "stop"}


def test_time_openai_stream_counts_chunks_and_retries_without_stream_options():
    clock = FakeClock(0.0)
    chunks = [
        (0.5, _chunk(reasoning="thinking")),  # reasoning tokens are tokens too
        (0.25, _chunk(content="A")),
        (0.25, _chunk(content="B", finish="length")),
    ]
    client, completions = fake_client(clock, chunks, reject_stream_options=True)
    r = bench.time_openai_stream(client, "m", [{"role": "user", "content": "x"}], 3, clock=clock)
    assert len(completions.calls) == 2 and "stream_options" not in completions.calls[1]
    assert r.new_tokens == 3
    assert r.ttft_s == pytest.approx(0.5)
    assert r.decode_tokens_per_s == pytest.approx(2 / 0.5)
    assert r.text == "AB"
    assert r.extra["token_count_source"] == "chunks"
    assert r.extra["finish_reason"] == "length"


# --------------------------------------------------------------------------------------
# tables and charts
# --------------------------------------------------------------------------------------


def _rows():
    a = bench.GenerationResult("fp16", 64, 0.5, 10.0, 6.8, 9.4, peak_rss_bytes=2 * 10**9)
    b = bench.GenerationResult("int4", 64, 0.4, 25.0, 3.0, 21.3, peak_rss_bytes=10**9)
    return [a, b, {"label": "gguf", "decode_tokens_per_s": 30.0, "ttft_s": 0.2}]


def test_to_frame_and_plot_results():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    df = bench.to_frame(_rows())
    assert list(df["label"]) == ["fp16", "int4", "gguf"]
    assert df.loc[1, "peak_rss_gb"] == pytest.approx(1.0)
    fig = bench.plot_results(df, title="Qwen on CPU")
    try:
        assert isinstance(fig, Figure)
        assert len(fig.axes) == 3
        labels = [t.get_text() for t in fig.axes[0].texts]
        assert labels == ["10", "25", "30"]
        # missing value -> empty label, not "nan"
        assert [t.get_text() for t in fig.axes[2].texts] == ["2", "1", ""]
        assert fig._suptitle.get_text() == "Qwen on CPU"
    finally:
        plt.close(fig)
    fig = bench.plot_results(_rows(), metrics=("e2e_tokens_per_s",))
    assert len(fig.axes) == 1
    plt.close(fig)
    with pytest.raises(ValueError, match="not_a_metric"):
        bench.plot_results(df, metrics=("not_a_metric",))


# --------------------------------------------------------------------------------------
# bandwidth
# --------------------------------------------------------------------------------------


def test_memory_bandwidth_defaults():
    t0 = time.perf_counter()
    r = bench.memory_bandwidth_gbps()
    elapsed = time.perf_counter() - t0
    assert 0 < r.read_gbps < 1000 and 0 < r.copy_gbps < 1000
    assert r.bytes_per_s == pytest.approx(r.read_gbps * 1e9)
    assert r.threads >= 1 and r.repeats == 5 and len(r.read_samples_gbps) == 5
    assert r.size_mb == pytest.approx(256)
    assert elapsed < 6  # budget is < 3 s; margin for a noisy shared machine


def test_memory_bandwidth_numpy_and_threads():
    r = bench.memory_bandwidth_gbps(size_mb=128, repeats=2, backend="numpy")
    assert r.backend == "numpy" and r.threads == 1
    assert 0 < r.read_gbps < 1000
    r = bench.memory_bandwidth_gbps(size_mb=128, repeats=2, threads=1, backend="torch")
    assert r.backend == "torch" and r.threads == 1
    with pytest.raises(ValueError):
        bench.memory_bandwidth_gbps(backend="numpy", threads=2)
    with pytest.raises(ValueError):
        bench.memory_bandwidth_gbps(backend="cupy")


def test_small_array_warns_about_cache():
    if bench._last_level_cache_bytes() is None:
        pytest.skip("cache size unknown")
    with pytest.warns(UserWarning, match="cache"):
        bench.memory_bandwidth_gbps(size_mb=1, repeats=1, backend="numpy")


# --------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------


def test_dir_size_bytes_resolves_links_once(tmp_path):
    blobs = tmp_path / "blobs"
    snap = tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    (blobs / "w1").write_bytes(b"x" * 1000)
    (blobs / "w2").write_bytes(b"y" * 234)
    (snap / "model.safetensors").symlink_to(blobs / "w1")
    (snap / "config.json").symlink_to(blobs / "w2")
    (snap / "broken").symlink_to(tmp_path / "missing")
    # the whole cache entry: each blob once, even though it is reached twice
    assert bench.dir_size_bytes(tmp_path) == 1234
    # the snapshot folder alone: links resolved to their targets' sizes
    assert bench.dir_size_bytes(snap) == 1234
    assert bench.dir_size_bytes(blobs / "w2") == 234
    # weights only: config.json (the other link) and the broken link are not counted
    assert bench.dir_size_bytes(snap, bench.WEIGHT_FILES) == 1000
    with pytest.raises(FileNotFoundError):
        bench.dir_size_bytes(tmp_path / "nope")


def test_human_bytes():
    assert bench.human_bytes(0) == "0 B"
    assert bench.human_bytes(1023) == "1023 B"
    assert bench.human_bytes(1536) == "1.5 KiB"
    assert bench.human_bytes(3 * 1024**3) == "3.0 GiB"
    assert bench.human_bytes(-2 * 1024**2) == "-2.0 MiB"
    assert bench.human_bytes(5 * 1024**5) == "5120.0 TiB"


def test_with_memory_and_frame_of_repeated_results():
    with bench.PeakMemory() as mem:
        pass
    r = bench.GenerationResult("srv", 4, 0.1, 30.0, 0.2, 20.0, extra={"k": 1})
    r2 = r.with_memory(mem)
    assert r2.peak_rss_bytes == mem.peak_rss_bytes and r.peak_rss_bytes is None
    assert r2.extra == {"k": 1} and r2.extra is not r.extra
    rep = bench.RepeatedResult(median=r2, runs=[r, r])
    df = bench.to_frame([rep, r])
    assert list(df["label"]) == ["srv", "srv"]
    assert df.loc[0, "peak_rss_bytes"] == mem.peak_rss_bytes


def test_peak_memory_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    with bench.PeakMemory() as mem:
        x = torch.ones(64 * 1024 * 1024 // 4, device="cuda")
        del x
    assert mem.peak_cuda_bytes >= 64 * 1024 * 1024
    assert mem.peak_cuda_reserved_bytes >= mem.peak_cuda_bytes
