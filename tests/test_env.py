"""Tests for labhelpers.env: the environment report and the GPU guard."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from labhelpers import env
from labhelpers.env import EnvReport, GpuInfo


@pytest.fixture(scope="module")
def real_report() -> EnvReport:
    return env.collect_report()


# --------------------------------------------------------------------------- report


def test_real_report_is_sane(real_report):
    r = real_report
    assert r.logical_cpus >= 1
    assert r.physical_cores is None or 1 <= r.physical_cores <= r.logical_cpus
    assert 1 <= r.usable_cpus <= r.logical_cpus
    assert r.ram_total_gb > 0
    assert 0 < r.ram_available_gb <= r.ram_total_gb
    assert r.disk_free_gb > 0 and r.home_free_gb > 0
    assert r.python_version == ".".join(map(str, sys.version_info[:3]))
    assert set(r.packages) == set(env.COURSE_PACKAGES)
    assert r.package("packaging") is None  # not a course package, so not collected
    if sys.platform.startswith("linux"):
        assert isinstance(r.cpu_flags, set) and r.cpu_flags <= set(env.CPU_FLAGS_OF_INTEREST)
        assert r.cpu_model


def test_real_report_on_this_gpu_less_machine(real_report):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert real_report.gpus == []
    assert real_report.torch_cuda_available is False
    assert real_report.torch_version == metadata.version("torch")
    expected_build = "cuda" if torch.version.cuda else "cpu"
    assert real_report.torch_build == expected_build


def test_report_renders_and_serialises(real_report):
    data = real_report.as_dict()
    assert json.loads(json.dumps(data))["python_version"] == real_report.python_version
    text = real_report.to_markdown()
    assert "**CPU**" in text and str(real_report.cpu_model) in text
    assert real_report._repr_markdown_() == text


def test_collect_report_uses_injected_values():
    fake = [GpuInfo("RTX 3090", 24.0, (8, 6))]
    r = env.collect_report(packages={"torch": "2.5.1+cu121", "vllm": "0.6.0"}, gpus=fake)
    assert r.gpus == fake
    assert r.package("vllm") == "0.6.0" and r.package("transformers") is None
    assert r.torch_version == "2.5.1+cu121" and r.torch_build == "cuda"
    assert r.as_dict()["gpus"][0]["capability"] == [8, 6]


@pytest.mark.parametrize("module", ["labhelpers.env", "labhelpers.compat", "labhelpers.fits"])
def test_import_is_light(module):
    code = f"import sys, {module}; print(sorted({{'torch', 'psutil'}} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_parse_cpuinfo_counts_physical_cores_and_filters_flags():
    block = (
        "processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon X\n"
        "physical id\t: {p}\ncore id\t\t: {c}\nflags\t\t: fpu sse avx avx2 amx_tile\n\n"
    )
    text = "".join(block.format(n=n, p=n // 4, c=(n % 4) // 2) for n in range(8))
    info = env.parse_cpuinfo(text)
    assert info == {
        "model": "Xeon X",
        "vendor": "GenuineIntel",
        "flags": {"avx", "avx2", "amx_tile"},
        "physical_cores": 4,
    }
    arm = env.parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert arm["flags"] == {"asimd", "sve"} and arm["vendor"] is None


def test_parse_nvidia_smi():
    text = "NVIDIA GeForce RTX 4090, 24564 MiB, 550.54.14\nTesla T4, 15360 MiB, 550.54.14\n"
    gpus = env.parse_nvidia_smi(text)
    assert [(g.index, g.name, round(g.total_memory_gb, 2)) for g in gpus] == [
        (0, "NVIDIA GeForce RTX 4090", 23.99),
        (1, "Tesla T4", 15.0),
    ]
    assert gpus[0].driver_version == "550.54.14" and not gpus[0].torch_visible


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs /proc/meminfo")
def test_memory_falls_back_to_proc_meminfo(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil -> ImportError
    total, available = env.memory_bytes()
    first = Path("/proc/meminfo").read_text().splitlines()[0]
    assert first.startswith("MemTotal:")
    assert total == int(first.split()[1]) * 1024
    assert 0 < available <= total


def test_find_kernels_without_jupyter_client(monkeypatch, tmp_path):
    (tmp_path / "kernels" / "qwen-lab-ipex").mkdir(parents=True)
    (tmp_path / "kernels" / "qwen-lab-ipex" / "kernel.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "jupyter_client.kernelspec", None)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    kernels = env.find_kernels()
    assert kernels["qwen-lab-ipex"] == str(tmp_path / "kernels" / "qwen-lab-ipex")


# --------------------------------------------------------------------------- GPU guard


def test_skip_unless_gpu_prints_reason_here(capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.delenv(env.FORCE_CPU_ENV, raising=False)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert env.skip_unless_gpu("engine build") is False
    assert env.gpu_available() is False
    out = capsys.readouterr().out
    assert "SKIPPED on this machine: engine build needs an NVIDIA GPU" in out
    assert "torch.cuda.is_available() is False" in out
    assert "On a GPU machine this cell runs." in out


def test_skip_unless_gpu_with_a_usable_gpu_and_forced_cpu(capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.delenv(env.FORCE_CPU_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake H100")
    assert env.skip_unless_gpu("engine build") is True
    assert capsys.readouterr().out == ""
    monkeypatch.setenv(env.FORCE_CPU_ENV, "1")
    assert env.skip_unless_gpu("engine build") is False
    assert "QWEN_LAB_FORCE_CPU=1" in capsys.readouterr().out


def test_gpu_status_without_torch(monkeypatch):
    monkeypatch.delenv(env.FORCE_CPU_ENV, raising=False)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    assert env.gpu_status() == (False, "torch is not installed in this kernel")
