"""labhelpers.fits: which models fit on this machine, which notebooks run fully."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from labhelpers import fits
from labhelpers.machine import GpuInfo, Report
from labhelpers.models import ModelSpec, registry


def gib(gb: float) -> float:
    """Decimal GB (the registry's unit) as GiB (the report's unit)."""
    return gb * 1e9 / 2**30


def rows_by_model(report: Report) -> dict[str, dict]:
    rows = fits.what_fits(report)
    assert [r["model"] for r in rows] == list(registry())
    return {r["model"]: r for r in rows}


# --------------------------------------------------------------------------- what fits


def test_what_fits_cpu_only_24gb():
    rows = rows_by_model(Report(ram_total_gib=24, ram_available_gib=24, disk_free_gib=100))
    for name in ("Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-Instruct-GPTQ-Int4"):
        assert rows[name]["fits_cpu"] is True and rows[name]["run_on"] == "cpu"
    big = rows["Qwen2.5-7B-Instruct-GPTQ-Int4"]
    assert big["fits_gpu"] is False and "no NVIDIA GPU" in big["gpu_reason"]
    assert big["memory_gb"] == pytest.approx(5.6 * 1.2 + 0.5)
    assert "meant for a GPU" in big["cpu_reason"]
    assert rows["Qwen2.5-0.5B-Instruct"]["disk_ok"] is True


def test_what_fits_with_24gb_gpu_compares_decimal_gb_with_gib():
    report = Report(ram_available_gib=gib(8), gpus=[GpuInfo("RTX 4090", 23.99, (8, 9))])
    rows = rows_by_model(report)
    big = rows["Qwen2.5-7B-Instruct-GPTQ-Int4"]
    assert big["fits_gpu"] is True and big["run_on"] == "gpu"
    assert "GPU 0 (RTX 4090, 25.8 GB)" in big["gpu_reason"] and "KV cache" in big["gpu_reason"]
    bf16 = rows["Qwen2.5-7B-Instruct"]  # 15.2 * 1.2 + 0.5 = 18.74 GB of 25.76 GB
    assert bf16["fits_gpu"] is True and bf16["fits_cpu"] is False
    assert "8.0 GB available" in bf16["cpu_reason"]
    assert bf16["disk_ok"] is None, "free disk unknown"


def test_what_fits_small_gpu_tight_ram_and_disk():
    report = Report(
        ram_total_gib=4,
        ram_available_gib=gib(1.0),
        disk_free_gib=gib(1.0),
        gpus=[GpuInfo("Fake GPU", gib(6.0), (7, 5), torch_visible=False)],
    )
    rows = rows_by_model(report)
    big = rows["Qwen2.5-7B-Instruct-GPTQ-Int4"]
    assert big["fits_gpu"] is False and "more than GPU 0 (Fake GPU, 6.0 GB)" in big["gpu_reason"]
    assert big["disk_ok"] is False
    tiny = rows["Qwen2.5-0.5B-Instruct-GPTQ-Int4"]  # needs 1.05 GB
    assert tiny["fits_cpu"] is False and "close other programs" in tiny["cpu_reason"]
    assert "torch in this environment cannot use this GPU" in tiny["gpu_reason"]
    assert rows["standin-gptq-int4"]["fits_cpu"] is True


def test_what_fits_takes_other_specs_and_unknown_ram():
    tiny = ModelSpec(name="tiny", params_b=0.1, weights="bf16", size_gb=1.0, target="cpu")
    (row,) = fits.what_fits(Report(ram_available_gib=gib(2), disk_free_gib=gib(0.5)), specs=[tiny])
    assert row["model"] == "tiny" and row["memory_gb"] == pytest.approx(tiny.memory_needed_gb())
    assert row["fits_cpu"] is True and row["run_on"] == "cpu" and row["disk_ok"] is False
    (unknown,) = fits.what_fits(Report(), specs=[tiny])
    assert unknown["cpu_reason"] == "available RAM unknown" and unknown["run_on"] is None


# --------------------------------------------------------------------------- notebooks

# A fabricated notebook table (the shipped one follows the notebooks).
FAKE_NOTEBOOKS = {
    "_doc": "test data",
    "00_env_check": {
        "title": "env",
        "kernel": "qwen-lab-core",
        "min_ram_gb": 2,
        "min_gpu_gb": None,
        "gpu_parts": [],
        "on_cpu": "runs fully",
    },
    "03_ipex_llm_cpu_int4": {
        "title": "ipex",
        "kernel": "qwen-lab-ipex",
        "min_ram_gb": 4,
        "min_gpu_gb": None,
        "gpu_parts": [],
        "on_cpu": "runs fully",
    },
    "04_tensorrt_llm": {
        "title": "trt",
        "kernel": "qwen-lab-core",
        "min_ram_gb": 4,
        "min_gpu_gb": 16,
        "gpu_parts": ["engine build (trtllm-build)"],
        "on_cpu": "sizing only",
    },
    "05_vllm_serving": {
        "title": "vllm",
        "kernel": "qwen-lab-core",
        "min_ram_gb": 6,
        "min_gpu_gb": 16,
        "gpu_parts": ["GPU flags demo"],
        "on_cpu": "vllm-cpu",
    },
}


def notebook_rows(report: Report, tmp_path: Path) -> dict[str, dict]:
    path = tmp_path / "notebooks.json"
    path.write_text(json.dumps(FAKE_NOTEBOOKS))
    rows = fits.notebooks_here(report, notebooks_file=path)
    assert [r["notebook"] for r in rows] == [k for k in FAKE_NOTEBOOKS if k != "_doc"]
    return {r["notebook"]: r for r in rows}


def test_shipped_notebook_table_matches_the_notebooks_folder():
    rows = fits.notebooks_here(Report(ram_total_gib=16, jupyter_kernels=None))
    root = Path(__file__).resolve().parent.parent
    on_disk = {p.stem for p in (root / "notebooks").glob("*.ipynb")}
    assert {r["notebook"] for r in rows} == on_disk


def test_notebooks_on_cpu_machine_without_ipex_kernel(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("QWEN_LAB_FORCE_CPU", raising=False)
    rows = notebook_rows(
        Report(ram_total_gib=16, jupyter_kernels={"qwen-lab-core": "/k"}), tmp_path
    )
    assert rows["00_env_check"]["status"] == "runs fully"
    ipex = rows["03_ipex_llm_cpu_int4"]
    assert ipex["status"] == "cannot run" and "qwen-lab-ipex" in ipex["reason"]
    assert "./course setup" in ipex["fix"]
    trt = rows["04_tensorrt_llm"]
    assert trt["status"] == "runs with GPU cells skipped"
    assert trt["skipped"] == ["engine build (trtllm-build)"] and "sizing only" in trt["reason"]


def test_notebooks_on_gpu_machine_with_both_kernels(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("QWEN_LAB_FORCE_CPU", raising=False)
    kernels = {"qwen-lab-core": "/a", "qwen-lab-ipex": "/b"}
    report = Report(
        ram_total_gib=64, jupyter_kernels=kernels, gpus=[GpuInfo("Fake GPU", 24.0, (8, 9))]
    )
    rows = notebook_rows(report, tmp_path)
    assert {r["status"] for r in rows.values()} == {"runs fully"}
    assert rows["05_vllm_serving"]["reason"] == "GPU: Fake GPU"
    small = Report(
        ram_total_gib=64, jupyter_kernels=kernels, gpus=[GpuInfo("Small", gib(12), (8, 6))]
    )
    assert "assume 16 GB" in notebook_rows(small, tmp_path)["05_vllm_serving"]["reason"]
    forced = dataclasses.replace(report, cpu_forced=True)  # QWEN_LAB_FORCE_CPU=1
    assert notebook_rows(forced, tmp_path)["05_vllm_serving"]["status"].endswith("skipped")


def test_notebooks_too_little_ram_and_unknown_kernels(tmp_path: Path):
    rows = notebook_rows(Report(ram_total_gib=gib(3), jupyter_kernels=None), tmp_path)
    assert rows["00_env_check"]["status"] == "runs fully"  # kernel check skipped when unknown
    assert rows["05_vllm_serving"]["status"] == "cannot run"
    assert "needs 6 GB RAM, this machine has 3.0 GB" in rows["05_vllm_serving"]["reason"]
    limited = Report(ram_total_gib=64, ram_limit_gib=gib(3), jupyter_kernels=None)
    assert notebook_rows(limited, tmp_path)["05_vllm_serving"]["status"] == "cannot run"
