"""The shape of labhelpers: a fixed import order with no circles, every public name used
somewhere outside its module and the tests, and ``import labhelpers.<module>`` instant.

The order is the map in labhelpers/__init__.py's docstring: a module may import only modules
listed above it. Every import counts, also one inside a function, and so does a job another
process runs by name (``envs.run_in_env(python, "labhelpers.ipex:measure_format")``).
Notebook 06's comparison is an application on top of the bench, the package ``whichbackend``:
labhelpers never imports it, and its code counts as a user of labhelpers' names.
"""

from __future__ import annotations

import ast
import graphlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "labhelpers"
#: What is searched for uses of a public name, besides the other labhelpers modules.
CODE_USERS = ("notebooks/*.ipynb", "tools/**/*.py", "apps/**/*.py", "whichbackend/**/*.py")
TEXT_USERS = (
    "course",
    ".ci/*",
    ".github/**/*",
    "docs/**/*",
    "apps/**/*",
    "binder/*",
    "environment.yml",
    "labhelpers/data/*.json",
)
JOB = re.compile(r"^labhelpers\.([\w.]+):(\w+)$")  # a job for envs.run_in_env
HEAVY = (
    "torch",
    "transformers",
    "pandas",
    "psutil",
    "numpy",
    "matplotlib",
    "openai",
    "httpx",
    "safetensors",
    "huggingface_hub",
    "jupyter_client",
    "vllm",
    "gptqmodel",
    "ipex_llm",
)


def module_name(path: Path) -> str:
    """``files`` for labhelpers/files.py."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if p != PACKAGE / "__init__.py"}


def layer_order() -> list[str]:
    """The modules in the order of labhelpers/__init__.py's map."""
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text(encoding="utf-8"))) or ""
    order = []
    for line in doc.splitlines():
        if match := re.match(r"^ {4}(\w+)(/?) {2,}\S", line):
            order.append(match[1])
    return order


ORDER = layer_order()


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def imported_modules(module: str, tree: ast.Module) -> Iterator[tuple[str, int]]:
    """(labhelpers module, line) for every import of one and every job run by name."""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("labhelpers."):
                    yield alias.name.removeprefix("labhelpers."), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .x import y
                parent = package.split(".") if package else []
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(["labhelpers", *parent, *([base] if base else [])])
            if base != "labhelpers" and not base.startswith("labhelpers."):
                continue
            inner = base.removeprefix("labhelpers").removeprefix(".")
            for alias in node.names:
                sub = f"{inner}.{alias.name}".lstrip(".")
                if sub in MODULES:
                    yield sub, node.lineno
                elif inner:
                    yield inner, node.lineno
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if match := JOB.match(node.value):
                yield match[1], node.lineno


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}."""
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        edges: dict[str, int] = {}
        for target, line in imported_modules(module, parse(path)):
            if target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def test_the_map_in_init_lists_every_module_once():
    assert len(ORDER) == len(set(ORDER)), f"listed twice: {ORDER}"
    assert set(ORDER) == set(MODULES), (
        f"labhelpers/__init__.py's map and the files differ: not in the map "
        f"{sorted(set(MODULES) - set(ORDER))}, no such module {sorted(set(ORDER) - set(MODULES))}"
    )


def test_every_import_goes_up_the_map():
    graph = import_graph()
    unknown = [f"{m} -> {t}" for m, edges in graph.items() for t in edges if t not in MODULES]
    assert not unknown, f"imports of labhelpers modules that do not exist: {unknown}"
    upward = [
        f"labhelpers/{MODULES[m].relative_to(PACKAGE)}:{line} imports {t}, which is not above {m}"
        for m, edges in graph.items()
        for t, line in edges.items()
        if ORDER.index(t) >= ORDER.index(m)
    ]
    print("\n".join(upward))
    assert not upward, "imports against the order of labhelpers/__init__.py:\n" + "\n".join(upward)


def test_there_is_no_import_circle():
    graph = import_graph()
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        pytest.fail(f"import circle: {' -> '.join(exc.args[1])}")


def test_the_bench_never_imports_the_applications_built_on_it():
    """whichbackend (notebook 06), tools/ and apps/ use labhelpers, never the other way."""
    for path in MODULES.values():
        for node in ast.walk(parse(path)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.split(".")[0] in ("whichbackend", "standin", "gpu_check")]
            assert not bad, f"{path.relative_to(ROOT)}:{node.lineno} imports {bad}"


# --------------------------------------------------------------------------- unused public names


def public_names(tree: ast.Module) -> dict[str, int]:
    """Module-level functions, classes and constants not starting with ``_``: name -> line."""
    names: dict[str, int] = {}

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.setdefault(node.name, node.lineno)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            names.setdefault(name.id, node.lineno)
            elif isinstance(node, ast.If) and not is_main_block(node):
                visit(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body + node.orelse + node.finalbody)

    visit(tree.body)
    return {n: line for n, line in names.items() if not n.startswith("_")}


def is_main_block(node: ast.stmt) -> bool:
    """``if __name__ == "__main__":``"""
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
    )


def code_references(tree: ast.Module, package: str = "") -> set[tuple[str, str]]:
    """(module, name) pairs a piece of code uses: ``from labhelpers.m import name``,
    ``m.name`` after ``from labhelpers import m`` / ``import labhelpers.m as x``, chains such as
    ``labhelpers.machine.GpuSpec``, and jobs named in strings."""
    aliases: dict[str, str] = {}
    used: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "labhelpers" or alias.name.startswith("labhelpers."):
                    if alias.asname:
                        aliases[alias.asname] = alias.name.removeprefix("labhelpers").lstrip(".")
                    else:
                        aliases["labhelpers"] = ""
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".") if package else []
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(["labhelpers", *parent, *([base] if base else [])])
            if base != "labhelpers" and not base.startswith("labhelpers."):
                continue
            inner = base.removeprefix("labhelpers").lstrip(".")
            for alias in node.names:
                sub = f"{inner}.{alias.name}".lstrip(".")
                if sub in MODULES:
                    aliases[alias.asname or alias.name] = sub
                if inner:
                    used.add((inner, alias.name))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if match := JOB.match(node.value):
                used.add((match[1], match[2]))

    def module_of(node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return aliases.get(node.id)
        if isinstance(node, ast.Attribute) and (outer := module_of(node.value)) is not None:
            candidate = f"{outer}.{node.attr}".lstrip(".")
            return candidate if candidate in MODULES else None
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (module := module_of(node.value)):
            used.add((module, node.attr))
    return used


def text_references(text: str) -> set[tuple[str, str]]:
    """``labhelpers.m.name``, ``m.name``, ``labhelpers.m:name`` in a text file or a shell line."""
    found = set()
    for module in MODULES:
        pattern = rf"(?<![\w.]){re.escape(module)}[.:]([A-Za-z]\w*)"
        found |= {(module, name) for name in re.findall(pattern, text.replace("labhelpers.", ""))}
    return found


def notebook_code(path: Path) -> tuple[str, str]:
    """(Python of the code cells, their shell and magic lines)."""
    python, shell = [], []
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] != "code":
            continue
        if source.lstrip().startswith("%%"):  # a cell magic: %%bash, %%writefile
            shell.append(source)
            continue
        for line in source.splitlines():
            stripped = line.lstrip()
            if stripped.startswith(("!", "%")):
                shell.append(line)
                line = line[: len(line) - len(stripped)] + "pass"
            python.append(line)
        python.append("")
    return "\n".join(python), "\n".join(shell)


def glob_files(patterns: tuple[str, ...]) -> list[Path]:
    return sorted({p for pattern in patterns for p in ROOT.glob(pattern) if p.is_file()})


def references_by_user() -> dict[str, set[tuple[str, str]]]:
    """Who uses what: a labhelpers module's name, or a file's path -> its (module, name) uses.
    A module's own ``if __name__ == "__main__":`` block (its command line) counts as a user."""
    users: dict[str, set[tuple[str, str]]] = {}
    for module, path in MODULES.items():
        tree = parse(path)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        users[module] = code_references(tree, package)
        main = [node for node in tree.body if is_main_block(node)]
        names = {n.id for block in main for n in ast.walk(block) if isinstance(n, ast.Name)}
        users[f"{module} (command line)"] = {(module, name) for name in names}
        jobs = [
            JOB.match(n.value)
            for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]
        users[f"{module} (jobs run by envs)"] = {(m[1], m[2]) for m in jobs if m}
    for path in glob_files(CODE_USERS):
        shell = ""
        if path.suffix == ".ipynb":
            python, shell = notebook_code(path)
        else:
            python = path.read_text(encoding="utf-8", errors="replace")
        try:
            found = code_references(ast.parse(python))
        except SyntaxError:
            found = text_references(python)
        users[str(path.relative_to(ROOT))] = found | text_references(shell)
    for path in glob_files(TEXT_USERS):
        if path.suffix not in (".png", ".jpg", ".gif", ".pdf"):
            text = path.read_text(encoding="utf-8", errors="replace")
            users[str(path.relative_to(ROOT))] = text_references(text)
    return users


def result_classes(tree: ast.Module, module: str, used: set[tuple[str, str]]) -> set[str]:
    """The exemption, and the only one: a public class named in the annotation of a parameter or
    the return of a used public function (or of a method of a used public class) is used with
    it: ``sizing.Estimate`` is what ``sizing.estimate()`` returns, ``measure.GenerationTimer``
    what ``time_generate``'s callback receives. Constants and functions get no exemption."""
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef) and n.name[0] != "_"}
    callables: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
    for node in tree.body:
        if (
            isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and (module, node.name) in used
        ):
            callables.append(node)
        elif isinstance(node, ast.ClassDef) and (module, node.name) in used:
            callables += [
                f
                for f in node.body
                if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and f.name[0] != "_"
            ]
    named = set()
    for function in callables:
        args = function.args
        params = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
        for annotation in [p.annotation for p in params if p is not None] + [function.returns]:
            if annotation is not None:
                named |= {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)}
    return (classes & named) - {name for m, name in used if m == module}


def public_name_report() -> tuple[list[str], list[str], list[str]]:
    """(every public name, the result classes exempted, the unused ones), as module.name."""
    users = references_by_user()
    everything, exempt, unused = [], [], []
    for module, path in MODULES.items():
        tree = parse(path)
        used = set().union(*(refs for user, refs in users.items() if user != module))
        results = result_classes(tree, module, used)
        for name, line in public_names(tree).items():
            everything.append(f"{module}.{name}")
            if name in results:
                exempt.append(f"{module}.{name}")
            elif (module, name) not in used:
                unused.append(f"labhelpers/{path.relative_to(PACKAGE)}:{line} {module}.{name}")
    return everything, exempt, unused


def test_every_public_name_is_used_outside_its_module_and_the_tests():
    _, _, unused = public_name_report()
    print(f"{len(unused)} unused public names:\n" + "\n".join(unused))
    assert not unused, (
        f"{len(unused)} public names that no notebook, other module, command line, script or data "
        "file uses: make them _private, or delete them:\n" + "\n".join(unused)
    )


def test_the_public_surface_stays_small():
    """At most 110 names a notebook calls or another module imports, and at most 120 public
    names with the result classes (issue 13). Make helpers _private before adding names."""
    everything, exempt, _ = public_name_report()
    api = sorted(set(everything) - set(exempt))
    print(f"{len(everything)} public names; {len(exempt)} result classes: {', '.join(exempt)}")
    assert len(api) <= 110, f"{len(api)} public names besides result classes (limit 110)"
    assert len(everything) <= 120, f"{len(everything)} public names (limit 120)"


# --------------------------------------------------------------------------- import is instant


@pytest.mark.parametrize("module", list(MODULES))
def test_import_is_instant(module: str):
    """Heavy libraries are imported inside the functions that need them, so a module imports
    in every course environment, and at once."""
    code = f"import sys, labhelpers.{module}; print(sorted(set({HEAVY!r}) & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", f"import labhelpers.{module} imports {out.stdout.strip()}"
