"""Runs or resolves notebook reference cells in a fresh interpreter: the worker behind
tests/test_reference_cells.py. Standard library only, and it never imports labhelpers: it runs
in the notebook's kernel environment, started as

    python -u -c "import runpy, sys; sys.argv = ['reference_runner', MODE, SPEC]; \
runpy.run_path(RUNNER, run_name='reference_runner')"

so that ``__main__`` has no file, as in a Jupyter kernel (vLLM's engine and other ``spawn``
children then do not re-run the script). SPEC is a JSON file written by the test.

``run``: ``sys.modules["labhelpers"] = None`` (``import labhelpers`` fails), then each cell in
order in one fresh ``__main__`` namespace; before a cell, the preconditions it states that were
not provided yet (``NAME`` into the namespace, ``$NAME`` into the environment). Python cells may
use top-level ``await`` (as in Jupyter); ``%%bash`` cells run with ``bash -e -o pipefail``.

``resolve``: GPU-only and network-only cells are compiled, never run. Python cells: every import,
every attribute chain on an imported name, the keyword arguments of calls to imported callables
(and to methods of objects built from imported classes) are checked against the installed
packages, or against ``recorded`` public names for a package that cannot be installed here
(tensorrt_llm). ``%%bash`` cells: ``bash -n``, then the flags of each command against the
installed tool (``--help`` of hf/modelscope, vLLM's own argument parser for ``vllm serve``).
"""

from __future__ import annotations

import ast
import asyncio
import builtins
import contextlib
import importlib
import inspect
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path
from typing import Any

SHELL_TOOLS = {"curl", "echo", "export", "cd", "mkdir", "ls", "cat", "test", "true"}


def main(argv: list[str]) -> int:
    mode, spec_file = argv[1], argv[2]
    spec = json.loads(Path(spec_file).read_text(encoding="utf-8"))
    sys.modules["labhelpers"] = None  # type: ignore[assignment]  # import labhelpers -> ImportError
    try:
        import labhelpers  # noqa: F401
    except ImportError:
        pass
    else:  # pragma: no cover - the line above makes this impossible
        print("labhelpers is importable: the test would not prove anything", flush=True)
        return 2
    return run(spec) if mode == "run" else resolve(spec)


# --------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------


def run(spec: dict[str, Any]) -> int:
    main_module = types.ModuleType("__main__")  # a clean namespace, like a Jupyter kernel's
    main_module.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main_module
    namespace = main_module.__dict__
    provided: set[str] = set()
    for cell in spec["cells"]:
        for name in cell["requires"]:
            if name in provided:
                continue
            value = spec["provide"][name]
            if name.startswith("$"):
                os.environ[name[1:]] = str(value)
            else:
                namespace[name] = value
            provided.add(name)
        print(
            f"\n=== {cell['label']}: {cell['kind']}, given {cell['requires'] or 'nothing'} ===",
            flush=True,
        )
        t0 = time.perf_counter()
        try:
            if cell["kind"] == "bash":
                done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", cell["body"]])
                if done.returncode:
                    raise RuntimeError(f"the bash cell exited with {done.returncode}")
            else:
                code = compile(
                    cell["body"], f"<{cell['label']}>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
                )
                if code.co_flags & inspect.CO_COROUTINE:  # top-level await, as Jupyter allows
                    asyncio.run(eval(code, namespace))
                else:
                    exec(code, namespace)
        except BaseException:
            sys.stdout.flush()
            traceback.print_exc()
            print(f"\nFAILED: {cell['label']}", flush=True)
            return 1
        sys.stdout.flush()
        print(f"=== {cell['label']} ran in {time.perf_counter() - t0:.1f} s ===", flush=True)
    print(f"\nALL {len(spec['cells'])} REFERENCE CELLS RAN", flush=True)
    return 0


# --------------------------------------------------------------------------------------
# resolve
# --------------------------------------------------------------------------------------


class Recorded:
    """A public name of a package that is not installed here, known from its source."""

    def __init__(self, qualname: str, entry: dict[str, Any] | None = None) -> None:
        self.qualname = qualname
        self.entry = entry  # python_api entry: {"names": kwargs, "methods": {name: kwargs}}


class Resolver:
    def __init__(self, recorded: dict[str, Any]) -> None:
        self.modules = recorded.get("python_modules", {})
        self.api = recorded.get("python_api", {})
        self.problems: list[str] = []

    def module(self, name: str) -> Any:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            top = name.split(".")[0]
            if exc.name and exc.name.split(".")[0] == top and name in self.modules:
                return Recorded(name)
            raise

    def attribute(self, obj: Any, attr: str, where: str) -> Any:
        if isinstance(obj, Recorded):
            qualname = f"{obj.qualname}.{attr}"
            module = self.modules.get(obj.qualname)
            if module is not None:
                if attr not in module["names"]:
                    raise AttributeError(f"{obj.qualname} has no public name {attr!r} (recorded)")
                entry = next(
                    (e for k, e in self.api.items() if k == qualname or k.endswith("." + attr)),
                    None,
                )
                return Recorded(qualname, entry)
            if obj.entry and attr in obj.entry.get("methods", {}):
                return Recorded(qualname, {"names": obj.entry["methods"][attr]})
            raise AttributeError(f"{obj.qualname} has no recorded attribute {attr!r}")
        if isinstance(obj, types.ModuleType) and not hasattr(obj, attr):
            try:
                return importlib.import_module(f"{obj.__name__}.{attr}")  # a submodule
            except ModuleNotFoundError:
                raise AttributeError(f"module {obj.__name__!r} has no attribute {attr!r}") from None
        return getattr(obj, attr)

    def imported(self, node: ast.Import | ast.ImportFrom) -> dict[str, Any]:
        names: dict[str, Any] = {}
        for alias in node.names:
            if isinstance(node, ast.Import):
                mod = self.module(alias.name)
                if alias.asname:
                    names[alias.asname] = mod
                else:
                    names[alias.name.split(".")[0]] = self.module(alias.name.split(".")[0])
            else:
                mod = self.module("." * node.level + (node.module or ""))
                names[alias.asname or alias.name] = self.attribute(mod, alias.name, "import")
        return names

    def check_keywords(
        self, target: Any, call: ast.Call, what: str, *, method: bool = False
    ) -> None:
        given = [k.arg for k in call.keywords if k.arg is not None]
        if not given:
            return
        if isinstance(target, Recorded):
            if target.entry is None:
                return
            allowed = set(target.entry.get("names", []))
            unknown = [k for k in given if k not in allowed]
            if unknown:
                self.problems.append(f"{what}: keyword(s) {unknown} not among {sorted(allowed)}")
            return
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):
            return
        params = signature.parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return
        allowed = {p.name for p in params}
        unknown = [k for k in given if k not in allowed]
        if unknown:
            self.problems.append(f"{what}: keyword(s) {unknown} not in {target!r}{signature}")


def chain(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def is_class(obj: Any) -> bool:
    return inspect.isclass(obj) or (isinstance(obj, Recorded) and obj.entry is not None)


def resolve_python(body: str, label: str, resolver: Resolver) -> None:
    compile(body, f"<{label}>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    tree = ast.parse(body)
    known: dict[str, Any] = {}  # name -> resolved object (imports)
    instances: dict[str, Any] = {}  # name -> resolved class it was built from
    assigned: dict[str, int] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            assigned[node.id] = assigned.get(node.id, 0) + 1
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            try:
                known.update(resolver.imported(node))
            except Exception as exc:
                resolver.problems.append(f"{ast.unparse(node)}: {type(exc).__name__}: {exc}")

    def resolve_chain(parts: list[str]) -> Any:
        obj = known[parts[0]]
        for i, attr in enumerate(parts[1:], start=1):
            obj = resolver.attribute(obj, attr, ".".join(parts[:i]))
        return obj

    # objects built from imported classes, bound once: x = Cls(...) / with Cls(...) as x
    for node in ast.walk(tree):
        pairs: list[tuple[ast.expr, ast.expr]] = []
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            pairs.append((node.targets[0], node.value))
        elif isinstance(node, ast.With | ast.AsyncWith):
            pairs += [(i.optional_vars, i.context_expr) for i in node.items if i.optional_vars]
        for target, value in pairs:
            if not (isinstance(target, ast.Name) and isinstance(value, ast.Call)):
                continue
            parts = chain(value.func)
            if parts and parts[0] in known and assigned.get(target.id) == 1:
                try:
                    cls = resolve_chain(parts)
                except Exception:
                    continue  # reported below
                if is_class(cls):
                    instances[target.id] = cls

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            parts = chain(node)
            if parts and parts[0] in known and assigned.get(parts[0], 0) == 0:
                try:
                    resolve_chain(parts)
                except Exception as exc:
                    resolver.problems.append(f"{'.'.join(parts)}: {type(exc).__name__}: {exc}")
        if not isinstance(node, ast.Call):
            continue
        parts = chain(node.func)
        if not parts:
            continue
        what = ".".join(parts)
        if parts[0] in known and assigned.get(parts[0], 0) == 0:
            try:
                target = resolve_chain(parts)
            except Exception:
                continue  # already reported as an attribute or import problem
            resolver.check_keywords(target, node, what)
        elif parts[0] in instances and len(parts) == 2:
            cls, method = instances[parts[0]], parts[1]
            try:
                bound = resolver.attribute(cls, method, parts[0])
            except AttributeError as exc:
                resolver.problems.append(f"{what}: {exc}")
                continue
            if isinstance(bound, Recorded) or not hasattr(cls, "__getattr__"):
                resolver.check_keywords(bound, node, what, method=True)


def commands(body: str) -> list[list[str]]:
    """The simple commands of a shell script: continuations joined, comment lines dropped,
    split at newlines (outside quotes), ``||``, ``&&``, ``;`` and ``|``; leading
    ``VAR=value`` words removed."""
    text = re.sub(r"\\\n", " ", body)
    text = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|\n")
    lexer.whitespace, lexer.whitespace_split, lexer.commenters = " \t\r", True, ""
    found: list[list[str]] = []
    current: list[str] = []
    for word in [*lexer, ";"]:
        if word and set(word) <= set(";&|\n"):
            while current and re.fullmatch(r"[A-Za-z_]\w*=.*", current[0]):
                current.pop(0)
            if current:
                found.append(current)
            current = []
        else:
            current.append(word)
    return found


def flags_of(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0] for w in words if w.startswith("--")]


def resolve_bash(body: str, label: str, resolver: Resolver) -> None:
    syntax = subprocess.run(["bash", "-n", "-c", body], capture_output=True, text=True)
    if syntax.returncode:
        resolver.problems.append(f"bash -n: {syntax.stderr.strip()}")
        return
    bin_dir = Path(sys.executable).parent
    for words in commands(body):
        tool = words[0]
        what = shlex.join(words[:3])
        if tool in SHELL_TOOLS:
            continue
        if tool == "vllm" and words[1:2] == ["serve"]:
            from vllm.entrypoints.launchers.cli_args import make_arg_parser
            from vllm.utils.argparse_utils import FlexibleArgumentParser

            parser = make_arg_parser(FlexibleArgumentParser(allow_abbrev=False))
            errors = io.StringIO()
            try:
                with contextlib.redirect_stderr(errors):
                    parser.parse_args(words[2:])
            except SystemExit:
                why = errors.getvalue().strip().splitlines()[-1:] or ["?"]
                resolver.problems.append(f"{what} ...: vLLM's argument parser says {why[0]}")
            continue
        if tool in ("hf", "modelscope") and len(words) > 1:
            exe = bin_dir / tool
            help_text = subprocess.run(
                [str(exe), words[1], "--help"], capture_output=True, text=True, timeout=120
            ).stdout
            if not help_text:
                resolver.problems.append(f"{what}: `{exe} {words[1]} --help` printed nothing")
                continue
            for flag in flags_of(words):
                if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text):
                    resolver.problems.append(f"{what} ...: {flag} is not in its --help")
            continue
        resolver.problems.append(
            f"{what}: no checker for `{tool}` in tests/reference_runner.py (add one)"
        )


def resolve(spec: dict[str, Any]) -> int:
    failed = 0
    import_paths: dict[str, str] = spec.get("import_paths", {})
    for cell in spec["cells"]:
        resolver = Resolver(spec.get("recorded", {}))
        # a stated folder the cell puts on sys.path (notebook 09: APPS_DIR) resolves as that folder
        extra = [import_paths[n] for n in cell.get("requires", []) if n in import_paths]
        sys.path[:0] = extra
        try:
            if cell["kind"] == "bash":
                resolve_bash(cell["body"], cell["label"], resolver)
            else:
                resolve_python(cell["body"], cell["label"], resolver)
        except Exception as exc:
            resolver.problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            del sys.path[: len(extra)]
        status = "resolved" if not resolver.problems else "FAILED"
        print(f"=== {cell['label']}: {status} ===", flush=True)
        for problem in resolver.problems:
            print(f"  - {problem}", flush=True)
        failed += bool(resolver.problems)
    print(f"\n{len(spec['cells']) - failed} OF {len(spec['cells'])} CELLS RESOLVED", flush=True)
    return 1 if failed else 0


if __name__ in ("__main__", "reference_runner"):
    sys.exit(main(sys.argv))
