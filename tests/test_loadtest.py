"""Tests for labhelpers.loadtest: the arithmetic on hand-made records, and a real sweep
through the openai async client against the fake server (tests/fake_openai_server.py)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import fake_openai_server

from labhelpers import loadtest, measure, serve
from labhelpers.loadtest import _Request as RequestRecord

# --------------------------------------------------------------------------------------
# arithmetic
# --------------------------------------------------------------------------------------


def test_summarize_counts_tokens_over_wall_time_and_ignores_failures():
    records = [
        RequestRecord(start_s=0.0, first_token_s=0.5, end_s=2.0, completion_tokens=20),
        RequestRecord(start_s=0.0, first_token_s=1.0, end_s=4.0, completion_tokens=40),
        RequestRecord(start_s=2.0, first_token_s=2.2, end_s=3.0, completion_tokens=10),
        RequestRecord(start_s=3.0, end_s=3.1, error="APIConnectionError: Connection error."),
    ]
    level = loadtest._summarize(2, records)
    assert (level.requests, level.ok, level.errors) == (4, 3, 1)
    assert level.wall_s == 4.0  # first start to last end
    assert level.output_tokens == 70
    assert level.aggregate_tokens_per_s == pytest.approx(70 / 4.0)
    assert level.ttft_p50_s == pytest.approx(0.5)  # ttfts 0.5, 1.0, 0.2
    assert level.ttft_p95_s == pytest.approx(0.5 + 0.9 * 0.5)
    assert level.e2e_p50_s == pytest.approx(2.0)  # e2e 2.0, 4.0, 1.0
    assert level.e2e_p95_s == pytest.approx(2.0 + 0.9 * 2.0)
    assert level.per_request_tokens_per_s_p50 == pytest.approx(10.0)  # 10, 10, 10
    assert level.first_error == "APIConnectionError: Connection error."
    assert len(level.records) == 4
    row = level.as_row()
    assert row["first_error"].startswith("APIConnectionError") and "records" not in row


def test_summarize_with_explicit_wall_time_and_all_failed():
    failed = [RequestRecord(0.0, 1.0, error="X: boom")] * 3
    level = loadtest._summarize(1, failed, wall_s=1.5)
    assert level.wall_s == 1.5 and level.ok == 0 and level.errors == 3
    assert level.aggregate_tokens_per_s is None and level.ttft_p50_s is None
    assert level.first_error == "X: boom"
    empty = loadtest._summarize(4, [])
    assert empty.requests == 0 and empty.wall_s == 0.0


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/v1", "http://localhost:1/v1", "http://[::1]:9/v1"]
)
def test_loopback_urls_are_allowed(url: str):
    loadtest._check_loopback(url)


@pytest.mark.parametrize("url", ["http://10.0.0.5:8000/v1", "https://api.openai.com/v1"])
def test_other_hosts_are_refused(url: str):
    with pytest.raises(ValueError, match="loopback"):
        loadtest.sweep(url, "m", [1])


def test_levels_are_bounded():
    with pytest.raises(ValueError, match="concurrency"):
        asyncio.run(loadtest._run_level(None, "m", 0, 1))
    with pytest.raises(ValueError, match="requests"):
        asyncio.run(loadtest._run_level(None, "m", 1, 257))
    with pytest.raises(ValueError, match="prompts"):
        asyncio.run(loadtest._run_level(None, "m", 1, 1, prompts=()))


# --------------------------------------------------------------------------------------
# a real sweep against the fake server
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory):
    log_dir = tmp_path_factory.mktemp("fake")
    with fake_openai_server(log_dir, "--token-delay", "0.002") as server:
        yield server


def test_sweep_against_fake_server(fake: serve.Server):
    lines: list[str] = []
    levels = loadtest.sweep(
        fake.openai_base_url, "fake-model", [1, 2, 4], max_tokens=12, log=lines.append
    )
    assert [lvl.concurrency for lvl in levels] == [1, 2, 4]
    assert [lvl.requests for lvl in levels] == [2, 4, 8], "default: 2 requests per slot"
    for lvl in levels:
        assert lvl.errors == 0 and lvl.ok == lvl.requests
        assert lvl.output_tokens == 12 * lvl.requests, "tokens come from the usage chunk"
        assert lvl.aggregate_tokens_per_s == pytest.approx(lvl.output_tokens / lvl.wall_s)
        assert 0 < lvl.ttft_p50_s <= lvl.ttft_p95_s < lvl.e2e_p95_s
    assert len(lines) == 3 and lines[2].startswith("concurrency   4: 8/8 ok")
    df = measure.to_frame(levels, model="fake")
    assert list(df["concurrency"]) == [1, 2, 4] and set(df["model"]) == {"fake"}
    fig = loadtest.plot_sweep(df, by="model", baselines={"single stream (fake)": 100.0})
    assert len(fig.axes) == 3
    model_line, baseline = fig.axes[0].get_lines()[0], fig.axes[0].get_lines()[-1]
    assert baseline.get_ydata()[0] == 100.0
    assert baseline.get_color() == model_line.get_color(), "a baseline takes its model's color"


def test_sweep_runs_inside_a_running_event_loop(fake: serve.Server):
    """Jupyter runs cells inside an event loop; sweep must still work there."""

    async def notebook_cell():
        return loadtest.sweep(fake.openai_base_url, "fake-model", [2], max_tokens=4, log=None)

    (level,) = asyncio.run(notebook_cell())
    assert level.ok == 4


def test_failed_requests_are_counted_not_raised(fake: serve.Server):
    (level,) = loadtest.sweep(
        fake.openai_base_url, "no-such-model", [2], warmup_requests=0, log=None
    )
    assert level.errors == 4 and level.ok == 0 and level.aggregate_tokens_per_s is None
    assert level.first_error.startswith("NotFoundError")


def test_level_budget_stops_starting_requests(fake: serve.Server):
    (level,) = loadtest.sweep(
        fake.openai_base_url,
        "fake-model",
        [1],
        requests_per_level=200,
        max_tokens=50,  # ~0.1 s per request
        level_budget_s=0.3,
        warmup_requests=0,
        log=None,
    )
    assert 1 <= level.requests < 20
