"""Every tool that notebooks, labhelpers, tools/ and apps/ run comes from the running
environment: a Jupyter kernel need not have its venv's bin/ on PATH (and a bare ``python``
there may be another interpreter), so commands start with ``sys.executable``,
``Path(sys.executable).parent / "tool"`` or a path, never a bare ``python``, ``vllm``,
``trtllm-build``, ``trtllm-serve``, ``pip`` or ``jupyter``. Documentation (markdown,
docstrings, printed or joined text) may show the short form."""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BARE = re.compile(r"(python[0-9.]*|vllm|trtllm-build|trtllm-serve|pip[0-9.]*|jupyter(-\w+)?)")
RUNNERS = {"run", "Popen", "call", "check_call", "check_output", "system", "popen", "spawnlp",
           "execvp", "execlp", "create_subprocess_exec", "create_subprocess_shell"}  # fmt: skip
SHELL_SPLIT = re.compile(r"&&|\|\||[;|(`]|\$\(")


def bare_in_shell(line: str) -> list[str]:
    """Commands of a shell line (split on ; && || | and subshells) that start with a bare
    tool; ``VAR=value`` prefixes and ``sudo``/``exec``/``env``/``time`` are skipped over."""
    found = []
    for part in SHELL_SPLIT.split(line):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            words = part.split()
        while words and (re.fullmatch(r"\w+=\S*", words[0]) or words[0] in
                         ("sudo", "exec", "env", "time", "nohup", "then", "do", "!")):  # fmt: skip
            words = words[1:]
        if words and BARE.fullmatch(words[0]):
            found.append(part.strip())
    return found


def bare_in_python(source: str) -> list[str]:
    """argv lists/tuples whose first word is a bare tool (unless joined into text), and
    subprocess/os calls whose first argument is a shell string starting with one."""
    found, tree = [], ast.parse(source)
    # a command joined into text (shlex.join, " ".join) is shown, not run
    joins = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    joins = [n for n in joins if isinstance(n.func, ast.Attribute) and n.func.attr == "join"]
    shown = {id(arg) for n in joins for arg in n.args}
    for node in ast.walk(tree):
        if isinstance(node, (ast.List, ast.Tuple)) and node.elts and id(node) not in shown:
            first = node.elts[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                if BARE.fullmatch(first.value) and len(node.elts) > 1:
                    found.append(ast.unparse(node)[:120])
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if isinstance(arg, ast.Call) and getattr(arg.func, "attr", "") == "split" and arg.args:
                arg = arg.args[0]  # run(shlex.split("vllm serve ..."))
            if isinstance(arg, ast.JoinedStr) and arg.values:
                arg = arg.values[0]  # run(f"pip install {x}", shell=True): its literal start
            if name in RUNNERS and isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found += [f"{name}({bad!r})" for bad in bare_in_shell(arg.value)]
    return found


def notebook_cells(nb: dict) -> list[tuple[int, str, str]]:
    """(cell index, "python" or "shell", text) of each code cell; IPython magics split off."""
    out = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        if "skip-execution" in cell.get("metadata", {}).get("tags", []):
            continue  # shown for a terminal on another machine (a GPU box), never run here
        text = "".join(cell["source"])
        if text.startswith(("%%bash", "%%sh", "%%script")):
            out.append((i, "shell", text.split("\n", 1)[1] if "\n" in text else ""))
            continue
        python, shell = [], []
        for line in text.splitlines():
            stripped = line.lstrip()
            if stripped.startswith("!"):
                shell.append(stripped[1:])
                python.append("")
            elif stripped.startswith("%"):
                python.append("")  # %pip, %time ...: run in this kernel
            else:
                python.append(line)
        out.append((i, "python", "\n".join(python)))
        out += [(i, "shell", line) for line in shell]
    return out


def sources() -> list[tuple[str, str, str]]:
    files = sorted((ROOT / "labhelpers").rglob("*.py"))
    files += sorted((ROOT / "tools").glob("*.py")) + sorted((ROOT / "apps").glob("*.py"))
    found = [(str(p.relative_to(ROOT)), "python", p.read_text(encoding="utf-8")) for p in files]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = notebook_cells(json.loads(nb.read_text(encoding="utf-8")))
        found += [(f"{nb.name} cell {i}", kind, text) for i, kind, text in cells]
    return found


def test_no_bare_commands_in_notebooks_labhelpers_tools_and_apps() -> None:
    bad = []
    for where, kind, text in sources():
        if kind == "shell":
            hits = [h for line in text.splitlines() for h in bare_in_shell(line)]
        else:
            hits = bare_in_python(text)
        bad += [f"{where}: {h}" for h in hits]
    assert not bad, (
        "commands must come from this environment (sys.executable, "
        "Path(sys.executable).parent / 'vllm', an absolute path), not PATH:\n" + "\n".join(bad)
    )


@pytest.mark.parametrize(
    "code",
    [
        'subprocess.run(["python", "-m", "pip", "install", "x"])',
        'Popen(("trtllm-serve", model, "--port", "8000"))',
        'argv = ["vllm", "serve", model]',
        'os.system("cd /tmp && pip install x")',
        'subprocess.run("VLLM_LOGGING_LEVEL=ERROR vllm serve m", shell=True)',
        'subprocess.check_output("jupyter kernelspec list", shell=True)',
        'subprocess.run(f"pip install {package}", shell=True)',
        'subprocess.Popen(shlex.split("vllm serve m --port 8000"))',
    ],
)
def test_the_scan_finds_bare_commands(code: str) -> None:
    assert bare_in_python(code)


@pytest.mark.parametrize(
    "code",
    [
        'subprocess.run([sys.executable, "-m", "pip", "install", "x"])',
        'subprocess.run([str(Path(sys.executable).parent / "trtllm-serve"), "serve", "--help"])',
        'print("python -m whichbackend --list")  # text for a terminal',
        '"""Run ``vllm serve MODEL`` in a terminal."""',
        'words = ["python" if a == sys.executable else a for a in argv]',
        'KNOWN = ("python",)',
        'result.command = shlex.join(["python", "-m", "whichbackend", *argv])',
        'subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv"])',
    ],
)
def test_the_scan_allows_the_environments_own_tools_and_text(code: str) -> None:
    assert not bare_in_python(code)


def test_the_shell_scan() -> None:
    assert bare_in_shell("curl -sS $BASE_URL/health") == []
    assert bare_in_shell("export X=1; python run.py") == ["python run.py"]
    assert bare_in_shell("CUDA_VISIBLE_DEVICES=0 vllm serve m | tee log") == [
        "CUDA_VISIBLE_DEVICES=0 vllm serve m"
    ]
    assert bare_in_shell("echo $(pip --version)") == ["pip --version)"]
    assert bare_in_shell("$PY -m pip list") == []
    notebook = {"cells": [
        {"cell_type": "code", "source": ["%%bash\n", "pip install x\n"]},
        {"cell_type": "code", "source": ["x = 1\n", "!jupyter lab --version\n", "%pip list\n"]},
        {"cell_type": "markdown", "source": ["Run `python -m vllm...` in a terminal"]},
    ]}  # fmt: skip
    cells = notebook_cells(notebook)
    assert [(i, kind) for i, kind, _ in cells] == [(0, "shell"), (1, "python"), (1, "shell")]
