"""GPU code paths checked without a GPU: the roofline's bandwidth is the decoding device's
(notebooks 00, 01, 05 and ``compare.describe_machine`` for 06, with a faked GPU; the CPU-only
engines of notebooks 03, 07 and 07b read host memory even on a GPU machine), and no
notebook rebinds a labhelpers module that a later GPU-only cell calls (on a CPU that cell
prints its skip reason, so such a crash shows only on a GPU)."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

import whichbackend as compare
from labhelpers import roofline

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
#: Engines that decode on the CPU even where a GPU is: IPEX-LLM's CPU build (its own venv),
#: llama-cpp-python as set-up builds it (CPU), OpenVINO's CPU plugin (a venv with a CPU torch).
CPU_ONLY = {"03_ipex_llm_cpu_int4", "07_llama_cpp_gguf", "07b_openvino_int4"}


def code_of(path: Path) -> tuple[dict, str]:
    """The notebook and its code cells as one Python source (IPython magics blanked)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        text = "".join(cell["source"])
        if text.startswith("%%"):
            continue
        cells.append("\n".join("" if ln.lstrip().startswith(("%", "!")) else ln
                               for ln in text.splitlines()))  # fmt: skip
    return nb, "\n".join(cells)


def assignments(tree: ast.AST) -> dict[str, ast.expr]:
    """The last value assigned to each plain name."""
    found: dict[str, ast.expr] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value
    return found


def is_device_choice(expr: ast.expr) -> bool:
    """``"cuda" if <GPU usable> else "cpu"``."""
    return (
        isinstance(expr, ast.IfExp)
        and isinstance(expr.body, ast.Constant)
        and expr.body.value == "cuda"
        and isinstance(expr.orelse, ast.Constant)
        and expr.orelse.value == "cpu"
        and any(w in ast.unparse(expr.test) for w in ("ON_GPU", "gpu_available", "on_gpu"))
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_roofline_bandwidth_is_measured_on_the_decoding_device(path: Path) -> None:
    nb, source = code_of(path)
    tree = ast.parse(source)
    values = assignments(tree)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    calls = [n for n in calls if ast.unparse(n.func).endswith("memory_bandwidth_gbps")]
    cpu_only = path.stem in CPU_ONLY
    for call in calls:
        device = (
            call.args[0]
            if call.args
            else next((k.value for k in call.keywords if k.arg == "device"), None)
        )
        if cpu_only:
            assert device is None or ast.literal_eval(device) == "cpu", (
                f"{path.name}: {ast.unparse(call)}: its engine decodes on the CPU"
            )
            continue
        assert device is not None, f"{path.name}: {ast.unparse(call)} measures the CPU on a GPU too"
        if isinstance(device, ast.Name):
            device = values.get(device.id, device)
        assert is_device_choice(device), (
            f"{path.name}: {ast.unparse(call)}: the device must be "
            '"cuda" if <GPU usable> else "cpu" (the memory the decoder reads)'
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebooks_never_rebind_a_labhelpers_module(path: Path) -> None:
    _, source = code_of(path)
    tree = ast.parse(source)
    modules = {a.asname or a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
               and (n.module or "") == "labhelpers" for a in n.names}  # fmt: skip
    rebound = []
    for node in ast.walk(tree):
        targets: list[Any] = []
        if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, (ast.For, ast.With)):
            targets = (
                [node.target]
                if isinstance(node, ast.For)
                else [i.optional_vars for i in node.items if i.optional_vars is not None]
            )
        for target in targets:
            stored = [n for n in ast.walk(target) if isinstance(n, ast.Name)]
            names = [n.id for n in stored if isinstance(n.ctx, ast.Store)]
            rebound += [f"{name} = ... ({ast.unparse(node)[:80]})" for name in names
                        if name in modules]  # fmt: skip
    assert not rebound, f"{path.name} rebinds labhelpers modules: {rebound}"


@pytest.fixture
def fake_bandwidth(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    asked: list[str] = []

    def measure(device: str = "cpu", **kwargs: Any) -> roofline.Bandwidth:
        asked.append(device)
        gpu = device.startswith("cuda")
        return roofline.Bandwidth(4000.0 if gpu else 20.0, 3500.0 if gpu else 15.0, device,
                                  None if gpu else 1, 256.0, 4800.0 if gpu else None)  # fmt: skip

    monkeypatch.setattr(compare, "memory_bandwidth_gbps", measure)
    return asked


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])
def test_describe_machine_takes_the_gpus_bandwidth_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch, fake_bandwidth: list[str], gpu: bool
) -> None:
    monkeypatch.setattr(compare.mach, "gpu_available", lambda: gpu)
    described = compare.describe_machine(threads=1)
    assert fake_bandwidth == (["cuda", "cpu"] if gpu else ["cpu"])
    assert described["gpu_usable"] is gpu and described["bandwidth_device"] == fake_bandwidth[0]
    assert described["bandwidth_gbps"] == (4000.0 if gpu else 20.0)
    assert described["cpu_bandwidth_gbps"] == 20.0, "for the backends that decode on the CPU"
    assert described["gpu_datasheet_gbps"] == (4800.0 if gpu else None)
    assert described["bandwidth_threads"] == (None if gpu else 1)


def test_notebook_05_frees_cuda_memory_and_checks_it_before_vllm_starts_in_the_kernel() -> None:
    """On a GPU the transformers baseline leaves the caching allocator holding its memory;
    vLLM's start-up check (free >= utilization x total) would then refuse."""
    nb = json.loads((ROOT / "notebooks" / "05_vllm_serving.ipynb").read_text(encoding="utf-8"))
    code = [
        "".join(c["source"])
        for c in nb["cells"]
        if c["cell_type"] == "code" and "reference" not in c.get("metadata", {}).get("tags", [])
    ]  # the bench cells the notebook runs; reference cells are copied elsewhere
    loads = [i for i, c in enumerate(code) if "AutoModelForCausalLM.from_pretrained" in c]
    engine = next(i for i, c in enumerate(code) if "LLM(model=" in c)
    freed = [i for i, c in enumerate(code) if "torch.cuda.empty_cache()" in c]
    assert loads and freed and max(loads) <= min(freed) < engine
    cell = code[engine]
    assert "serve.check_gpu_memory(" in cell
    assert cell.index("serve.check_gpu_memory(") < cell.index("LLM(model=")
    flags = next(c for c in code if "FLAGS = dict(" in c and "ON_GPU" in c)
    gpu_flags = flags[flags.index("if ON_GPU:") : flags.index("else:")]
    assert "gpu_memory_utilization=" in gpu_flags, (
        "the GPU servers pass --gpu-memory-utilization, so serve.vllm_server checks free memory"
    )
