"""IPEX-LLM (BigDL-LLM) low-bit formats on a CPU: which ones work, checks before loading, and
which kernel build the library picked for this CPU.

Used by notebook 03_ipex_llm_cpu_int4 and labhelpers.compare. Nothing here imports ipex_llm:
the checks run before it is loaded, and the kernel detection reads ``/proc/<pid>/maps``.

What was verified on CPU with ipex-llm 2.2.0 (see ../shared/FINDINGS.md of the course):

- ``sym_int4``, ``asym_int4``, ``sym_int5``, ``asym_int5``, ``sym_int8``, ``woq_int4`` work;
- ``nf3``, ``nf4``, ``fp4``, ``fp8`` (``fp8_e4m3``/``fp8_e5m2``) raise a clear error on CPU, and
  ``fp16``/``bf16`` low-bit are for Intel GPUs;
- the llama.cpp K-quants (``q2_k``, ``q4_k``, ``q5_k``, ``q6_k``), ``fp6`` and ``mixed_fp4``
  *abort the whole process* (``GGML_ASSERT``, SIGABRT) on models whose layer widths are not
  multiples of 256 — a kernel dies with them. :func:`check_format` refuses them before loading.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Formats that load and generate on a CPU (bits per weight, before scales).
CPU_FORMATS: dict[str, int] = {
    "sym_int4": 4,
    "asym_int4": 4,
    "sym_int5": 5,
    "asym_int5": 5,
    "sym_int8": 8,
    "woq_int4": 4,
}
#: Formats ipex-llm implements for Intel GPUs (XPU) only: on a CPU they raise an error.
GPU_ONLY_FORMATS = ("nf3", "nf4", "fp4", "fp8", "fp8_e4m3", "fp8_e5m2", "fp16", "bf16")
#: Block-quantized formats whose CPU kernels assert that every layer width is a multiple of 256.
BLOCK_256_FORMATS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "gguf_q4k_s", "gguf_q4k_m")
#: Formats that aborted the process on CPU in the course's tests: never offered on a CPU.
CPU_ABORTS = ("fp6", "mixed_fp4", "mixed_fp8")
QK_K = 256  # llama.cpp's K-quant super-block size

#: The kernel builds in ipex_llm/libs, in the order libllama-api.so tries them.
KERNEL_BUILDS = ("amx", "avx512", "avxvnni", "avx2", "avx")


class LowBitFormatError(ValueError):
    """A low-bit format that this model or this device cannot use."""


class NotALowBitFolderError(FileNotFoundError):
    """A folder that ``load_low_bit`` cannot read (not written by ``save_low_bit``)."""


def _layer_widths(config: Mapping[str, Any]) -> dict[str, int]:
    widths = {}
    for key in ("hidden_size", "intermediate_size"):
        if isinstance(config.get(key), int):
            widths[key] = config[key]
    return widths


def check_format(
    low_bit: str, config: Mapping[str, Any] | None = None, *, device: str = "cpu"
) -> str:
    """Return ``low_bit`` if ``from_pretrained(load_in_low_bit=low_bit)`` can work here, else
    raise :class:`LowBitFormatError` saying which format to use instead.

    ``config`` is the model's ``config.json`` as a dict (for the layer-width checks).
    """
    fmt = low_bit.strip().lower()
    safe = ", ".join(CPU_FORMATS)
    known = (*CPU_FORMATS, *GPU_ONLY_FORMATS, *BLOCK_256_FORMATS, *CPU_ABORTS)
    if fmt not in known:
        raise LowBitFormatError(
            f"'{low_bit}' is not an ipex-llm low-bit format. On a CPU use one of: {safe}."
        )
    if device != "cpu":
        return fmt
    if fmt in GPU_ONLY_FORMATS:
        raise LowBitFormatError(
            f"'{fmt}' runs on Intel GPUs (device 'xpu') only; on a CPU ipex-llm refuses it. "
            f"Use sym_int4 (same size as nf4/fp4) or sym_int8 (like fp8). CPU formats: {safe}."
        )
    if fmt in CPU_ABORTS:
        raise LowBitFormatError(
            f"'{fmt}' aborts the whole Python process on CPU (GGML_ASSERT in ipex-llm 2.2.0): "
            f"the kernel would die. Use sym_int4 or asym_int5 instead. CPU formats: {safe}."
        )
    if fmt in BLOCK_256_FORMATS:
        widths = _layer_widths(config or {})
        if not widths:
            raise LowBitFormatError(
                f"'{fmt}' needs every layer width to be a multiple of {QK_K}; pass the model's "
                "config to check it, or use sym_int4 / asym_int5."
            )
        bad = {k: v for k, v in widths.items() if v % QK_K}
        if bad:
            detail = ", ".join(f"{k}={v} ({v} % {QK_K} = {v % QK_K})" for k, v in bad.items())
            raise LowBitFormatError(
                f"'{fmt}' packs weights in blocks of {QK_K} values, but this model has {detail}: "
                "ipex-llm would abort the process (GGML_ASSERT). Use asym_int5 (close to q5_k "
                "in size) or sym_int4 instead."
            )
    return fmt


def check_low_bit_folder(path: str | os.PathLike[str]) -> str:
    """Return the format recorded in a folder written by ``model.save_low_bit(path)``, or raise
    :class:`NotALowBitFolderError` with what to do instead."""
    folder = Path(path).expanduser()
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise NotALowBitFolderError(
            f"{folder} does not exist. Write it first: model = AutoModelForCausalLM."
            "from_pretrained(src, load_in_low_bit='sym_int4'); model.save_low_bit(folder)."
        )
    if not config_file.is_file():
        raise NotALowBitFolderError(f"{folder} has no config.json: not a model folder.")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    fmt = config.get("bigdl_transformers_low_bit")
    if not fmt:
        raise NotALowBitFolderError(
            f"{folder} holds an ordinary (not low-bit) model: its config.json has no "
            "'bigdl_transformers_low_bit'. load_low_bit only reads folders written by "
            "save_low_bit; for this folder use AutoModelForCausalLM.from_pretrained("
            "folder, load_in_low_bit='sym_int4')."
        )
    weights = [f for f in folder.iterdir() if f.suffix in (".bin", ".safetensors")]
    if not weights:
        raise NotALowBitFolderError(
            f"{folder}/config.json says {fmt}, but the folder has no weights: save_low_bit "
            "did not finish. Delete the folder and save again."
        )
    return str(fmt)


@dataclass(frozen=True)
class KernelLibrary:
    """The ipex-llm native library mapped into a process, and what it says about the CPU."""

    path: str
    build: str  # one of KERNEL_BUILDS


def loaded_kernel_libraries(pid: int | str = "self") -> list[KernelLibrary]:
    """The ipex-llm kernel builds (``lib<family>_<build>.so``) mapped into process ``pid``.

    ipex-llm loads one only at the first low-bit matmul: call this after a ``generate``.
    """
    pattern = re.compile(r"/ipex_llm/libs/lib\w+?_(" + "|".join(KERNEL_BUILDS) + r")\.so$")
    found: dict[str, KernelLibrary] = {}
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        path = line.split()[-1] if line.split() else ""
        match = pattern.search(path)
        if match:
            found[path] = KernelLibrary(path=path, build=match.group(1))
    return list(found.values())


def best_build_for(flags: set[str] | frozenset[str]) -> str:
    """The fastest kernel build a CPU with these ``/proc/cpuinfo`` flags can run."""
    if {"amx_tile", "amx_int8"} <= flags:
        return "amx"
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
        return "avx512"
    if "avx_vnni" in flags and "avx2" in flags:
        return "avxvnni"
    if "avx2" in flags:
        return "avx2"
    return "avx"


def explain_kernel_choice(
    loaded: str | None, vendor: str | None, flags: set[str] | frozenset[str]
) -> str:
    """One paragraph (English) on why ipex-llm picked ``loaded`` on this CPU."""
    best = best_build_for(flags)
    if loaded is None:
        return (
            "No ipex-llm kernel library is mapped yet: it is loaded at the first low-bit "
            "matmul (run generate once first)."
        )
    text = f"ipex-llm loaded its '{loaded}' build; this CPU ({vendor}) could run '{best}'."
    if loaded == best:
        return text + " That is the best build for it."
    if vendor and vendor != "GenuineIntel" and loaded == "avx":
        return text + (
            " ipex-llm checks the CPU vendor string and only picks its AVX2/AVX-VNNI/AVX-512/AMX "
            "builds on 'GenuineIntel' CPUs: on AMD and other vendors it falls back to the plain "
            "AVX build (no FMA), even when the CPU supports the faster instructions."
        )
    return text + " (AMX is skipped when BIGDL_LLM_AMX_DISABLED is set.)"


def all_position_logits(model: Any) -> None:
    """Make an IPEX-LLM model return logits for every position, as perplexity needs
    (notebooks 03, 06).

    ipex-llm computes the LM head for the last position only (``optimize_lm_head`` on its
    ``LowBitLinear``); ``IPEX_LLM_LAST_LM_HEAD=0`` at load time turns that off for the whole
    run, which made the first token ~25% slower here. So: time generation with the
    optimization on, switch it off only for scoring, and check that it worked."""
    import torch

    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "optimize_lm_head"):
        head.optimize_lm_head = False
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    if logits.shape[1] != 4:
        raise RuntimeError(
            "ipex-llm returned logits for the last position only: set IPEX_LLM_LAST_LM_HEAD=0 "
            "before loading the model to compute perplexity"
        )


def parameter_count(model_dir: str | os.PathLike[str]) -> int:
    """Number of weights in a safetensors model folder, read from the file headers only."""
    from .models import safetensors_tensors

    return sum(t.numel for t in safetensors_tensors(model_dir).values())


def load_ram_gb(model_dir: str | os.PathLike[str], bytes_per_weight: float = 4.0) -> float:
    """RAM to load a model folder in a dtype (fp32: 4 bytes per weight) plus the runtime.

    from_pretrained holds the weights once; add 20% and 0.5 GB for the Python runtime,
    tokenizer and activations (the same margin labhelpers.models uses).
    """
    from .models import GB, MEMORY_FACTOR, RUNTIME_OVERHEAD_GB

    weights_gb = parameter_count(model_dir) * bytes_per_weight / GB
    return weights_gb * MEMORY_FACTOR + RUNTIME_OVERHEAD_GB


def check_ram_for_load(
    model_dir: str | os.PathLike[str],
    bytes_per_weight: float = 4.0,
    *,
    available_gb: float | None = None,
) -> float:
    """Raise labhelpers.models.NotEnoughResourcesError *before* loading if the model will not
    fit in RAM at this precision (default fp32). Returns the estimate in GB."""
    from .models import NotEnoughResourcesError, available_ram_gb

    need = load_ram_gb(model_dir, bytes_per_weight)
    have = available_ram_gb() if available_gb is None else available_gb
    if need > have:
        raise NotEnoughResourcesError(
            f"Loading {Path(model_dir).name} at {bytes_per_weight * 8:.0f} bits per weight needs "
            f"about {need:.1f} GB of RAM, but only {have:.1f} GB is available. Convert it once on "
            "a machine with more RAM (from_pretrained(..., load_in_low_bit='sym_int4') then "
            "save_low_bit) and use load_low_bit here, pick a smaller model, or close other "
            "kernels."
        )
    return need
