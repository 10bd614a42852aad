"""whichbackend (notebook 06): settings and backends, the CLI, how each backend is measured,
the derived columns, the recommendation and the files, on fake rows and fake servers; one slow
test measures the stand-in for real through the worker protocol."""

from __future__ import annotations

import csv
import importlib
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import whichbackend as compare
from labhelpers import measure
from whichbackend import backends as bk
from whichbackend import runs
from whichbackend.__main__ import _default_out_dir
from whichbackend.__main__ import _main as cli_main
from whichbackend.__main__ import _parse_args as parse_args

rec = compare  # the table, the recommendation and the chart live in whichbackend/__init__.py
ROOT = Path(__file__).resolve().parent.parent
MACHINE = {
    "date": "2026-11-25T10:00:00+00:00",
    "cpu_model": "Test CPU",
    "usable_cpus": 2,
    "gpus": [],
    "gpu_usable": False,
    "bandwidth_gbps": 10.0,
    "bandwidth_device": "cpu",
    "bandwidth_threads": 1,
    "gpu_datasheet_gbps": None,
}
# A toy Qwen2 (2 layers, 1 KV head of 4 dims) for the roofline of finish_rows.
TOY = {
    "model_type": "qwen2",
    "hidden_size": 8,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "num_hidden_layers": 2,
    "intermediate_size": 16,
    "vocab_size": 10,
    "max_position_embeddings": 64,
}


def row(name: str, decode: float, *, ppl: float | None = None, mem: float | None = 1.0, **kw):
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
    return compare._skipped_row(bk._BACKENDS[name], reason)


# --------------------------------------------------------------------------- settings, backends


def test_settings_validate_and_survive_json():
    s = bk.Settings(concurrency=[8, 1, 2, 2], max_new_tokens=16)
    assert s.concurrency == (1, 2, 8)
    assert s.gptq_name == "Qwen2.5-0.5B-Instruct-GPTQ-Int4"
    assert bk.Settings(gptq_model="/work/my-gptq").gptq_name == "/work/my-gptq", "notebook 02's own"
    again = bk.Settings.from_dict(json.loads(json.dumps(s.as_dict())) | {"unknown": 1})
    assert again == s
    for bad in (
        {"max_new_tokens": 1},
        {"concurrency": []},
        {"concurrency": [0]},
        {"eval_stride": 2048},
        {"prompts": ()},
        {"threads": 0},
    ):
        with pytest.raises(ValueError):
            bk.Settings(**bad)


def test_get_backends_by_name():
    assert [b.name for b in bk.get_backends("all")] == list(bk._BACKENDS)
    assert [b.name for b in bk.get_backends(None)] == list(bk._BACKENDS)
    assert [b.name for b in bk.get_backends("vllm-bf16, transformers-fp32,vllm-bf16")] == [
        "vllm-bf16",
        "transformers-fp32",
    ]
    with pytest.raises(ValueError, match="choose from transformers-fp32"):
        bk.get_backends("vllm")
    gptq = {b.name for b in bk._BACKENDS.values() if b.weights_from == "gptq"}
    assert gptq == {"transformers-gptq-int4", "vllm-gptq-int4"}
    assert all(b.twin in bk._BACKENDS for b in bk._BACKENDS.values() if b.twin)


def test_skip_reasons_say_what_to_do(monkeypatch):
    monkeypatch.setattr(bk, "gpu_status", lambda: (False, "none found"))
    assert bk.skip_reason(bk._BACKENDS["trtllm"]) == "needs an NVIDIA GPU (none found)"
    monkeypatch.setattr(bk, "kernel_python", lambda kernel, venv: None)
    reason = bk.skip_reason(bk._BACKENDS["ipex-sym_int4"])
    assert "IPEX-LLM environment" in reason and "./course setup" in reason
    monkeypatch.setattr(bk.util, "find_spec", lambda name: None)
    assert "vllm is not installed" in bk.skip_reason(bk._BACKENDS["vllm-bf16"])
    assert "gptqmodel is not installed" in bk.skip_reason(bk._BACKENDS["transformers-gptq-int4"])
    assert bk.skip_reason(bk._BACKENDS["transformers-bf16"]) is None
    reason = bk.skip_reason(bk._BACKENDS["openvino-int4"])
    assert "OpenVINO environment (.venvs/openvino)" in reason and "./course setup" in reason
    why = "building llama-cpp-python failed on this machine (log: /x.log)"
    monkeypatch.setattr(bk, "llama_cpp_setup", lambda: (None, why))
    assert bk.skip_reason(bk._BACKENDS["llama.cpp"]) == why
    monkeypatch.setattr(bk, "llama_cpp_setup", lambda: (Path("/conv"), "llama-cpp-python 0.3.36"))
    assert bk.skip_reason(bk._BACKENDS["llama.cpp"]) is None


def test_the_cpu_int4_rows_use_notebook_07s_and_07bs_recipes():
    """llama.cpp's GGUF type is one notebook 07 measures; openvino-int4 is exported like 07b."""

    def parameters(name: str) -> dict:
        nb = json.loads((ROOT / "notebooks" / name).read_text(encoding="utf-8"))
        cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
        values: dict = {}
        exec("".join(cell["source"]), values)  # the notebook's own knobs
        return values

    assert bk.GGUF_TYPE in parameters("07_llama_cpp_gguf.ipynb")["QUANT_TYPES"]
    assert bk._BACKENDS["llama.cpp"].weights == f"gguf {bk.GGUF_TYPE}"
    nb06 = (ROOT / "notebooks" / "06_which_backend.ipynb").read_text(encoding="utf-8")
    assert f"GGUF `{bk.GGUF_TYPE}`" in nb06, "notebook 06's table names the type measured"
    p = parameters("07b_openvino_int4.ipynb")
    recipe = dict(zip(bk.OPENVINO_EXPORT[:-1:2], bk.OPENVINO_EXPORT[1::2], strict=False))
    assert recipe["--weight-format"] == p["WEIGHT_FORMAT"] == "int4"
    assert int(recipe["--group-size"]) == p["GROUP_SIZE"] and float(recipe["--ratio"]) == p["RATIO"]
    assert bk.OPENVINO_EXPORT[-1] == "--sym" and p["SYM"] is True
    assert {b.name for b in bk._BACKENDS.values() if b.cpu_only} == {
        "ipex-sym_int4",
        "openvino-int4",
        "llama.cpp",
    }


# --------------------------------------------------------------------------- the CLI


def test_cli_arguments_become_settings():
    settings, args = parse_args(
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
            "--gptq-model",
            "/work/q",
            "--out-dir",
            "/tmp/x",
        ]
    )
    assert (settings.max_new_tokens, settings.repeats, settings.concurrency) == (16, 2, (1, 4))
    assert settings.model == "Qwen2.5-1.5B-Instruct" and settings.gptq_name == "/work/q"
    assert args.backends == "transformers-bf16,ipex-sym_int4" and args.out_dir == "/tmp/x"
    assert parse_args([])[0] == bk.Settings()


@pytest.mark.parametrize(
    "bad", [["--backends", "llamacpp"], ["--concurrency", "0"], ["--repeats", "0"]]
)
def test_cli_rejects_bad_arguments(bad, capsys):
    with pytest.raises(SystemExit):
        parse_args(bad)
    assert "error" in capsys.readouterr().err


def test_cli_lists_the_backends_and_why_they_cannot_run(monkeypatch, capsys):
    cli = importlib.import_module("whichbackend.__main__")
    monkeypatch.setattr(cli, "skip_reason", lambda b: "needs a GPU" if b.gpu_only else None)
    assert cli_main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(bk._BACKENDS)
    assert lines[-1].endswith("needs a GPU") and lines[0].endswith("can run here")


# --------------------------------------------------------------------------- how backends run


def test_measure_dispatches_by_runner(monkeypatch):
    calls = []
    monkeypatch.setattr(
        runs, "_measure_server", lambda b, *a, **k: calls.append(("server", b.name)) or {}
    )
    monkeypatch.setattr(
        runs, "_measure_ipex", lambda b, *a, **k: calls.append(("ipex", b.name)) or {}
    )

    def worker(python, function, **kwargs):
        calls.append(("worker", kwargs["backend"]))
        assert python == sys.executable and function == "whichbackend.runs:measure_in_process"
        assert kwargs["settings"] == bk.Settings().as_dict() and kwargs["eval_ids"] == [1, 2]
        assert kwargs["name"] == f"compare-{kwargs['backend']}"
        return {}

    monkeypatch.setattr(runs, "run_in_env", worker)
    for runner in ("openvino", "llama_cpp"):
        monkeypatch.setattr(
            runs, f"_measure_{runner}", lambda b, *a, r=runner, **k: calls.append((r, b.name)) or {}
        )
    names = ("vllm-bf16", "ipex-sym_int4", "transformers-fp32", "openvino-int4", "llama.cpp")
    for name in names:
        runs.measure(bk._BACKENDS[name], "/m", bk.Settings(), (1, 2), log=lambda _: None)
    assert calls == [
        ("server", "vllm-bf16"),
        ("ipex", "ipex-sym_int4"),
        ("worker", "transformers-fp32"),
        ("openvino", "openvino-int4"),
        ("llama_cpp", "llama.cpp"),
    ]


def test_the_ipex_row_maps_notebook_03s_measurement(monkeypatch, tmp_path: Path):
    got = {
        "format": "sym_int4",
        "load_s": 1.5,
        "ttft_s": 0.2,
        "decode_tokens_per_s": 30.0,
        "new_tokens": 8,
        "prompt_tokens": 20,
        "answers": ["Paris."],
        "sweep": [{"concurrency": 2, "aggregate_tok_s": 50.0}],
        "peak_rss_bytes": 2 * 10**9,
        "disk_bytes": 10**8,
        "perplexity": 12.0,
        "streamed_bytes": 10**8,
        "convert_s": 3.25,
        "kernel_build": "avx2",
    }
    seen = {}

    def fake(model_dir, low_bit, **kw):
        seen.update(kw, model_dir=model_dir, low_bit=low_bit)
        return dict(got)

    monkeypatch.setattr(runs.ipex, "measure_format_in_env", fake)
    monkeypatch.setattr(runs, "dist_version", lambda dist, python=None: "2.2.0")
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 1000)
    settings = bk.Settings(threads=2, concurrency=(1, 2))
    r = runs._measure_ipex(
        bk._BACKENDS["ipex-sym_int4"], str(tmp_path), settings, [5, 6], log=lambda _: None
    )
    assert (seen["low_bit"], seen["threads"], seen["eval_ids"], seen["batch_sizes"]) == (
        "sym_int4",
        2,
        [5, 6],
        [1, 2],
    )
    assert (r["backend"], r["decode_tok_s"], r["peak_mem_gb"], r["disk_gb"]) == (
        "ipex-sym_int4",
        30.0,
        2.0,
        0.1,
    )
    assert r["weight_bytes"] == 10**8 and r["engine_version"] == "2.2.0"
    assert "kernel build avx2" in r["note"]
    monkeypatch.setattr(
        runs.ipex, "measure_format_in_env", lambda *a, **k: {"format": "x", "error": "boom"}
    )
    with pytest.raises(RuntimeError, match="boom"):
        runs._measure_ipex(
            bk._BACKENDS["ipex-sym_int4"], str(tmp_path), settings, [5], log=lambda _: None
        )


class FakeServer:
    """serve.Server without a process: records its command line and its health path."""

    made: list = []

    def __init__(self, argv, *, port, name, health_path="/health", **kw):
        self.argv, self.port, self.name, self.health_path = argv, port, name, health_path
        self.openai_base_url, self.api_key, self.stopped = (
            f"http://127.0.0.1:{port}/v1",
            None,
            False,
        )
        FakeServer.made.append(self)

    def start(self, timeout_s=300, *, log=print):
        return self

    def stop(self, timeout_s=20, *, log=print):
        self.stopped = True


def test_the_llama_cpp_row_measures_in_a_worker_and_sweeps_through_its_server(
    monkeypatch, tmp_path: Path
):
    gguf_file = tmp_path / "model-Q4_0.gguf"
    monkeypatch.setattr(runs, "_gguf_file", lambda model_dir, log: (gguf_file, "made earlier"))
    got = {"load_s": 0.2, "ttft_s": 0.05, "decode_tokens_per_s": 150.0, "new_tokens": 32,
           "prompt_tokens": 40, "answers": ["Paris."], "peak_rss_bytes": 3 * 10**8,
           "file_bytes": 9 * 10**7, "streamed_bytes": 8 * 10**7, "perplexity": 19.6}  # fmt: skip
    jobs, sweeps = [], []

    def worker(python, function, **kw):
        jobs.append((python, function, kw))
        return dict(got)

    def sweep(base_url, model, levels, **kw):
        sweeps.append((base_url, model, levels, kw))
        return [
            SimpleNamespace(concurrency=c, aggregate_tokens_per_s=60.0, errors=0) for c in levels
        ]

    monkeypatch.setattr(runs, "run_in_env", worker)
    monkeypatch.setattr(runs.serve, "Server", FakeServer)
    monkeypatch.setattr(runs.serve, "free_port", lambda: 4321)
    monkeypatch.setattr(runs.loadtest, "sweep", sweep)
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 10)
    s = bk.Settings(threads=1, concurrency=(1, 4), max_new_tokens=16)
    r = runs._measure_llama_cpp(bk._BACKENDS["llama.cpp"], str(tmp_path), s, [7, 8], log=print)
    python, function, kw = jobs[0]
    assert (python, function) == (sys.executable, "labhelpers.gguf:measure_gguf")
    assert kw["path"] == str(gguf_file) and kw["eval_ids"] == [7, 8] and kw["threads"] == 1
    assert kw["env"] == {"OMP_NUM_THREADS": "1"} and kw["max_new_tokens"] == 16
    server = FakeServer.made[-1]
    assert server.argv[1:3] == ["-m", "llama_cpp.server"] and server.health_path == "/v1/models"
    assert server.argv[server.argv.index("--interrupt_requests") + 1] == "false", "requests queue"
    assert server.argv[server.argv.index("--n_threads") + 1] == "1" and server.stopped
    assert sweeps[0][2] == (1, 4) and sweeps[0][3]["extra_body"] == {"min_tokens": 16}
    assert (r["decode_tok_s"], r["perplexity"], r["weight_bytes"], r["disk_gb"]) == (
        150.0,
        19.6,
        8 * 10**7,
        0.09,
    )
    assert [lv["concurrency"] for lv in r["sweep"]] == [1, 4]
    assert "one request at a time" in r["note"] and r["memory_kind"] == "RSS (process)"


def test_the_openvino_row_runs_in_its_environment_with_the_core_token_ids(
    monkeypatch, tmp_path: Path
):
    python = tmp_path / "ov" / "bin" / "python"
    monkeypatch.setattr(runs, "kernel_python", lambda kernel, venv: python)
    monkeypatch.setattr(runs, "_openvino_ir", lambda m, p, log: (tmp_path / "ir", "exported"))
    got = {"load_s": 2.0, "ttft_s": 0.03, "decode_tokens_per_s": 110.0, "new_tokens": 32,
           "prompt_tokens": 41, "answers": ["Paris."], "sweep": [{"concurrency": 8,
           "aggregate_tok_s": 400.0}], "peak_rss_bytes": 4 * 10**8, "disk_bytes": 9 * 10**7,
           "weights_bytes": 85 * 10**6, "kv_bytes_per_elem": 1, "perplexity": 20.4,
           "engine_version": "2026.4.1.0", "precision": "bf16"}  # fmt: skip
    seen = {}
    monkeypatch.setattr(
        runs, "run_in_env", lambda py, fn, **kw: seen.update(kw, python=py, fn=fn) or dict(got)
    )
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 10)
    s = bk.Settings(concurrency=(2, 8))
    r = runs._measure_openvino(bk._BACKENDS["openvino-int4"], str(tmp_path), s, [5], log=print)
    assert (seen["python"], seen["fn"]) == (python, "labhelpers.openvino:measure_ir")
    assert seen["eval_ids"] == [5] and seen["batch_sizes"] == [2, 8]
    assert seen["ov_dir"] == str(tmp_path / "ir")
    assert (r["decode_tok_s"], r["kv_bytes_per_elem"], r["perplexity"]) == (110.0, 1, 20.4)
    assert r["sweep"][0]["aggregate_tok_s"] == 400.0 and "bf16" in r["note"]


def test_files_made_from_a_model_change_with_it(tmp_cache: Path, tmp_path: Path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    first = runs._made_from(str(model), "recipe")
    assert first == runs._made_from(str(model), "recipe") and first.parent.name == "whichbackend"
    assert runs._made_from(str(model), "another recipe") != first
    (model / "model.safetensors").write_bytes(b"\0" * 8)
    assert runs._made_from(str(model), "recipe") != first, "rebuilt weights, new files"


def test_server_command_lines(tmp_path: Path, monkeypatch):
    cpu = runs._make_server(bk._BACKENDS["vllm-bf16"], str(tmp_path), on_gpu=False)
    assert cpu.argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert {"--dtype", "bfloat16", "--enforce-eager"} <= set(cpu.argv)
    assert cpu.env["VLLM_CPU_KVCACHE_SPACE"] == "1" and cpu.host == "127.0.0.1"
    gpu = runs._make_server(bk._BACKENDS["vllm-gptq-int4"], str(tmp_path), on_gpu=True)
    assert "--gpu-memory-utilization" in gpu.argv and "--dtype" not in gpu.argv
    assert gpu.env == {} and gpu.before_start is not None, "free GPU memory is checked first"
    for server in (cpu, gpu):  # TTFT includes the prompt, as for llama.cpp and OpenVINO
        assert server.argv[-1] == "--no-enable-prefix-caching"
    monkeypatch.setattr(runs, "kernel_python", lambda kernel, venv: None)
    trt = runs._make_server(bk._BACKENDS["trtllm"], str(tmp_path), on_gpu=True)
    verified = json.loads((ROOT / "labhelpers" / "data" / "trtllm_flags.json").read_text())
    flags = [w for w in trt.argv if w.startswith("--")]
    assert set(flags) <= set(verified["tools"]["trtllm-serve"]["flags"]), flags
    assert trt.argv[0] == str(Path(sys.executable).parent / "trtllm-serve")
    assert trt.argv[1] == str(tmp_path) and trt.model == str(tmp_path)


class PositionAware:
    """log p(token | window) that depends on the token's position in its window, as a server
    with prompt_logprobs=0 returns it; only identical windowing gives identical numbers."""

    def logprobs(self, chunk: list[int]) -> list[float]:
        return [-0.1 * ((t % 5) + 1) - 0.01 * i for i, t in enumerate(chunk[1:])]


def test_server_perplexity_reads_prompt_logprobs_window_by_window(monkeypatch):
    from labhelpers.measure import perplexity_from_logprobs

    model, bodies = PositionAware(), []

    def post(url, json, timeout):
        bodies.append(json)
        entries = [None] + [
            {str(t): {"logprob": lp, "rank": 1}}
            for t, lp in zip(json["prompt"][1:], model.logprobs(json["prompt"]), strict=True)
        ]
        body = {"choices": [{"text": "x", "prompt_logprobs": entries}]}
        return httpx.Response(200, json=body, request=httpx.Request("POST", url))

    monkeypatch.setattr(httpx, "post", post)
    ids = [i % 11 for i in range(30)]
    settings = bk.Settings(eval_window=16, eval_stride=8)
    got = runs._server_perplexity("http://127.0.0.1:1", "m", ids, settings)
    assert got == pytest.approx(perplexity_from_logprobs(model.logprobs, ids, window=16, stride=8))
    assert [len(b["prompt"]) for b in bodies] == [16, 16, 14]  # windows start at 0, 8, 16
    assert all(
        b["prompt_logprobs"] == 0 and b["max_tokens"] == 1 and b["model"] == "m" for b in bodies
    )


def test_server_perplexity_says_what_the_server_answered(monkeypatch):
    def refusing(url, json, timeout):
        body = {"error": {"message": "prompt_logprobs not supported"}}
        return httpx.Response(400, json=body, request=httpx.Request("POST", url))

    monkeypatch.setattr(httpx, "post", refusing)
    with pytest.raises(httpx.HTTPStatusError, match="400"):
        runs._server_perplexity("http://127.0.0.1:1", "m", list(range(10)), bk.Settings())

    def silent(url, json, timeout):
        return httpx.Response(
            200, json={"choices": [{"text": "x"}]}, request=httpx.Request("POST", url)
        )

    monkeypatch.setattr(httpx, "post", silent)
    with pytest.raises(RuntimeError, match="no prompt_logprobs"):
        runs._server_perplexity("http://127.0.0.1:1", "m", list(range(10)), bk.Settings())


# --------------------------------------------------------------------------- run


class FakeTokenizer:
    @classmethod
    def from_pretrained(cls, path):
        return cls()

    def __call__(self, text):
        return {"input_ids": list(range(len(text.split())))}


def test_run_never_raises_and_every_row_says_why(monkeypatch, tmp_path: Path):
    import transformers

    resolved = []
    monkeypatch.setattr(
        compare.models, "resolve", lambda name, log=print: resolved.append(name) or tmp_path
    )
    monkeypatch.setattr(transformers, "AutoTokenizer", FakeTokenizer)
    monkeypatch.setattr(
        compare, "skip_reason", lambda b: None if b.name == "vllm-bf16" else f"no {b.engine} here"
    )

    def broken(*a, **kw):
        raise OSError("port 8000 taken")

    monkeypatch.setattr(compare, "measure", broken)
    lines: list[str] = []
    settings = bk.Settings(gptq_model="/work/q", eval_tokens=5)
    result = compare.run(None, settings, log=lines.append, machine=MACHINE)
    assert resolved == [settings.model, "/work/q"]
    by = {r["backend"]: r for r in result.rows}
    assert list(by) == list(bk._BACKENDS)
    assert by["vllm-bf16"]["status"] == "failed"
    assert "OSError: port 8000 taken" in by["vllm-bf16"]["skipped_reason"]
    assert by["trtllm"]["skipped_reason"] == "no tensorrt-llm here"
    assert "No backend was measured" in result.recommendation()
    assert "held-out text: 5 tokens" in "\n".join(lines)
    assert "10.0 GB/s" in lines[0] and "cpu memory bandwidth" in lines[0]


def test_skipped_row_has_every_column_and_no_numbers():
    r = skipped("trtllm", "needs an NVIDIA GPU")
    assert set(compare._COLUMNS) <= set(r)
    assert r["status"] == "skipped" and r["skipped_reason"] == "needs an NVIDIA GPU"
    assert r["decode_tok_s"] is None and r["perplexity"] is None


def test_finish_rows_roofline_twin_perplexity_and_top_level(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(TOY))
    tf = row(
        "transformers-bf16",
        20.0,
        ppl=10.0,
        weight_bytes=10**9,
        config_dir=str(tmp_path),
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
    compare._finish_rows([tf, fp32, server], MACHINE)
    context = 10 + 20 // 2
    per_token = (
        10**9 + 2 * 2 * 1 * 4 * context * 2
    )  # K,V x layers x KV heads x head_dim x tokens x 2 B
    assert tf["roofline_tok_s"] == pytest.approx(10e9 / per_token)
    assert tf["pct_of_roofline"] == pytest.approx(100 * 20.0 / (10e9 / per_token))
    assert server["perplexity"] == 10.0 and "transformers-bf16" in server["perplexity_source"]
    assert (server["aggregate_tok_s"], server["at_concurrency"]) == (30.0, 8)
    assert tf["ppl_increase_pct"] == pytest.approx(25.0)  # vs the fp32 reference
    assert fp32["ppl_increase_pct"] == pytest.approx(0.0)
    assert "roofline_tok_s" not in fp32, "no weight bytes, no roofline"
    # on a GPU machine a CPU-only backend's roofline is host memory's
    gpu = MACHINE | {"gpu_usable": True, "bandwidth_gbps": 900.0, "cpu_bandwidth_gbps": 10.0}
    cpu_row = row("llama.cpp", 20.0, weight_bytes=10**9, config_dir=str(tmp_path),
                  kv_bytes_per_elem=2, prompt_tokens=10, new_tokens=20)  # fmt: skip
    gpu_row = dict(tf)
    compare._finish_rows([cpu_row, gpu_row], gpu)
    assert cpu_row["roofline_tok_s"] == pytest.approx(10e9 / per_token)
    assert gpu_row["roofline_tok_s"] == pytest.approx(900e9 / per_token)


def test_default_out_dir_names_the_machine():
    assert _default_out_dir(MACHINE) == ROOT / "docs" / "results" / "cpu-2core"
    gpu = MACHINE | {"gpu_usable": True, "gpus": [{"name": "NVIDIA A10G"}]}
    assert _default_out_dir(gpu).name == "gpu-nvidia-a10g"
    assert compare._machine_words(gpu) == "this GPU (NVIDIA A10G)"
    assert compare._machine_words(MACHINE) == "this CPU (Test CPU, 2 cores)"


def test_describe_machine_measures_the_decoding_devices_bandwidth():
    described = compare.describe_machine(threads=1)
    assert described["bandwidth_device"] == ("cuda" if described["gpu_usable"] else "cpu")
    assert described["bandwidth_gbps"] > 0 and described["usable_cpus"] >= 1
    assert json.loads(json.dumps(described)) == described


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
    text = rec._recommend(TABLE, max_ppl_increase=0.5)
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
    text = rec._recommend(TABLE, max_ppl_increase=1.0)
    assert text.splitlines()[0].startswith("- For one user on this machine: ipex-sym_int4")


def test_ties_go_to_the_smaller_memory_and_are_said():
    rows = [row("vllm-bf16", 51.0, mem=3.8), row("transformers-bf16", 50.0, mem=0.9)]
    first = rec._recommend(rows).splitlines()[0]
    assert "transformers-bf16 — 50.0" in first
    assert "vllm-bf16 is as good (within 5%" in first and "smaller memory" in first
    clear = rec._recommend(rows, tie_tolerance=0.01).splitlines()[0]
    assert "vllm-bf16 — 51.0" in clear and "as good" not in clear


def test_missing_columns_and_rows_are_handled():
    text = rec._recommend([row("transformers-bf16", 30.0, ppl=None, mem=None)])
    assert "For one user on this machine: transformers-bf16 — 30.0 tokens/s decode" in text
    assert "No backend was measured under concurrency" in text
    assert "no perplexity was measured" in text and "Smallest footprint" not in text
    no_ref = rec._recommend([row("vllm-gptq-int4", 30.0, ppl=12.5)])
    assert "vllm-gptq-int4 12.50" in no_ref and "cost of quantizing is unknown" in no_ref


def test_all_skipped_tables_get_a_sentence_with_the_reasons():
    import pandas as pd

    table = pd.DataFrame(
        [skipped("trtllm", "needs an NVIDIA GPU"), skipped("vllm-bf16", "no vllm")]
    )
    assert rec._recommend(table, machine="a laptop").splitlines() == [
        "- No backend was measured on a laptop, so there is nothing to recommend.",
        "- Not measured here: trtllm (needs an NVIDIA GPU); vllm-bf16 (no vllm).",
    ]


def test_when_every_backend_is_too_costly_the_choice_says_so():
    rows = [row("transformers-bf16", 10.0, ppl=10.0), row("ipex-sym_int4", 20.0, ppl=30.0)]
    text = rec._recommend(rows, max_ppl_increase=-0.5)
    assert "Every measured backend loses more than -50%" in text
    assert "For one user on this machine: ipex-sym_int4" in text


def test_numbers_and_records_drop_nan():
    import pandas as pd

    assert [rec._number(v) for v in (1, 2.5, math.nan, None, "3", True, math.inf)] == [
        1.0,
        2.5,
        None,
        None,
        None,
        None,
        None,
    ]  # noqa: E501
    df = pd.DataFrame([{"backend": "a", "x": math.nan}, {"backend": "b", "x": 1.0}])
    assert rec._records(df) == [{"backend": "a", "x": None}, {"backend": "b", "x": 1.0}]
    assert (
        rec._reference([row("vllm-bf16", 1, ppl=9.0), row("transformers-bf16", 1, ppl=8.0)])[
            "backend"
        ]
        == "transformers-bf16"
    )  # noqa: E501
    assert rec._reference([row("ipex-sym_int4", 1, ppl=9.0)]) is None


# --------------------------------------------------------------------------- files


def test_write_produces_csv_json_and_chart(tmp_path: Path):
    rows = [dict(r) for r in TABLE]
    rows[0] |= {
        "sweep": [
            {"concurrency": 1, "aggregate_tok_s": 20.0},
            {"concurrency": 8, "aggregate_tok_s": 60.0},
        ],
        "sweep_mode": "static batch",
        "answers": ["Paris.", "A cache.", "量化。"],
        "roofline_tok_s": float("nan"),
        "model": "standin",
    }
    settings = bk.Settings(max_new_tokens=8)
    result = compare.Comparison(rows=rows, machine=MACHINE, settings=settings, command="x")
    files = result.write(tmp_path / "out")
    with open(files["results.csv"], newline="") as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0]) == compare._COLUMNS
    assert [r["backend"] for r in table] == [r["backend"] for r in TABLE]
    assert table[-1]["skipped_reason"] == "needs an NVIDIA GPU (none found)"
    data = json.loads(files["results.json"].read_text())
    assert data["machine"]["cpu_model"] == "Test CPU" and data["command"] == "x"
    assert data["rows"][0]["roofline_tok_s"] is None  # NaN is not valid JSON
    assert data["recommendation"].startswith("- For one user")
    assert data["settings"]["max_new_tokens"] == 8
    assert files["comparison.png"].read_bytes()[:4] == b"\x89PNG"
    assert "transformers-fp32,static batch,8,60" in files["sweep.csv"].read_text()
    assert result.answers_frame().loc[settings.prompts[2], "transformers-fp32"] == "量化。"
    assert str(result.table()["at_concurrency"].dtype) == "Int64"


def test_plot_comparison_takes_plain_rows():
    import matplotlib.pyplot as plt

    sweep = [
        {"backend": "transformers-fp32", "concurrency": c, "aggregate_tok_s": 10.0 * c}
        for c in (1, 2)
    ]
    fig = rec.plot_comparison(TABLE, sweep, title="t")
    try:
        assert len(fig.axes) == 3 and fig._suptitle.get_text() == "t"
        assert [t.get_text() for t in fig.axes[0].texts] == [r["backend"] for r in TABLE[:4]]
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- for real


@pytest.mark.slow
def test_the_standin_measured_in_a_worker(standin_path: Path, tmp_cache: Path):
    """transformers-bf16 on the stand-in, in a fresh worker process, as notebook 06 does."""
    settings = bk.Settings(
        model=str(standin_path),
        prompts=("What is the capital of France?",),
        max_new_tokens=4,
        repeats=1,
        concurrency=(1, 2),
        eval_window=32,
        eval_stride=16,
    )
    lines: list[str] = []
    got = runs.measure(
        bk._BACKENDS["transformers-bf16"],
        str(standin_path),
        settings,
        list(range(100, 164)),
        log=lines.append,
    )  # noqa: E501
    assert (got["backend"], got["status"], got["model"], got["new_tokens"]) == (
        "transformers-bf16",
        "measured",
        "standin",
        4,
    )  # noqa: E501
    assert got["decode_tok_s"] > 0 and 0 < got["ttft_s"] < 60 and got["load_s"] > 0
    assert [lv["concurrency"] for lv in got["sweep"]] == [1, 2]
    assert math.isfinite(got["perplexity"]) and got["perplexity"] > 1
    assert (
        got["threads"] == 1 and got["memory_kind"] == "RSS (process)" and got["peak_mem_gb"] > 0.2
    )
    assert got["kv_bytes_per_elem"] == 2 and 0 < got["weight_bytes"] < 10**9
    assert any("loaded in" in line for line in lines) and any(
        "perplexity" in line for line in lines
    )
    compare._finish_rows([got], MACHINE)
    assert got["roofline_tok_s"] > 0 and got["pct_of_roofline"] > 0


def test_quality_judges_every_backend_against_the_reference():
    rows = [dict(r) for r in TABLE]
    answers = {
        "transformers-fp32": "The capital of France is Paris.",
        "transformers-gptq-int4": "Paris is the capital.",
        "vllm-gptq-int4": "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        "ipex-sym_int4": "The capital of France is Paris.",
    }
    for r in rows:
        if r["backend"] in answers:
            r["answers"] = [answers[r["backend"]], "x", "y"]
    result = compare.Comparison(rows=rows, machine=MACHINE, settings=bk.Settings())
    verdicts = {v.label: v.level for v in result.quality()}
    assert verdicts == {
        "transformers-gptq-int4 vs transformers-fp32": "degraded",  # ppl 13 vs 10: x1.3
        "vllm-gptq-int4 vs transformers-fp32": "broken",  # "!!!!"
        "ipex-sym_int4 vs transformers-fp32": "degraded",  # ppl x1.9
    }
    assert bk.Settings().prompts[0] == measure.SANITY_PROMPT
    no_reference = compare.Comparison(rows=rows[1:], machine=MACHINE, settings=bk.Settings())
    assert no_reference.quality() == []
