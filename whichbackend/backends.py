"""The ways of running one model that notebook 06 compares, what each needs, and the settings
every one of them gets (the same prompts, token budget, repeats, concurrency, held-out text)."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from importlib import util
from typing import Any

from labhelpers.envs import dist_version, kernel_python
from labhelpers.gguf import llama_cpp_setup
from labhelpers.machine import gpu_status
from labhelpers.measure import SANITY_PROMPT

#: The fixed chat prompts every backend answers (English and Chinese, short answers).
_PROMPTS = (
    SANITY_PROMPT,  # "What is the capital of France? Answer in one sentence.": the quality check's
    "Explain what a KV cache is in two sentences.",
    "用一句话解释什么是模型量化。",
)
#: The llama.cpp row's GGUF type. Notebook 07 measures Q8_0, Q4_0 and Q4_K_M: Q4_0 decodes fastest
#: and is 4-bit everywhere (32 weights per scale, like the other int4 rows' groups), while
#: Q4_K_M is mostly 5-bit Q5_0 on models whose width is not a multiple of 256 (the stand-in's
#: 576, Qwen2.5-0.5B's 896): closer to F16, slower. Notebook 07 shows both side by side.
GGUF_TYPE = "Q4_0"
#: The openvino-int4 row's export, the recipe of notebook 07b (optimum-cli export openvino).
OPENVINO_EXPORT = ("--task", "text-generation-with-past", "--weight-format", "int4",
                   "--group-size", "64", "--ratio", "1.0", "--sym")  # fmt: skip


@dataclass
class Settings:
    """What every backend is asked to do. ``gptq_model``: the GPTQ checkpoint to compare (a
    registry name, hub id or folder, e.g. the one notebook 02 wrote); default: the registry's
    GPTQ-Int4 twin of ``model``."""

    model: str = "Qwen2.5-0.5B-Instruct"
    gptq_model: str | None = None
    prompts: tuple[str, ...] = _PROMPTS
    max_new_tokens: int = 64
    repeats: int = 3
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    requests_per_slot: int = 2
    eval_tokens: int = 3072
    eval_window: int = 1024
    eval_stride: int = 512
    threads: int = 1
    startup_timeout_s: float = 600
    backend_timeout_s: float = 1800

    def __post_init__(self) -> None:
        self.prompts = tuple(self.prompts)
        self.concurrency = tuple(sorted({int(c) for c in self.concurrency}))
        if not self.prompts or self.max_new_tokens < 2 or self.repeats < 1 or self.threads < 1:
            raise ValueError("need prompts, max_new_tokens >= 2, repeats >= 1 and threads >= 1")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency needs levels >= 1, e.g. (1, 2, 4, 8)")
        if not 0 < self.eval_stride <= self.eval_window:
            raise ValueError("need 0 < eval_stride <= eval_window")

    @property
    def gptq_name(self) -> str:
        return self.gptq_model or f"{self.model}-GPTQ-Int4"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Settings:
        return cls(**{k: v for k, v in data.items() if k in {f.name for f in fields(cls)}})


@dataclass(frozen=True)
class Backend:
    """One way of running the model. ``runner``: ``worker`` (a fresh process of this
    environment), ``ipex`` / ``openvino`` (a process in that environment), ``llama.cpp`` (a
    worker, then its server for the sweep) or ``server``. ``weights_from``: ``base`` (the model)
    or ``gptq`` (the GPTQ checkpoint). ``twin``: the in-process backend with the same weights,
    for a server that cannot score text. ``cpu_only``: it decodes on the CPU even where a GPU
    is, so its roofline uses host memory's bandwidth."""

    name: str
    engine: str
    weights: str
    runner: str
    weights_from: str = "base"
    twin: str | None = None
    gpu_only: bool = False
    cpu_only: bool = False


_BACKENDS = {
    b.name: b
    for b in (
        Backend("transformers-fp32", "transformers", "fp32", "worker"),
        Backend("transformers-bf16", "transformers", "bf16", "worker"),
        Backend("transformers-gptq-int4", "transformers", "gptq-int4", "worker", "gptq"),
        Backend("ipex-sym_int4", "ipex-llm", "sym_int4", "ipex", cpu_only=True),
        Backend("openvino-int4", "openvino", "int4 g64 sym", "openvino", cpu_only=True),
        Backend("llama.cpp", "llama.cpp", f"gguf {GGUF_TYPE}", "llama.cpp", cpu_only=True),
        Backend("vllm-bf16", "vllm", "bf16", "server", twin="transformers-bf16"),
        Backend("vllm-gptq-int4", "vllm", "gptq-int4", "server", "gptq", "transformers-gptq-int4"),
        Backend(
            "trtllm", "tensorrt-llm", "bf16", "server", twin="transformers-bf16", gpu_only=True
        ),
    )
}


def get_backends(names: str | Sequence[str] | None) -> list[Backend]:
    """Backends by name (comma-separated or a list; None or "all": every one)."""
    if names is None or names == "all":
        return list(_BACKENDS.values())
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = [n for n in wanted if n not in _BACKENDS]
    if unknown or not wanted:
        raise ValueError(f"unknown backend(s) {unknown}: choose from {', '.join(_BACKENDS)}")
    return [_BACKENDS[n] for n in dict.fromkeys(wanted)]


def skip_reason(backend: Backend) -> str | None:
    """Why ``backend`` cannot run here (None: it can), in words a student can act on."""
    setup = "run ./course setup"
    if backend.gpu_only and not (status := gpu_status())[0]:
        return f"needs an NVIDIA GPU ({status[1]})"
    if backend.runner == "ipex":
        python = kernel_python("qwen-lab-ipex", "ipex")
        if python is None or not dist_version("ipex-llm", python):
            return f"the IPEX-LLM environment (.venvs/ipex) is missing: {setup}"
    if backend.runner == "openvino":
        python = kernel_python("qwen-lab-openvino", "openvino")
        if python is None or not dist_version("openvino-genai", python):
            return f"the OpenVINO environment (.venvs/openvino) is missing: {setup}"
        if not (python.parent / "optimum-cli").is_file():
            return f"optimum-cli is missing from {python.parent}: {setup}"
    if backend.runner == "llama.cpp" and (why := llama_cpp_setup())[0] is None:
        return why[1]
    if backend.engine == "vllm" and util.find_spec("vllm") is None:
        return f"vllm is not installed in this environment ({sys.executable}): {setup}"
    if backend.engine == "tensorrt-llm":
        python = kernel_python("qwen-lab-trtllm", "trtllm")
        if python is None or not dist_version("tensorrt-llm", python):
            return "tensorrt_llm is not installed: on a GPU machine, ./course setup makes it"
    gptq_here = backend.weights == "gptq-int4" and backend.engine == "transformers"
    if gptq_here and util.find_spec("gptqmodel") is None:
        return f"gptqmodel is not installed in this environment: {setup}"
    return None
