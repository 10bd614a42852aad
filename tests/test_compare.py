"""labhelpers.compare / backends / measurement / verdict: the comparison of notebook 06,
on fake data (no model is loaded, no server started)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from labhelpers import backends as bk
from labhelpers import compare, measurement, quant, verdict
from labhelpers.serve import HttpAnswer

torch = pytest.importorskip("torch")

MACHINE = {
    "date": "2026-11-25T10:00:00+00:00",
    "cpu_model": "Test CPU",
    "usable_cpus": 2,
    "gpus": [],
    "gpu_usable": False,
    "cpu_bandwidth_gbps": 10.0,
    "cpu_bandwidth_threads": 1,
    "gpu_bandwidth_gbps": None,
}


def row(name: str, decode: float, *, ppl: float | None = None, mem: float = 1.0, **kw):
    """A measured row of the table with the columns recommend() reads."""
    return {
        "backend": name,
        "status": "measured",
        "decode_tok_s": decode,
        "perplexity": ppl,
        "peak_mem_gb": mem,
        "ttft_s": 0.1,
        **kw,
    }


def skipped(name: str, reason: str):
    return compare.skipped_row(bk.BACKENDS[name], reason)


# --------------------------------------------------------------------------- perplexity


class PositionAware(torch.nn.Module):
    """logits[t] = table[token t] + bias[position t in the window]: the score of a token
    depends on where its window starts, so only identical windowing gives equal numbers."""

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


@pytest.mark.parametrize(("window", "stride"), [(8, 8), (8, 3), (16, 5), (64, 64)])
def test_perplexity_from_logprobs_equals_quant_perplexity(window, stride):
    model = PositionAware()
    ids = torch.randint(0, 11, (41,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = quant.perplexity(model, ids, window=window, stride=stride)
    got = quant.perplexity_from_logprobs(model.logprobs, ids, window=window, stride=stride)
    assert got == pytest.approx(expected, rel=1e-6)


def test_perplexity_from_logprobs_rejects_a_wrong_score_length():
    with pytest.raises(ValueError, match="expected 3"):
        quant.perplexity_from_logprobs(lambda chunk: [0.0], [1, 2, 3, 4], window=4, stride=4)
    with pytest.raises(ValueError, match="stride"):
        quant.perplexity_from_logprobs(lambda chunk: [], [1, 2, 3], window=2, stride=3)


class FakeServer:
    """Answers /v1/completions like vLLM with prompt_logprobs=0."""

    def __init__(self, model: PositionAware):
        self.model = model
        self.bodies: list[dict] = []

    def request(self, method, path, body, **kw):
        self.bodies.append(body)
        lps = self.model.logprobs(body["prompt"])
        entries = [None] + [
            {str(tok): {"logprob": lp, "rank": 1}}
            for tok, lp in zip(body["prompt"][1:], lps, strict=True)
        ]
        return HttpAnswer(200, {"choices": [{"text": "x", "prompt_logprobs": entries}]})


def test_server_perplexity_reads_prompt_logprobs_window_by_window():
    model, ids = PositionAware(), [i % 11 for i in range(30)]
    settings = bk.Settings(eval_window=16, eval_stride=8)
    server = FakeServer(model)
    got = measurement.server_perplexity(server, "m", ids, settings)
    assert got == pytest.approx(quant.perplexity(model, ids, window=16, stride=8), rel=1e-6)
    assert [len(b["prompt"]) for b in server.bodies] == [16, 16, 14]  # starts 0, 8, 16
    assert all(b["prompt_logprobs"] == 0 and b["max_tokens"] == 1 for b in server.bodies)


def test_server_perplexity_says_what_the_server_answered():
    class Refusing:
        def request(self, *a, **kw):
            return HttpAnswer(400, {"error": {"message": "prompt_logprobs not supported"}})

    with pytest.raises(RuntimeError, match="HTTP 400.*not supported"):
        measurement.server_perplexity(Refusing(), "m", list(range(10)), bk.Settings())


# --------------------------------------------------------------------------- settings, CLI


def test_settings_validate_and_survive_json():
    s = bk.Settings(concurrency=[8, 1, 2, 2], max_new_tokens=16)
    assert s.concurrency == (1, 2, 8)
    assert s.gptq_name == "Qwen2.5-0.5B-Instruct-GPTQ-Int4"
    again = bk.Settings.from_dict(json.loads(json.dumps(s.as_dict())) | {"unknown": 1})
    assert again == s
    for bad in ({"max_new_tokens": 1}, {"concurrency": []}, {"eval_stride": 2048}, {"prompts": ()}):
        with pytest.raises(ValueError):
            bk.Settings(**bad)


def test_get_backends_by_name():
    assert [b.name for b in bk.get_backends("all")] == list(bk.BACKENDS)
    assert [b.name for b in bk.get_backends("vllm-bf16, transformers-fp32")] == [
        "vllm-bf16",
        "transformers-fp32",
    ]
    with pytest.raises(ValueError, match="choose from transformers-fp32"):
        bk.get_backends("vllm")


def test_cli_arguments_become_settings():
    settings, args = compare.parse_args(
        [
            "--backends",
            "transformers-bf16,ipex-sym_int4",
            "--max-new-tokens",
            "16",
            "--repeats",
            "2",
            "--concurrency",
            "1,4",
            "--model",
            "Qwen2.5-1.5B-Instruct",
            "--out-dir",
            "/tmp/x",
        ]
    )
    assert (settings.max_new_tokens, settings.repeats, settings.concurrency) == (16, 2, (1, 4))
    assert settings.gptq_name == "Qwen2.5-1.5B-Instruct-GPTQ-Int4"
    assert args.backends == "transformers-bf16,ipex-sym_int4" and args.out_dir == "/tmp/x"
    defaults, _ = compare.parse_args([])
    assert defaults == bk.Settings()


@pytest.mark.parametrize("bad", [["--backends", "llamacpp"], ["--concurrency", "0"]])
def test_cli_rejects_bad_arguments(bad, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(bad)
    assert "error" in capsys.readouterr().err


def test_server_command_lines(tmp_path, monkeypatch):
    cpu = measurement.make_server(bk.BACKENDS["vllm-bf16"], str(tmp_path), on_gpu=False)
    assert cpu.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert {"--dtype", "bfloat16", "--enforce-eager"} <= set(cpu.argv)
    assert cpu.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and cpu.host == "127.0.0.1"
    gpu = measurement.make_server(bk.BACKENDS["vllm-gptq-int4"], str(tmp_path), on_gpu=True)
    assert "--gpu-memory-utilization" in gpu.argv and "--dtype" not in gpu.argv
    assert gpu.env == {}
    monkeypatch.setattr(measurement, "env_python", lambda kernel, venv: None)
    trt = measurement.make_server(bk.BACKENDS["trtllm"], str(tmp_path), on_gpu=True)
    verified = json.loads((Path(bk.__file__).parent / "data" / "trtllm_flags.json").read_text())
    flags = [w for w in trt.argv if w.startswith("--")]
    assert set(flags) <= set(verified["tools"]["trtllm-serve"]["flags"]), flags
    assert trt.argv[0].endswith("trtllm-serve") and trt.argv[1] == str(tmp_path)


# --------------------------------------------------------------------------- skip reasons


def test_gpu_backend_is_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(bk.env, "gpu_status", lambda: (False, "none found"))
    assert bk.skip_reason(bk.BACKENDS["trtllm"]) == "needs an NVIDIA GPU (none found)"


def test_missing_ipex_environment_says_to_run_setup(monkeypatch):
    monkeypatch.setattr(bk, "env_python", lambda kernel, venv: None)
    reason = bk.skip_reason(bk.BACKENDS["ipex-sym_int4"])
    assert "./course setup" in reason and "qwen-lab-ipex" in reason


def test_skipped_row_has_every_column_and_no_numbers():
    r = skipped("trtllm", "needs an NVIDIA GPU")
    assert set(compare.COLUMNS) <= set(r)
    assert r["status"] == "skipped" and r["skipped_reason"] == "needs an NVIDIA GPU"
    assert r["decode_tok_s"] is None and r["perplexity"] is None


def test_run_never_raises_and_every_row_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(compare.models, "resolve", lambda name, log=print: tmp_path)
    monkeypatch.setattr(compare, "heldout_ids", lambda d, s: [1, 2, 3])
    monkeypatch.setattr(
        bk, "skip_reason", lambda b: None if b.name == "vllm-bf16" else f"no {b.engine} here"
    )

    def broken(*a, **kw):
        raise OSError("port 8000 taken")

    monkeypatch.setattr(measurement, "measure_server", broken)
    result = compare.run(None, bk.Settings(), log=lambda line: None, machine=MACHINE)
    by = {r["backend"]: r for r in result.rows}
    assert list(by) == list(bk.BACKENDS)
    assert by["vllm-bf16"]["status"] == "failed"
    assert "OSError: port 8000 taken" in by["vllm-bf16"]["skipped_reason"]
    assert by["trtllm"]["skipped_reason"] == "no tensorrt-llm here"
    assert "No backend was measured" in result.recommendation()


# --------------------------------------------------------------------------- derived columns


def test_finish_rows_roofline_twin_perplexity_and_top_level():
    kv = {"num_layers": 2, "num_kv_heads": 1, "head_dim": 4}
    tf = row(
        "transformers-bf16",
        20.0,
        ppl=10.0,
        weight_bytes=10**9,
        kv=kv,
        kv_bytes_per_elem=2,
        prompt_tokens=10,
        new_tokens=20,
    )
    fp32 = row("transformers-fp32", 10.0, ppl=8.0)
    server = row(
        "vllm-bf16",
        5.0,
        sweep=[
            {"concurrency": 1, "aggregate_tok_s": 5.0},
            {"concurrency": 8, "aggregate_tok_s": 30.0},
            {"concurrency": 16, "aggregate_tok_s": None},
        ],
    )
    rows = [tf, fp32, server]
    compare.finish_rows(rows, MACHINE)
    context = 10 + 20 // 2
    per_token = 10**9 + 2 * 2 * 1 * 4 * context * 2
    assert tf["roofline_tok_s"] == pytest.approx(10e9 / per_token)
    assert tf["pct_of_roofline"] == pytest.approx(100 * 20.0 / (10e9 / per_token))
    assert server["perplexity"] == 10.0 and "transformers-bf16" in server["perplexity_source"]
    assert (server["aggregate_tok_s"], server["at_concurrency"]) == (30.0, 8)
    assert tf["ppl_increase_pct"] == pytest.approx(25.0)  # vs the fp32 reference
    assert fp32["ppl_increase_pct"] == pytest.approx(0.0)


def test_summarize_runs_takes_medians():
    from labhelpers.bench import GenerationResult

    runs = [
        GenerationResult("x", n, t, d, 1.0, 1.0, prompt_tokens=12)
        for n, t, d in [(8, 0.3, 10.0), (8, 0.1, 30.0), (6, 0.2, 20.0)]
    ]
    got = bk.summarize_runs(runs)
    assert (got["ttft_s"], got["decode_tok_s"], got["new_tokens"]) == (0.2, 20.0, 8)
    assert got["timed_runs"] == 3 and got["prompt_tokens"] == 12


def test_streamed_bytes_count_the_lm_head_once_and_skip_the_input_table(tmp_path):
    from safetensors.torch import save_file

    class Tiny(torch.nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            self.embed = torch.nn.Embedding(100, 8)
            self.lm_head = torch.nn.Linear(8, 100, bias=False)
            self.rotary_emb = torch.nn.Module()
            self.rotary_emb.register_buffer("cos_cached", torch.zeros(1000, 8))
            if tied:
                self.lm_head.weight = self.embed.weight

        def get_input_embeddings(self):
            return self.embed

        def get_output_embeddings(self):
            return self.lm_head

    assert bk.streamed_weight_bytes(Tiny(tied=True)) == 100 * 8 * 4
    assert bk.streamed_weight_bytes(Tiny(tied=False)) == 100 * 8 * 4  # only the head is read
    save_file(
        {
            "model.embed_tokens.weight": torch.zeros(100, 8),
            "lm_head.weight": torch.zeros(100, 8),
            "model.norm.weight": torch.zeros(8),
        },
        str(tmp_path / "model.safetensors"),
    )
    assert bk.checkpoint_streamed_bytes(tmp_path) == (100 * 8 + 8) * 4


# --------------------------------------------------------------------------- recommendation

TABLE = [
    row("transformers-fp32", 20.0, ppl=10.0, mem=1.0, aggregate_tok_s=60.0, at_concurrency=8),
    row(
        "transformers-gptq-int4",
        50.0,
        ppl=13.0,
        mem=0.8,
        pct_of_roofline=40.0,
        aggregate_tok_s=120.0,
        at_concurrency=8,
        disk_gb=0.12,
    ),
    row("vllm-gptq-int4", 45.0, ppl=13.1, mem=3.5, aggregate_tok_s=200.0, at_concurrency=8),
    row("ipex-sym_int4", 60.0, ppl=19.0, mem=1.3),
    skipped("trtllm", "needs an NVIDIA GPU (none found)"),
]


def test_recommendation_is_computed_from_the_numbers():
    text = verdict.recommend(TABLE, max_ppl_increase=0.5)
    lines = text.splitlines()
    # ipex is fastest but +90% perplexity: too costly, so GPTQ through transformers wins
    assert lines[0].startswith("- For one user on this machine: transformers-gptq-int4 — 50.0")
    assert "(40% of the memory-bandwidth roofline)" in lines[0]
    assert lines[1].startswith("- For 8 concurrent users: vllm-gptq-int4 — 200 tokens/s")
    assert "4.0x what transformers-gptq-int4" in lines[1]
    assert "Smallest footprint: transformers-gptq-int4 — 0.80 GB peak memory, 0.12 GB" in text
    assert "Most speed per GB of memory: transformers-gptq-int4 — 62.5 tokens/s per GB" in text
    assert "reference transformers-fp32 = 10.00" in text and "ipex-sym_int4 +90.0%" in text
    assert "too costly here: ipex-sym_int4" in text
    assert lines[-1] == "- Not measured here: trtllm (needs an NVIDIA GPU (none found))."


def test_a_looser_quality_bar_changes_the_answer():
    text = verdict.recommend(TABLE, max_ppl_increase=1.0)
    assert text.splitlines()[0].startswith("- For one user on this machine: ipex-sym_int4")


def test_ties_go_to_the_smaller_memory_and_are_said():
    rows = [row("vllm-bf16", 51.0, mem=3.8), row("transformers-bf16", 50.0, mem=0.9)]
    first = verdict.recommend(rows).splitlines()[0]
    assert "transformers-bf16 — 50.0" in first
    assert "vllm-bf16 is as good (within 5%" in first and "smaller memory" in first
    clear = verdict.recommend(rows, tie_tolerance=0.01).splitlines()[0]
    assert "vllm-bf16 — 51.0" in clear and "as good" not in clear


def test_missing_columns_and_rows_are_handled():
    text = verdict.recommend([row("transformers-bf16", 30.0, ppl=None, mem=None)])
    assert "For one user on this machine: transformers-bf16 — 30.0 tokens/s decode" in text
    assert "No backend was measured under concurrency" in text
    assert "no perplexity was measured" in text and "Smallest footprint" not in text
    no_ref = verdict.recommend([row("vllm-gptq-int4", 30.0, ppl=12.5)])
    assert "vllm-gptq-int4 12.50" in no_ref and "cost of quantizing is unknown" in no_ref


def test_all_skipped_tables_get_a_sentence_with_the_reasons():
    import pandas as pd

    table = pd.DataFrame(
        [skipped("trtllm", "needs an NVIDIA GPU"), skipped("vllm-bf16", "no vllm")]
    )
    text = verdict.recommend(table, machine="a laptop")
    assert text.splitlines() == [
        "- No backend was measured on a laptop, so there is nothing to recommend.",
        "- Not measured here: trtllm (needs an NVIDIA GPU); vllm-bf16 (no vllm).",
    ]


def test_when_every_backend_is_too_costly_the_choice_says_so():
    rows = [row("transformers-bf16", 10.0, ppl=10.0), row("ipex-sym_int4", 20.0, ppl=30.0)]
    text = verdict.recommend(rows, max_ppl_increase=-0.5)
    assert "Every measured backend loses more than -50%" in text
    assert "For one user on this machine: ipex-sym_int4" in text


# --------------------------------------------------------------------------- files


def test_write_produces_csv_json_and_chart(tmp_path):
    rows = [dict(r) for r in TABLE]
    rows[0] |= {
        "sweep": [
            {"concurrency": 1, "aggregate_tok_s": 20.0},
            {"concurrency": 8, "aggregate_tok_s": 60.0},
        ],
        "sweep_mode": "static batch",
        "answers": ["Paris.", "A cache.", "量化。"],
        "roofline_tok_s": float("nan"),
    }
    settings = bk.Settings(max_new_tokens=8)
    result = compare.Comparison(rows=rows, machine=MACHINE, settings=settings, command="x")
    files = result.write(tmp_path / "out")
    with open(files["results.csv"], newline="") as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0]) == compare.COLUMNS
    assert [r["backend"] for r in table] == [r["backend"] for r in TABLE]
    assert table[-1]["skipped_reason"] == "needs an NVIDIA GPU (none found)"
    data = json.loads(files["results.json"].read_text())
    assert data["machine"]["cpu_model"] == "Test CPU" and data["command"] == "x"
    assert data["rows"][0]["roofline_tok_s"] is None  # NaN is not valid JSON
    assert data["recommendation"].startswith("- For one user")
    assert files["comparison.png"].read_bytes()[:4] == b"\x89PNG"
    assert "8,60" in files["sweep.csv"].read_text()
    answers = result.answers_frame()
    assert answers.loc[settings.prompts[2], "transformers-fp32"] == "量化。"


def test_machine_slug():
    assert compare.machine_slug(MACHINE) == "cpu-2core"
    gpu = MACHINE | {"gpu_usable": True, "gpus": [{"name": "NVIDIA A10G"}]}
    assert compare.machine_slug(gpu) == "gpu-nvidia-a10g"


def test_worker_writes_its_row_or_fails_visibly(tmp_path, monkeypatch, capsys):
    job = tmp_path / "job.json"
    settings = bk.Settings().as_dict()
    job.write_text(
        json.dumps(
            {
                "backend": "transformers-bf16",
                "model_dir": "/m",
                "settings": settings,
                "eval_ids": [1, 2],
            }
        )
    )
    monkeypatch.setattr(
        measurement,
        "measure_in_process",
        lambda b, d, s, ids, log: {"backend": b.name, "x": math.inf},
    )
    assert compare.main(["--worker", str(job)]) == 0
    assert json.loads((tmp_path / "row.json").read_text()) == {
        "backend": "transformers-bf16",
        "x": None,
    }

    def boom(*a, **kw):
        raise MemoryError("out of RAM")

    monkeypatch.setattr(measurement, "measure_in_process", boom)
    assert compare.worker_main(str(job)) == 1
    assert "MemoryError: out of RAM" in capsys.readouterr().err


# --------------------------------------------------------------------------- imports


def test_import_is_instant():
    code = (
        "import sys, labhelpers.compare, labhelpers.measurement; "
        "heavy = ('torch', 'transformers', 'pandas', 'matplotlib'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_imports_under_the_ipex_environment():
    python = bk.env_python(bk.IPEX_KERNEL, "ipex")
    if python is None:
        pytest.skip("the IPEX-LLM environment is not set up here")
    root = Path(compare.__file__).resolve().parent.parent
    code = "import labhelpers.compare, labhelpers.measurement, labhelpers.verdict; print('ok')"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
