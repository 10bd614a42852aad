"""The ways of running a model that notebook 06_which_backend compares, what each one
needs, and what every one of them is asked to do.

* :data:`BACKENDS`: transformers fp32 / bf16 / GPTQ-Int4, IPEX-LLM sym_int4, vLLM bf16 /
  GPTQ-Int4, TensorRT-LLM; :func:`skip_reason` says why one cannot run here (no GPU, an
  environment that ``./course setup`` has not created) in words a student can act on;
* :class:`Settings`: the same prompts, token budget, repeats, concurrency levels and
  held-out text for every backend;
* the row helpers and the bytes a decode step streams (:func:`streamed_weight_bytes`,
  :func:`checkpoint_streamed_bytes`), the input of the roofline.

How each backend is measured is :mod:`labhelpers.measurement`; the comparison itself is
:mod:`labhelpers.compare`. Importing this module is instant and works under
transformers 4.37 and 5 (heavy imports are inside the functions).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from labhelpers import bench, env, quant
from labhelpers.bench import streamed_weight_bytes

#: The fixed chat prompts every backend answers (English and Chinese, short answers).
PROMPTS: tuple[str, ...] = (
    "What is the capital of France? Answer in one sentence.",
    "Explain what a KV cache is in two sentences.",
    "用一句话解释什么是模型量化。",
)
IPEX_KERNEL = "qwen-lab-ipex"
TRTLLM_KERNEL = "qwen-lab-trtllm"
SETUP_HINT = "run ./course setup"


@dataclass
class Settings:
    """What every backend is asked to do (notebook 06). ``gptq_model`` defaults to the
    registry's GPTQ-Int4 twin of ``model`` (``<model>-GPTQ-Int4``)."""

    model: str = "Qwen2.5-0.5B-Instruct"
    gptq_model: str | None = None
    prompts: tuple[str, ...] = PROMPTS
    max_new_tokens: int = 64
    repeats: int = 3
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    requests_per_slot: int = 2
    eval_tokens: int = 3072
    eval_window: int = 1024
    eval_stride: int = 512
    eval_topics: tuple[str, ...] = quant.HELDOUT_TOPICS
    threads: int = 1
    startup_timeout_s: float = 600
    backend_timeout_s: float = 1800

    def __post_init__(self) -> None:
        self.prompts = tuple(self.prompts)
        self.concurrency = tuple(sorted({int(c) for c in self.concurrency}))
        self.eval_topics = tuple(self.eval_topics)
        if not self.prompts:
            raise ValueError("prompts is empty: give at least one chat prompt")
        if self.max_new_tokens < 2 or self.repeats < 1 or self.threads < 1:
            raise ValueError("need max_new_tokens >= 2, repeats >= 1 and threads >= 1")
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
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Backend:
    """One way of running the model. ``runner``: ``worker`` (a fresh process of this
    environment), ``ipex`` (a process in the IPEX-LLM environment) or ``server`` (notebook 06)."""

    name: str
    engine: str
    weights: str
    runner: str
    gptq_checkpoint: bool = False
    twin: str | None = None  # the in-process backend with the same weights (perplexity)
    gpu_only: bool = False


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("transformers-fp32", "transformers", "fp32", "worker"),
        Backend("transformers-bf16", "transformers", "bf16", "worker"),
        Backend("transformers-gptq-int4", "transformers", "gptq-int4", "worker", True),
        Backend("ipex-sym_int4", "ipex-llm", "sym_int4", "ipex"),
        Backend("vllm-bf16", "vllm", "bf16", "server", twin="transformers-bf16"),
        Backend("vllm-gptq-int4", "vllm", "gptq-int4", "server", True, "transformers-gptq-int4"),
        Backend(
            "trtllm", "tensorrt-llm", "bf16", "server", twin="transformers-bf16", gpu_only=True
        ),
    )
}


def get_backends(names: str | Sequence[str] | None) -> list[Backend]:
    """Backends by name (a comma-separated string or a list; None or "all": every one).
    Used by notebook 06_which_backend."""
    if names is None or names == "all":
        return list(BACKENDS.values())
    wanted = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    unknown = [n for n in wanted if n not in BACKENDS]
    if unknown or not wanted:
        raise ValueError(f"unknown backend(s) {unknown}: choose from {', '.join(BACKENDS)}")
    return [BACKENDS[n] for n in dict.fromkeys(wanted)]


# --------------------------------------------------------------------------- environments


def env_python(kernel: str, venv: str) -> str | None:
    """:func:`labhelpers.env.kernel_python` as a string (notebook 06)."""
    python = env.kernel_python(kernel, venv)
    return str(python) if python else None


def has_module(python: str, module: str) -> bool:
    """Whether ``module`` can be imported by the interpreter ``python`` (checked without
    importing it) (notebook 06)."""
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def skip_reason(backend: Backend) -> str | None:
    """Why ``backend`` cannot run here (None when it can): said so that a student knows
    what to do about it (notebook 06)."""
    from importlib import util

    if backend.gpu_only:
        usable, why = env.gpu_status()
        if not usable:
            return f"needs an NVIDIA GPU ({why})"
    if backend.runner == "ipex":
        python = env_python(IPEX_KERNEL, "ipex")
        if python is None:
            return (
                f"the IPEX-LLM environment (.venvs/ipex, kernel {IPEX_KERNEL}) is missing: "
                f"{SETUP_HINT}"
            )
        if not has_module(python, "ipex_llm"):
            return f"ipex_llm is not installed in {python}: {SETUP_HINT}"
    if backend.engine == "vllm" and util.find_spec("vllm") is None:
        return f"vllm is not installed in this environment ({sys.executable}): {SETUP_HINT}"
    if backend.engine == "tensorrt-llm":
        python = env_python(TRTLLM_KERNEL, "trtllm")
        if python is None or not has_module(python, "tensorrt_llm"):
            return (
                f"tensorrt_llm is not installed (kernel {TRTLLM_KERNEL}): on a GPU machine "
                "./course setup creates .venvs/trtllm"
            )
    if backend.gptq_checkpoint and backend.engine == "transformers":
        if util.find_spec("gptqmodel") is None:
            return f"gptqmodel is not installed in this environment: {SETUP_HINT}"
    return None


# --------------------------------------------------------------------------- rows


def new_row(backend: Backend, model_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The row a backend fills in (status ``measured``, ``skipped`` or ``failed``) (notebook 06)."""
    return {
        "backend": backend.name,
        "engine": backend.engine,
        "weights": backend.weights,
        "model": Path(model_dir).name if model_dir else None,
        "status": "measured",
        "skipped_reason": None,
        "disk_gb": bench.dir_size_bytes(model_dir) / bench.GB if model_dir else None,
    }


def summarize_runs(runs: Sequence[bench.GenerationResult]) -> dict[str, Any]:
    """Medians over the timed single-stream runs of all prompts (notebook 06)."""

    def median(values: Any) -> float | None:
        kept = [v for v in values if v is not None]
        return statistics.median(kept) if kept else None

    return {
        "ttft_s": median(r.ttft_s for r in runs),
        "decode_tok_s": median(r.decode_tokens_per_s for r in runs),
        "e2e_tok_s": median(r.e2e_tokens_per_s for r in runs),
        "new_tokens": median(r.new_tokens for r in runs),
        "prompt_tokens": median(r.prompt_tokens for r in runs),
        "timed_runs": len(runs),
    }


def checkpoint_streamed_bytes(model_dir: str | os.PathLike[str]) -> int:
    """The same for a checkpoint a server loads as stored: tensor bytes of the
    ``*.safetensors`` files (read from their headers), less ``model.embed_tokens.weight``
    when a separate ``lm_head.weight`` exists (notebook 06)."""
    from labhelpers.models import safetensors_tensors

    sizes = {name: t.nbytes for name, t in safetensors_tensors(model_dir).items()}
    total = sum(sizes.values())
    if "lm_head.weight" in sizes:
        total -= sizes.get("model.embed_tokens.weight", 0)
    return total


__all__ = [
    "BACKENDS",
    "PROMPTS",
    "Backend",
    "Settings",
    "checkpoint_streamed_bytes",
    "env_python",
    "get_backends",
    "has_module",
    "new_row",
    "skip_reason",
    "streamed_weight_bytes",
    "summarize_runs",
]
