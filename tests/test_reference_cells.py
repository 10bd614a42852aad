"""Reference cells are a contract: copied as they are into a fresh Python without labhelpers,
after the preconditions their first lines state, they run.

The convention (README, "Tests"):

* A **reference cell** is a code cell tagged ``reference`` whose first line (the first after a
  ``%%bash`` magic) starts with ``# 参考代码``. No other cell has that marker line.
* Its **preconditions** are the ``# requires:`` lines of the comment block right below the
  marker, one per line: ``# requires: NAME = what it is`` (a Python variable that must exist
  before the cell runs) or ``# requires: $NAME = what it is`` (an environment variable, for
  ``%%bash`` cells). The notebook sets them in a lab-bench cell above (from labhelpers); a
  student sets them by hand. An input with a sensible default (a hub id) can instead be a plain
  assignment in the cell.
* Besides builtins and its preconditions, a reference cell uses only names bound by earlier
  reference cells of its notebook (or stated as their preconditions). No ``globals()``, no
  labhelpers.
* A reference cell tagged ``gpu`` or ``network`` (always with ``skip-execution``) needs a GPU or
  the network: it is compiled and its names are resolved, never run. Other reference cells
  tagged ``skip-execution`` are skipped by the notebook only because the next cell runs the same
  calls with measuring around them: this test runs them.

The tests:

* :func:`test_reference_cells_follow_the_convention` (quick, static): tags, markers,
  preconditions, free names, and that :data:`PROVIDERS` gives exactly the stated preconditions.
* :func:`test_reference_cells_run_without_labhelpers` (slow; one per notebook): the executable
  reference cells, in order, in ONE fresh interpreter of the notebook's kernel environment
  (``labhelpers.envs.kernel_python``), with ``sys.modules["labhelpers"] = None``, no PYTHONPATH,
  a temporary working directory and ``HF_HUB_OFFLINE=1``, given exactly the stated
  preconditions: the offline stand-in models, a temporary output folder, the fake OpenAI server
  (tests/fake_openai_server.py) for client code. Notebook 02 quantizes the stand-in for real
  (GPTQModel, 45 s) and notebook 05 starts vLLM's offline engine on it (35 s). The whole file
  took 2 min 20 s on 2 quiet cores (about 4.5 min while the machine was busy).
* :func:`test_reference_cells_resolve` (slow; one per kernel environment): every reference
  cell compiled, its imports, attribute chains and keyword arguments resolved against the pinned
  packages of the kernel environment (tensorrt_llm, which cannot be installed without a GPU,
  against the public names recorded from its source in labhelpers/data/trtllm_flags.json), the
  flags of its shell commands against the installed tools. For the ``gpu``/``network`` cells
  this is the whole check.

The worker that runs in the fresh interpreter is tests/reference_runner.py.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import fake_openai_server, require

from labhelpers import files, models

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).with_name("reference_runner.py")
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]*_*.ipynb"))  # 07b too
MARKER = "# 参考代码"
REQUIRES = re.compile(r"#\s*requires:\s*(\$?[A-Za-z_]\w*)(?:\s*=\s*(.+))?\s*$")
STATIC_TAGS = {"gpu", "network"}
SHELL_ENV = {"HOME", "PATH", "PWD", "USER"}
API_KEY = "lab-secret-key"  # what notebook 05's reference cells were written against
SERVED_MODEL = "qwen-gptq"


# --------------------------------------------------------------------------------------
# reading the cells
# --------------------------------------------------------------------------------------


@dataclass
class RefCell:
    index: int  # code-or-markdown cell index in the notebook, as stored
    kind: str  # "python" or "bash"
    body: str  # the source without a %%bash line
    tags: list[str]
    requires: list[str] = field(default_factory=list)

    @property
    def static(self) -> bool:
        return bool(STATIC_TAGS & set(self.tags))

    @property
    def label(self) -> str:
        return f"cell {self.index}"


def split_magic(source: str) -> tuple[str, str]:
    if source.startswith("%%bash"):
        return "bash", source.split("\n", 1)[1] if "\n" in source else ""
    return "python", source


def parse_requires(body: str) -> list[str]:
    """The ``# requires:`` names of the comment block that opens the cell."""
    names = []
    for line in body.splitlines()[1:]:
        if not line.startswith("#"):
            break
        found = REQUIRES.fullmatch(line.strip())
        if found:
            names.append(found.group(1))
    return names


def code_cells(notebook: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            yield i, cell


def reference_cells(notebook: Path) -> list[RefCell]:
    cells = []
    for i, cell in code_cells(notebook):
        tags = cell.get("metadata", {}).get("tags", [])
        if "reference" in tags:
            kind, body = split_magic("".join(cell["source"]))
            cells.append(RefCell(i, kind, body, tags, parse_requires(body)))
    return cells


def kernel_of(notebook: Path) -> str:
    return json.loads(notebook.read_text(encoding="utf-8"))["metadata"]["kernelspec"]["name"]


# --------------------------------------------------------------------------------------
# static analysis
# --------------------------------------------------------------------------------------


def top_level_names(tree: ast.Module) -> set[str]:
    """Names a cell binds in its module namespace (what later cells can use)."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(child.name)
                continue
            if isinstance(
                child, ast.Lambda | ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp
            ):
                continue
            if isinstance(child, ast.Name) and not isinstance(child.ctx, ast.Load):
                names.add(child.id)
            elif isinstance(child, ast.Import | ast.ImportFrom):
                names.update((a.asname or a.name).split(".")[0] for a in child.names)
            elif isinstance(child, ast.ExceptHandler) and child.name:
                names.add(child.name)
            visit(child)

    visit(tree)
    return names


def free_names(tree: ast.Module) -> set[str]:
    """Names a cell reads but binds nowhere (in no scope), builtins excepted."""
    bound, loaded = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return loaded - bound - set(dir(builtins))


def bash_names(body: str) -> tuple[set[str], set[str]]:
    """(variables a bash cell assigns, variables it reads)."""
    code = "\n".join(line for line in body.splitlines() if not line.lstrip().startswith("#"))
    assigned = set(re.findall(r"^\s*(?:export\s+)?([A-Za-z_]\w*)=", code, flags=re.M))
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", code))
    return assigned, used


def convention_problems(notebook: Path) -> list[str]:
    problems: list[str] = []
    for i, cell in code_cells(notebook):
        tags = cell.get("metadata", {}).get("tags", [])
        kind, body = split_magic("".join(cell["source"]))
        lines = body.splitlines()
        marked = bool(lines) and lines[0].startswith(MARKER)
        where = f"{notebook.name} cell {i}"
        if marked != ("reference" in tags):
            problems.append(f"{where}: tagged reference={'reference' in tags}, marker={marked}")
        if not marked and any(line.strip().startswith(MARKER) for line in lines):
            problems.append(f"{where}: a {MARKER!r} line inside a lab-bench cell")
        if not marked:
            continue
        if STATIC_TAGS & set(tags) and "skip-execution" not in tags:
            problems.append(
                f"{where}: tagged {sorted(STATIC_TAGS & set(tags))} needs skip-execution"
            )
        opening = len(parse_requires(body))
        later = [line for line in lines[1:] if line.strip().startswith("# requires:")]
        if len(later) != opening:
            problems.append(
                f"{where}: '# requires:' lines belong in the comment block under the marker"
            )
        if re.search(r"\b(globals|locals)\(\)|^\s*(from|import)\s+labhelpers\b", body, flags=re.M):
            problems.append(f"{where}: uses globals()/locals() or labhelpers")
    # free names, in order: executed cells see only executed cells before them
    seen_run: set[str] = set()
    seen_all: set[str] = set()
    for cell in reference_cells(notebook):
        where = f"{notebook.name} {cell.label}"
        stated = set(cell.requires)
        seen = seen_all if cell.static else seen_run
        if cell.kind == "bash":
            assigned, used = bash_names(cell.body)
            missing = used - assigned - SHELL_ENV - {n[1:] for n in stated | seen if n[0] == "$"}
            bound: set[str] = set()
        else:
            tree = ast.parse(cell.body)  # top-level await parses; compiling is checked at run time
            missing = free_names(tree) - stated - seen
            bound = top_level_names(tree)
        if missing:
            problems.append(f"{where}: uses {sorted(missing)}: state them with '# requires:'")
        seen_all |= bound | stated
        if not cell.static:
            seen_run |= bound | stated
    return problems


# --------------------------------------------------------------------------------------
# what the test provides
# --------------------------------------------------------------------------------------


class Context:
    """Builds the values of the preconditions on demand (each once)."""

    def __init__(self, tmp: Path, stack: ExitStack) -> None:
        self.tmp, self.stack = tmp, stack
        self._servers: dict[str, Any] = {}

    def standin(self, name: str) -> str:
        require(models.standin_built(name), f"the stand-in {name} is not built: run ./course setup")
        return str(files.models_dir() / name)

    def server_url(self, model: str = SERVED_MODEL, api_key: str | None = API_KEY) -> str:
        """The fake OpenAI-compatible server (client code needs no real model), one per name;
        ``api_key=None``: it takes any key, as a server started without ``--api-key`` does."""
        if model not in self._servers:
            keyed = ["--api-key", api_key] if api_key else []
            server = fake_openai_server(self.tmp, "--model", model, *keyed, name=f"fake-{model}")
            self._servers[model] = self.stack.enter_context(server.start(log=lambda _m: None))
        return self._servers[model].base_url

    def page_url(self) -> str:
        """apps/gradio_chat.py in front of the fake server (notebook 09's gradio_client cell)."""
        from labhelpers import serve

        port = serve.free_port()
        argv = [
            sys.executable, str(ROOT / "apps" / "gradio_chat.py"), "--port", str(port),
            "--base-url", f"{self.server_url()}/v1", "--api-key", API_KEY,
        ]  # fmt: skip
        page = serve.Server(
            argv, port=port, name="gradio-page", health_path="/config",
            log_path=self.tmp / "gradio-page.log",
        )  # fmt: skip
        return self.stack.enter_context(page.start(log=lambda _m: None)).base_url

    def standin_gguf(self) -> str:
        from labhelpers import gguf

        return str(gguf.standin_gguf())

    def llama_cpp_converter(self) -> str:
        from labhelpers import gguf

        converter, why = gguf.llama_cpp_setup()
        require(converter, why)
        return str(converter)

    def f16_gguf(self) -> str:
        """The stand-in as an f16 GGUF, made as notebook 07's bench makes it."""
        import gguf as gguf_package

        from labhelpers import gguf

        pre = gguf_package.GGUFReader(self.standin_gguf()).fields["tokenizer.ggml.pre"].contents()
        out = self.tmp / "provided-f16.gguf"
        gguf.convert_hf(
            self.standin(STANDIN), out, pre_tokenizer=pre, converter=self.llama_cpp_converter(),
            log=lambda _m: None,
        )  # fmt: skip
        return str(out)

    def qwen3_template(self) -> str:
        data = ROOT / "labhelpers" / "data" / "chat_templates.json"
        return json.loads(data.read_text(encoding="utf-8"))["Qwen3"]["template"]


Provider = Callable[[Context], Any]
STANDIN, STANDIN_GPTQ = "standin", "standin-gptq-int4"


def _ipex_copy(ctx: Context) -> str:
    from labhelpers import ipex

    src = ctx.standin(STANDIN)
    return str(ipex.for_transformers_4_37(src, ctx.tmp / "standin-4.37", log=lambda _m: None))


#: For each notebook, how the test provides each precondition its executed reference cells
#: state: exactly these names, no more (checked by the quick test).
PROVIDERS: dict[str, dict[str, Provider]] = {
    "01_gptq_inference": {"model_path": lambda c: c.standin(STANDIN_GPTQ)},
    "02_gptq_calibration": {
        "model_path": lambda c: c.standin(STANDIN),
        "out_path": lambda c: str(c.tmp / "standin-GPTQ-Int4"),
    },
    "03_ipex_llm_cpu_int4": {
        "model_dir": _ipex_copy,
        "save_dir": lambda c: str(c.tmp / "standin-sym_int4"),
    },
    "04_tensorrt_llm": {
        "config": lambda c: json.loads((Path(c.standin(STANDIN)) / "config.json").read_text()),
    },
    "05_vllm_serving": {
        "BASE_URL": lambda c: c.server_url(),
        "API_KEY": lambda c: API_KEY,
        "$BASE_URL": lambda c: c.server_url(),
        "$API_KEY": lambda c: API_KEY,
        "model_path": lambda c: c.standin(STANDIN_GPTQ),
    },
    "06_which_backend": {"model_path": lambda c: c.standin(STANDIN_GPTQ)},
    "07_llama_cpp_gguf": {
        "gguf_path": lambda c: c.standin_gguf(),
        "converter_dir": lambda c: c.llama_cpp_converter(),
        "model_dir": lambda c: c.standin(STANDIN),
        "f16_path": lambda c: str(c.tmp / "model-f16.gguf"),
        "f16_gguf": lambda c: c.f16_gguf(),
        "BASE_URL": lambda c: c.server_url("qwen-gguf", api_key=None),  # llama_cpp.server, no key
    },
    "07b_openvino_int4": {
        "model_path": lambda c: c.standin(STANDIN),
        "out_dir": lambda c: str(c.tmp / "standin-ov-int4"),
        "export": lambda c: dict(weight_format="int4", group_size=64, ratio=1.0, sym=True),
        "reuse_export": lambda c: False,
    },
    "08_troubleshooting": {
        "MODEL_DIR": lambda c: c.standin(STANDIN),
        "KV_BYTES": lambda c: 2**30,
        "BLOCK_TOKENS": lambda c: 128,
        "model_path": lambda c: c.standin(STANDIN),
        "QWEN3_TEMPLATE": lambda c: c.qwen3_template(),
    },
    "09_chat_apps": {
        "APPS_DIR": lambda c: str(ROOT / "apps"),
        "BASE_URL": lambda c: f"{c.server_url()}/v1",
        "API_KEY": lambda c: API_KEY,
        "PAGE_URL": lambda c: c.page_url(),
    },
}

#: Notebooks whose reference cells run in another course environment or start a serving
#: engine: integration as well as slow.
INTEGRATION = {"03_ipex_llm_cpu_int4", "05_vllm_serving"}


def kernel_python(notebook: Path) -> Path:
    from labhelpers import envs

    kernel = kernel_of(notebook)
    python = envs.kernel_python(kernel, kernel.removeprefix("qwen-lab-"))
    require(
        python, f"no interpreter for the kernel {kernel!r} of {notebook.name}: run ./course setup"
    )
    return Path(python)


def run_worker(python: Path, mode: str, spec: dict[str, Any], tmp: Path, timeout_s: int) -> str:
    """Run tests/reference_runner.py in a fresh ``python``; return its output, fail on error."""
    spec_file = tmp / f"{mode}-spec.json"
    spec_file.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    launch = (
        f"import runpy, sys; sys.argv = ['reference_runner', {mode!r}, {str(spec_file)!r}]; "
        f"runpy.run_path({str(RUNNER)!r}, run_name='reference_runner')"
    )
    done = subprocess.run(
        [str(python), "-u", "-c", launch], cwd=work, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, timeout=timeout_s,
    )  # fmt: skip
    out = done.stdout
    (tmp / f"{mode}.log").write_text(out, encoding="utf-8")
    assert done.returncode == 0, (
        f"{mode} failed (exit {done.returncode}); end of its output:\n{out[-8000:]}"
    )
    return out


def cell_spec(cell: RefCell) -> dict[str, Any]:
    return {"label": cell.label, "kind": cell.kind, "body": cell.body, "requires": cell.requires}


def with_marks(names: list[str]) -> list[Any]:
    return [
        pytest.param(
            n, marks=[pytest.mark.integration] if n in INTEGRATION else [], id=n.split("_")[0]
        )
        for n in names
    ]


def notebook_named(stem: str) -> Path:
    return next(p for p in NOTEBOOKS if p.stem == stem)


RUNNABLE = [p.stem for p in NOTEBOOKS if any(not c.static for c in reference_cells(p))]
KERNELS = sorted({kernel_of(p) for p in NOTEBOOKS if reference_cells(p)})


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem.split("_")[0])
def test_reference_cells_follow_the_convention(notebook: Path):
    problems = convention_problems(notebook)
    stated = {n for c in reference_cells(notebook) if not c.static for n in c.requires}
    given = set(PROVIDERS.get(notebook.stem, {}))
    if stated != given:
        problems.append(
            f"{notebook.name}: its reference cells state {sorted(stated)}, the test provides "
            f"{sorted(given)}: edit PROVIDERS to give exactly the stated preconditions"
        )
    assert not problems, "\n".join(problems)


def test_the_convention_check_catches_what_it_should(tmp_path: Path):
    cells = [
        ("# 参考代码\nmodel = load(model_path)\n", ["reference"]),  # model_path, load: unstated
        ("x = 1  # 参考代码 is only a marker on the first line\n", []),
        ("# 参考代码\n# requires: y = a number\nprint(y, x)\n", []),  # marker without the tag
        ("%%bash\n# 参考代码\ncurl $BASE_URL\n", ["reference"]),  # $BASE_URL: unstated
        (
            "# 参考代码\n# requires: z = a thing\nfrom labhelpers import models\n",
            ["reference", "gpu"],
        ),
    ]
    nb = {
        "cells": [
            {"cell_type": "code", "metadata": {"tags": tags}, "source": [src]}
            for src, tags in cells
        ],
        "metadata": {"kernelspec": {"name": "qwen-lab-core"}},
    }
    path = tmp_path / "99_demo.ipynb"
    path.write_text(json.dumps(nb), encoding="utf-8")
    text = "\n".join(convention_problems(path))
    assert "cell 0: uses ['load', 'model_path']" in text
    assert "cell 1" not in text
    assert "cell 2: tagged reference=False, marker=True" in text
    assert "cell 3: uses ['BASE_URL']" in text
    assert "cell 4: tagged ['gpu'] needs skip-execution" in text
    assert "cell 4: uses globals()/locals() or labhelpers" in text
    assert parse_requires(
        "# 参考代码\n# requires: a = x\n# requires: $B\nc = 1\n# requires: d\n"
    ) == [
        "a",
        "$B",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("stem", with_marks(RUNNABLE))
def test_reference_cells_run_without_labhelpers(stem: str, tmp_path: Path):
    notebook = notebook_named(stem)
    python = kernel_python(notebook)
    cells = [c for c in reference_cells(notebook) if not c.static]
    with ExitStack() as stack:
        ctx = Context(tmp_path, stack)
        providers = PROVIDERS.get(stem, {})
        stated = sorted({n for c in cells for n in c.requires})
        provide = {name: providers[name](ctx) for name in stated}
        spec = {"cells": [cell_spec(c) for c in cells], "provide": provide}
        out = run_worker(python, "run", spec, tmp_path, timeout_s=1500)
    assert f"ALL {len(cells)} REFERENCE CELLS RAN" in out
    for cell in cells:
        assert f"=== {cell.label} ran in" in out, f"{cell.label} did not report"


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernel",
    [
        pytest.param(k, marks=[pytest.mark.integration] if k == "qwen-lab-ipex" else [])
        for k in KERNELS
    ],
)
def test_reference_cells_resolve(kernel: str, tmp_path: Path):
    """Every reference cell of the notebooks that use ``kernel``, statically: for the ``gpu``
    and ``network`` cells this is the whole check; for the others it also covers the branches
    the stand-in run does not take (a hub id instead of a folder, the GPU line)."""
    notebooks = [p for p in NOTEBOOKS if kernel_of(p) == kernel and reference_cells(p)]
    python = kernel_python(notebooks[0])
    cells = [
        {**cell_spec(c), "label": f"{p.stem.split('_')[0]} {c.label}"}
        for p in notebooks
        for c in reference_cells(p)
    ]
    flags = json.loads((ROOT / "labhelpers" / "data" / "trtllm_flags.json").read_text())
    recorded = {"python_modules": flags["python_modules"], "python_api": flags["python_api"]}
    spec = {"cells": cells, "recorded": recorded, "import_paths": {"APPS_DIR": str(ROOT / "apps")}}
    out = run_worker(python, "resolve", spec, tmp_path, 600)
    assert f"{len(cells)} OF {len(cells)} CELLS RESOLVED" in out


def test_the_resolver_rejects_wrong_names(tmp_path: Path):
    """The static check can fail: a missing module, a missing attribute, an unknown keyword
    (real and recorded packages) and an unknown CLI flag are each reported."""
    flags = json.loads((ROOT / "labhelpers" / "data" / "trtllm_flags.json").read_text())
    recorded = {"python_modules": flags["python_modules"], "python_api": flags["python_api"]}
    bodies = {
        "ok": "import json\nfrom tensorrt_llm import LLM, SamplingParams\n"
        "with LLM(model='m', max_batch_size=8) as llm:\n"
        "    llm.generate(['hi'], SamplingParams(max_tokens=4), use_tqdm=False)\n"
        "json.dumps({}, indent=2)\n",
        "module": "import no_such_module_here\n",
        "attribute": "import json\njson.no_such_function('x')\n",
        "keyword": "import shlex\nshlex.split('a b', no_such_keyword=1)\n",
        "recorded": "from tensorrt_llm import LLM, SamplingParams\n"
        "llm = LLM(model='m', no_such_arg=1)\nllm.generate(['hi'], bad_kw=1)\n"
        "SamplingParams(max_tokenz=3)\nfrom tensorrt_llm import NoSuchName\n",
        "cli": "echo hi\nno-such-tool --flag\n",
    }
    cells = [
        {"label": k, "kind": "bash" if k == "cli" else "python", "body": v, "requires": []}
        for k, v in bodies.items()
    ]
    spec = {"cells": cells, "recorded": recorded}
    with pytest.raises(AssertionError) as failed:
        run_worker(Path(sys.executable), "resolve", spec, tmp_path, timeout_s=120)
    text = str(failed.value)
    assert "=== ok: resolved ===" in text
    assert "1 OF 6 CELLS RESOLVED" in text, text
    assert "ModuleNotFoundError" in text
    assert "json.no_such_function: AttributeError" in text
    assert "['no_such_keyword']" in text
    assert "LLM: keyword(s) ['no_such_arg']" in text
    assert "llm.generate: keyword(s) ['bad_kw']" in text
    assert "SamplingParams: keyword(s) ['max_tokenz']" in text
    assert "no public name 'NoSuchName'" in text
    assert "no checker for `no-such-tool`" in text
