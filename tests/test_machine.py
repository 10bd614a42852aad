"""labhelpers.machine: the report of notebook 00, the GPU guard, RAM/disk checks, GPU datasheets."""

from __future__ import annotations

import json
import os
import stat
import sys
from importlib import metadata
from pathlib import Path

import pytest

from labhelpers import machine
from labhelpers.machine import GpuInfo, GpuSpec, NotEnoughResourcesError, Report

# `nvidia-smi` on a driver 535 machine with one A10G, as it prints itself.
SMI_BANNER = """\
Tue Nov 25 10:00:00 2025
+---------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.183.01             Driver Version: 535.183.01   CUDA Version: 12.2     |
|-----------------------------------------+----------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id        Disp.A | Volatile Uncorr. ECC |
| Fan  Temp   Perf          Pwr:Usage/Cap |         Memory-Usage | GPU-Util  Compute M. |
|=========================================+======================+======================|
|   0  NVIDIA A10G                    On  | 00000000:00:1E.0 Off |                    0 |
|  0%   25C    P8               9W / 300W |      0MiB / 23028MiB |      0%      Default |
+-----------------------------------------+----------------------+----------------------+
"""
SMI_QUERY = "NVIDIA A10G, 23028 MiB, 535.183.01\nTesla T4, 15360 MiB, 535.183.01\n"


def fake_command(folder: Path, name: str, output: str, code: int = 0) -> Path:
    """An executable ``name`` in ``folder`` that prints ``output`` (its arguments ignored)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """nvidia-smi on PATH: the CSV query for ``--query-gpu``, else the banner."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-smi"
    script.write_text(
        '#!/bin/sh\ncase "$1" in\n  --query-gpu*) printf %s "$QUERY" ;;\n'
        '  *) printf %s "$BANNER" ;;\nesac\n'
    )
    script.chmod(0o755)
    monkeypatch.setenv("QUERY", SMI_QUERY)
    monkeypatch.setenv("BANNER", SMI_BANNER)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return script


# --------------------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def real_report() -> Report:
    return machine.collect_report(packages={"torch": metadata.version("torch")})


def test_real_report_is_sane(real_report: Report):
    r = real_report
    assert r.logical_cpus >= 1
    assert r.physical_cores is None or 1 <= r.physical_cores <= r.logical_cpus
    assert 1 <= r.usable_cpus <= r.logical_cpus
    assert 0 < r.ram_available_gib <= r.ram_total_gib
    assert r.disk_free_gib > 0 and r.disk_path
    assert r.python_version == ".".join(map(str, sys.version_info[:3]))
    assert r.jupyter_kernels is None or isinstance(r.jupyter_kernels, dict)
    if sys.platform.startswith("linux"):
        assert isinstance(r.cpu_flags, set) and r.cpu_flags <= set(machine._CPU_FLAGS)
        assert r.cpu_model


def test_package_versions_come_from_metadata():
    versions = machine._package_versions(["packaging", "no-such-dist-qwen-lab"])
    assert versions == {"packaging": metadata.version("packaging"), "no-such-dist-qwen-lab": None}


def test_report_renders(real_report: Report):
    text = real_report.to_markdown()
    assert "**CPU**" in text and str(real_report.cpu_model) in text
    assert real_report._repr_markdown_() == text


def test_collect_report_uses_given_packages_and_gpus():
    fake = [GpuInfo("RTX 3090", 24.0, (8, 6))]
    r = machine.collect_report(packages={"torch": "2.5.1+cu121", "vllm": "0.6.0"}, gpus=fake)
    assert r.gpus == fake
    assert r.package("vllm") == "0.6.0" and r.package("transformers") is None
    assert r.torch_version == "2.5.1+cu121" and r.torch_build == "cuda"
    assert "RTX 3090, 24.0 GiB, compute 8.6" in r.to_markdown()


def test_report_package_lookup_ignores_spelling():
    r = Report(packages={"auto_gptq": "0.7.1", "huggingface_hub": "1.0"})
    assert r.package("auto-gptq") == "0.7.1" and r.package("Huggingface-Hub") == "1.0"


@pytest.mark.parametrize(
    ("version", "tag", "build"),
    [
        ("2.13.0+cpu", "cpu", "cpu"),
        ("2.10.0+cu128", "cu128", "cuda"),
        ("2.5.0+rocm6.2", "rocm6.2", "rocm"),
        ("2.13.0", None, None),
        (None, None, None),
        ("garbage", None, None),
    ],
)
def test_torch_build_from_the_local_version_tag(version, tag, build):
    assert machine._local_tag(version) == tag
    assert machine.collect_report(packages={"torch": version}).torch_build == build


def test_parse_cpuinfo_filters_flags():
    block = (
        "processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon X\n"
        "flags\t\t: fpu sse avx avx2 amx_tile\n\n"
    )
    info = machine._parse_cpuinfo("".join(block.format(n=n) for n in range(4)))
    assert info == ("Xeon X", "GenuineIntel", {"avx", "avx2", "amx_tile"})
    arm = machine._parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert arm == (None, None, {"asimd", "sve"})
    assert machine._parse_cpuinfo("processor\t: 0\n")[2] is None


def test_parse_nvidia_smi_reads_gpus_driver_and_the_banners_cuda_version():
    driver, cuda, gpus = machine._parse_nvidia_smi(SMI_QUERY, SMI_BANNER)
    assert (driver, cuda) == ("535.183.01", "12.2")
    assert [(g.index, g.name, round(g.total_memory_gib, 2)) for g in gpus] == [
        (0, "NVIDIA A10G", 22.49),
        (1, "Tesla T4", 15.0),
    ]
    assert all(g.capability is None and not g.torch_visible for g in gpus)
    assert machine._parse_nvidia_smi(SMI_QUERY) == ("535.183.01", None, gpus)
    assert machine._parse_nvidia_smi("") == (None, None, [])
    no_devices = "No devices were found"
    assert machine._parse_nvidia_smi(no_devices, no_devices) == (None, None, [])


def test_nvidia_smi_and_nvcc_are_read_from_path(fake_nvidia_smi: Path):
    nvcc = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.4, V12.4.131"
    fake_command(fake_nvidia_smi.parent, "nvcc", nvcc)
    r = machine.collect_report(packages={})
    assert (r.nvidia_driver, r.driver_cuda, r.nvcc_cuda) == ("535.183.01", "12.2", "12.4")
    assert [g.name for g in r.gpus] == ["NVIDIA A10G", "Tesla T4"]


def test_missing_or_failing_tools_give_none_and_a_note(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    r = machine.collect_report(packages={})
    assert (r.nvidia_driver, r.driver_cuda, r.nvcc_cuda) == (None, None, None)
    assert r.gpus == [] and r.notes == []
    fake_command(tmp_path / "bin", "nvidia-smi", "NVIDIA-SMI has failed", code=9)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    r = machine.collect_report(packages={})
    assert r.gpus == [] and r.notes and "exited with 9" in r.notes[0]


# --------------------------------------------------------------------------- the GPU guard


def test_force_cpu_setting(monkeypatch):
    for value, forced in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv("QWEN_LAB_FORCE_CPU", value)
        assert machine._cpu_forced() is forced
    assert machine.collect_report(packages={}).cpu_forced is forced
    monkeypatch.setenv("QWEN_LAB_FORCE_CPU", "1")
    assert machine.gpu_status() == (False, "QWEN_LAB_FORCE_CPU=1 is set, forcing the CPU path")


def test_skip_unless_gpu_prints_the_reason_on_this_machine(capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.delenv("QWEN_LAB_FORCE_CPU", raising=False)
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert machine.skip_unless_gpu("engine build") is False
    assert machine.gpu_available() is False
    out = capsys.readouterr().out
    assert out.startswith("⏭  SKIPPED on this machine: engine build needs an NVIDIA GPU (")
    assert "CPU-only build" in out or "no NVIDIA GPU found" in out


def test_skip_unless_gpu_with_a_usable_gpu_and_forced_cpu(capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.delenv("QWEN_LAB_FORCE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake H100")
    assert machine.gpu_status() == (True, "Fake H100 is usable")
    assert machine.skip_unless_gpu("engine build") is True
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("QWEN_LAB_FORCE_CPU", "1")
    assert machine.skip_unless_gpu("engine build") is False
    assert "QWEN_LAB_FORCE_CPU=1" in capsys.readouterr().out


def test_gpu_torch_cannot_use_names_the_driver_mismatch(fake_nvidia_smi, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.delenv("QWEN_LAB_FORCE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    usable, reason = machine.gpu_status()
    assert not usable
    assert "nvidia-smi sees NVIDIA A10G (driver 535.183.01, runs CUDA ≤ 12.2)" in reason
    assert "built for CUDA 13.0" in reason and "./course setup" in reason
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU-only build" in machine.gpu_status()[1]


def test_gpu_status_without_torch(monkeypatch):
    monkeypatch.delenv("QWEN_LAB_FORCE_CPU", raising=False)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    assert machine.gpu_status() == (False, "torch is not installed in this kernel")


# --------------------------------------------------------------------------- resources


def test_check_ram_refuses_before_loading_and_says_what_to_do():
    with pytest.raises(NotEnoughResourcesError, match=r"needs about 18\.7 GB.*only 8\.0 GB.*Close"):
        machine.check_ram(18.74, "loading a 7B model", available_gb=8.0)
    with pytest.raises(NotEnoughResourcesError, match="Use a smaller group"):
        machine.check_ram(2, "x", "Use a smaller group.", available_gb=1)
    assert machine.check_ram(1.5, "x", available_gb=2.0) == 1.5


def test_available_ram_is_positive_and_below_the_total():
    import psutil

    assert 0 < machine.available_ram_gb() <= psutil.virtual_memory().total / 1e9


def test_free_disk_of_a_folder_not_made_yet(tmp_path: Path):
    assert machine._free_disk_bytes(tmp_path / "not" / "yet") == machine._free_disk_bytes(tmp_path)


# --------------------------------------------------------------------------- GPU datasheets


def test_gpu_lookup_by_names_nvidia_smi_names_and_aliases():
    assert machine.gpu_spec("RTX 4090").capability == (8, 9)
    assert machine.gpu_spec("NVIDIA GeForce RTX 4090").name == "RTX 4090"
    assert machine.gpu_spec("rtx4090").name == "RTX 4090"
    assert machine.gpu_spec("NVIDIA A100-SXM4-80GB").name == "A100 80GB"
    assert machine.gpu_spec("Tesla T4").name == "T4"
    assert machine.gpu_spec("H100").name == "H100 80GB"
    a100 = machine.gpu_spec("A100 40GB")
    assert a100.memory_gib == 40 and a100.supports_bf16 and not a100.supports_fp8
    assert machine.gpu_spec("L40S").supports_fp8
    assert machine.gpu_spec(a100) is a100
    names = [k for k in json.loads(machine._GPUS_FILE.read_text()) if k[0] != "_"]
    assert len(names) >= 20 and all(machine.gpu_spec(n).name == n for n in names)
    assert isinstance(machine.gpu_spec("T4"), GpuSpec) and machine.gpu_spec("T4").arch == "Turing"


def test_unknown_and_ambiguous_gpus_are_clear_errors():
    with pytest.raises(ValueError, match="Close: RTX 4090"):
        machine.gpu_spec("RTX 4900")
    with pytest.raises(ValueError, match="ambiguous.*A100 40GB, A100 80GB"):
        machine.gpu_spec("A100")
    with pytest.raises(ValueError, match=r"machine\.GpuSpec"):
        machine.gpu_spec("Voodoo 5 6000")


def test_gpu_spec_of_this_machines_gpu_keeps_its_measured_memory():
    measured = machine.gpu_spec(GpuInfo("NVIDIA H100 80GB HBM3", 79.2, (9, 0)))
    assert measured.name == "H100 80GB" and measured.memory_gib == pytest.approx(79.2)
    assert measured.bandwidth_gbps == 3350 and measured.capability == (9, 0)
    from_smi = machine.gpu_spec(GpuInfo("NVIDIA A10G", 22.49, None))
    assert from_smi.capability == (8, 6), "nvidia-smi gives no capability: the datasheet does"


@pytest.mark.gpu
def test_this_gpu_is_reported_with_its_capability_and_a_working_cuda_stack():
    from labhelpers.compat import check_compat

    report = machine.collect_report()
    assert report.torch_cuda_available and report.torch_build == "cuda" and report.torch_cuda
    gpu = report.gpus[0]
    assert gpu.capability is not None and gpu.total_memory_gib > 1 and gpu.torch_visible
    assert report.nvidia_driver and report.driver_cuda, "nvidia-smi is read on a GPU machine"
    assert machine.gpu_spec(gpu).memory_gib == pytest.approx(gpu.total_memory_gib)
    errors = [f for f in check_compat(report) if f.level == "error"]
    assert not errors, "\n".join(map(str, errors))
