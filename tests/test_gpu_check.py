"""The GPU smoke check (tools/gpu_check.py, ``./course gpu-check``): its step runner and report,
its offline tokenizer, the ``./course`` entry, and its CPU dry run end to end (slow: it builds
and quantizes a tiny model, about 40 s on 2 busy cores)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import gpu_check  # tools/ is on sys.path (conftest.py)
import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_STEPS = {
    "GPTQ quantize (GPTQModel)",
    "reload via transformers: int4 kernel class",
    "generate; max_memory_allocated vs sizing",
    "notebook 01 measurement (GPU branch)",
}


def test_steps_report_ok_failed_and_skipped_with_reasons(tmp_path: Path, capfd) -> None:
    report = gpu_check.Report(tmp_path / "check.log")
    first = report.run("first", "cpu", lambda: "3 things")

    def broken() -> str:
        print("library noise")  # goes to the log, not the report
        raise gpu_check.CheckFailed("expected Marlin, got TorchLinear")

    second = report.run("second", "cuda", broken, needs=(first,))
    third = report.run("third", "cuda", lambda: "never", needs=(second,))
    report.skip("fourth", "cuda", "no CUDA here: a CPU-only torch")
    assert [s.status for s in report.steps] == ["ok", "failed", "skipped", "skipped"]
    assert second.detail == "CheckFailed: expected Marlin, got TorchLinear"
    assert third.detail == "needs 'second' (cuda), which failed"
    out = capfd.readouterr().out
    assert "library noise" not in out and "library noise" in (tmp_path / "check.log").read_text()
    assert "✗ FAILED: second (cuda)" in out and "⏭  SKIPPED: fourth (cuda)" in out
    table = report.markdown("title").splitlines()
    assert table[2] == "| # | step | device | status | s | key numbers / reason |"
    assert table[4].startswith("| 1 | first | cpu | ok |") and table[4].endswith("| 3 things |")
    assert "| **FAILED** |" in table[5] and "| SKIPPED | – | no CUDA here" in table[7]
    assert table[-1].startswith("1 ok, 1 failed, 2 skipped")


def test_steps_after_the_timeout_are_skipped(tmp_path: Path) -> None:
    report = gpu_check.Report(tmp_path / "check.log", timeout_s=0)
    late = report.run("late", "cuda", lambda: "never")
    assert late.status == "skipped" and late.detail == "the check ran past --timeout 0 s"


def test_the_minimal_tokenizer_needs_no_files_and_speaks_chatml() -> None:
    tok = gpu_check.minimal_tokenizer()
    text = tok.apply_chat_template(
        [{"role": "user", "content": "你好, GPU"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\n你好, GPU<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and len(tok) == 259
    assert tok.convert_ids_to_tokens(ids[0]) == "<|im_start|>" and tok.eos_token == "<|im_end|>"


def test_course_gpu_check_runs_the_script_with_the_core_python(tmp_path: Path) -> None:
    python = tmp_path / "venvs" / "core" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text('#!/bin/sh\necho "core python: $*"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "QWEN_LAB_VENVS": str(tmp_path / "venvs")}
    done = subprocess.run(["bash", str(ROOT / "course"), "gpu-check", "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"core python: {ROOT / 'tools' / 'gpu_check.py'} --dry-run"
    env["QWEN_LAB_VENVS"] = str(tmp_path / "none")
    done = subprocess.run(["bash", str(ROOT / "course"), "gpu-check"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "python tools/gpu_check.py" in done.stderr


@pytest.mark.slow
def test_the_dry_run_builds_quantizes_and_measures_on_the_cpu(tmp_path: Path) -> None:
    """Every non-CUDA step runs; each CUDA step says SKIPPED and why (torch sees no GPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--tokenizer", "minimal",
         "--json", str(tmp_path / "steps.json"), "--markdown", str(tmp_path / "report.md")],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = json.loads((tmp_path / "steps.json").read_text())["steps"]
    cuda = [s for s in steps if s["device"] == "cuda"]
    assert {s["name"] for s in cuda} == CUDA_STEPS
    assert all(s["status"] == "skipped" and s["detail"].startswith("no CUDA here") for s in cuda)
    others = {s["name"]: s for s in steps if s["device"] != "cuda"}
    assert all(s["status"] == "ok" for s in others.values()), others
    assert "TorchAtenLinear" in others["reload via transformers: int4 kernel class"]["numbers"]
    assert "% of it" in others["notebook 01 measurement (CPU branch)"]["numbers"]
    assert "x the sizing estimate" in others["generate"]["numbers"]
    assert done.stdout.count("⏭  SKIPPED") == 4
    assert (
        "| 5 | GPTQ quantize (GPTQModel) | cuda | SKIPPED |" in (tmp_path / "report.md").read_text()
    )
    assert not list(tmp_path.glob("logs")), "GPTQModel's ./logs stay in the work folder"


def test_the_gpu_workflow_runs_the_smoke_check_after_set_up_before_the_gpu_tests() -> None:
    text = (ROOT / ".github" / "workflows" / "gpu.yml").read_text(encoding="utf-8")
    setup, check = (
        text.index("run: ./course setup --gpu"),
        text.index("./course gpu-check --markdown"),
    )
    assert setup < check < text.index("-m pytest -m gpu"), "set-up, smoke check, GPU unit tests"
    assert '>> "$GITHUB_STEP_SUMMARY"' in text[check:], "the report table lands in the job summary"
