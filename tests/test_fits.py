"""Tests for labhelpers.fits: which models fit on this machine, which notebooks run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labhelpers import env, fits
from labhelpers.env import EnvReport, GpuInfo
from labhelpers.models import ModelSpec

MODELS_JSON = Path(fits.__file__).resolve().parent / "data" / "models.json"

# --------------------------------------------------------------------------- what fits


def registry_names() -> set[str]:
    data = json.loads(MODELS_JSON.read_text())
    return {k for k in data if not k.startswith("_")}


def rows_by_model(report: EnvReport) -> dict[str, dict]:
    rows = fits.what_fits(report)
    assert {r["model"] for r in rows} == registry_names()
    return {r["model"]: r for r in rows}


def test_what_fits_cpu_only_24gb():
    rows = rows_by_model(EnvReport(ram_total_gb=24, ram_available_gb=24, disk_free_gb=100))
    for name in ("Qwen2.5-0.5B-Instruct", "Qwen2.5-0.5B-Instruct-GPTQ-Int4"):
        assert rows[name]["fits_cpu"] is True and rows[name]["run_on"] == "cpu"
    big = rows["Qwen2.5-7B-Instruct-GPTQ-Int4"]
    assert big["fits_gpu"] is False and "no NVIDIA GPU" in big["gpu_reason"]
    assert big["memory_gb"] == pytest.approx(5.6 * 1.2 + 0.5)
    assert "meant for a GPU" in big["cpu_reason"]
    assert rows["Qwen2.5-0.5B-Instruct"]["disk_ok"] is True


def test_what_fits_with_24gb_gpu():
    report = EnvReport(ram_available_gb=8, gpus=[GpuInfo("RTX 4090", 24.0, (8, 9))])
    rows = rows_by_model(report)
    big = rows["Qwen2.5-7B-Instruct-GPTQ-Int4"]
    assert big["fits_gpu"] is True and big["run_on"] == "gpu"
    assert "RTX 4090" in big["gpu_reason"] and "KV cache" in big["gpu_reason"]
    bf16 = rows["Qwen2.5-7B-Instruct"]  # 15.2 * 1.2 + 0.5 = 18.74 GB
    assert bf16["fits_gpu"] is True and bf16["fits_cpu"] is False
    assert "8.0 GB available" in bf16["cpu_reason"]


def test_what_fits_small_gpu_tight_ram_and_disk():
    report = EnvReport(
        ram_total_gb=4,
        ram_available_gb=1.0,
        disk_free_gb=1.0,
        gpus=[GpuInfo("Fake GPU", 6.0, (7, 5))],
    )
    rows = rows_by_model(report)
    big = rows["Qwen2.5-7B-Instruct-GPTQ-Int4"]
    assert big["fits_gpu"] is False and "more than GPU 0" in big["gpu_reason"]
    assert big["disk_ok"] is False
    tiny = rows["Qwen2.5-0.5B-Instruct-GPTQ-Int4"]  # needs 1.05 GB
    assert tiny["fits_cpu"] is False and "close other programs" in tiny["cpu_reason"]
    assert rows["standin-gptq-int4"]["fits_cpu"] is True


def test_what_fits_takes_other_specs():
    tiny = ModelSpec(name="tiny", params_b=0.1, weights="bf16", size_gb=1.0, target="cpu")
    (row,) = fits.what_fits(EnvReport(ram_available_gb=2, disk_free_gb=0.5), specs=[tiny])
    assert row["model"] == "tiny" and row["memory_gb"] == pytest.approx(tiny.memory_needed_gb())
    assert row["fits_cpu"] is True and row["run_on"] == "cpu" and row["disk_ok"] is False


# --------------------------------------------------------------------------- notebooks

# A fabricated notebook table (the shipped one grows as notebooks land).
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
    "03_bigdl_cpu_int4": {
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
        "on_cpu": "sizing and planning only",
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


def notebook_rows(report: EnvReport, tmp_path) -> dict[str, dict]:
    path = tmp_path / "notebooks.json"
    path.write_text(json.dumps(FAKE_NOTEBOOKS))
    rows = fits.notebooks_here(report, notebooks_file=path)
    assert {r["notebook"] for r in rows} == set(FAKE_NOTEBOOKS) - {"_doc"}
    return {r["notebook"]: r for r in rows}


def test_shipped_notebook_table_matches_the_notebooks_folder():
    from labhelpers.paths import repo_root

    rows = fits.notebooks_here(EnvReport(ram_total_gb=16, jupyter_kernels=None))
    root = repo_root()
    assert root is not None
    on_disk = {p.stem for p in (root / "notebooks").glob("*.ipynb")}
    assert {r["notebook"] for r in rows} == on_disk


def test_notebooks_on_cpu_machine_without_ipex_kernel(monkeypatch, tmp_path):
    monkeypatch.delenv(env.FORCE_CPU_ENV, raising=False)
    report = EnvReport(ram_total_gb=16, jupyter_kernels={"qwen-lab-core": "/k"})
    rows = notebook_rows(report, tmp_path)
    assert rows["00_env_check"]["status"] == "runs fully"
    assert rows["03_bigdl_cpu_int4"]["status"] == "cannot run"
    assert "qwen-lab-ipex" in rows["03_bigdl_cpu_int4"]["reason"]
    assert "ipykernel install --user --name qwen-lab-ipex" in rows["03_bigdl_cpu_int4"]["fix"]
    trt = rows["04_tensorrt_llm"]
    assert trt["status"] == "runs with GPU cells skipped"
    assert "engine build (trtllm-build)" in trt["skipped"]


def test_notebooks_on_gpu_machine_with_both_kernels(monkeypatch, tmp_path):
    monkeypatch.delenv(env.FORCE_CPU_ENV, raising=False)
    kernels = {"qwen-lab-core": "/a", "qwen-lab-ipex": "/b"}
    report = EnvReport(
        ram_total_gb=64, jupyter_kernels=kernels, gpus=[GpuInfo("Fake GPU", 24.0, (8, 9))]
    )
    rows = notebook_rows(report, tmp_path)
    assert {r["status"] for r in rows.values()} == {"runs fully"}
    monkeypatch.setenv(env.FORCE_CPU_ENV, "1")
    assert (
        notebook_rows(report, tmp_path)["05_vllm_serving"]["status"]
        == "runs with GPU cells skipped"
    )


def test_notebooks_too_little_ram_and_unknown_kernels(tmp_path):
    report = EnvReport(ram_total_gb=3, jupyter_kernels=None)
    rows = notebook_rows(report, tmp_path)
    assert rows["00_env_check"]["status"] == "runs fully"  # kernel check skipped when unknown
    assert rows["05_vllm_serving"]["status"] == "cannot run"
    assert "6 GB RAM" in rows["05_vllm_serving"]["reason"]
