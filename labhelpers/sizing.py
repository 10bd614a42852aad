"""How much GPU memory, host RAM and disk a model needs under TensorRT-LLM, from its
``config.json`` alone (notebook 04 teaches the rules; 05 reuses the KV arithmetic). Per GPU
under ``tp``-way tensor parallelism, in bytes (rows in GiB):

* weights: each decoder linear layer in the mode's format (:meth:`Mode.linear_bytes`), the rest
  16-bit; column-parallel layers split their outputs, row-parallel ones their inputs; with
  tp > 1 every GPU keeps the whole embedding table and a slice of the LM head;
* KV cache: ``2 × layers × KV heads × head size × bytes`` per token, in blocks of 32 tokens;
* activations, sized at build time for ``max_num_tokens`` (TensorRT-LLM's
  ``docs/source/reference/memory.md``), plus fp32 logits; a 1 GiB runtime reserve; the KV pool
  gets 0.9 of what is left, like ``KvCacheConfig``;
* the engine build: disk = source checkpoint + converted checkpoint + engines; host RAM peak =
  max(source + one rank, 3 × one rank) + 2 GiB; calibrating modes load the 16-bit model.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labhelpers.files import GIB
from labhelpers.machine import GpuSpec, gpu_spec
from labhelpers.models import ModelShape, load_config
from labhelpers.roofline import roofline_tokens_per_s

_RESERVE = 1 * GIB  # CUDA context, cuBLAS workspaces, NCCL, per GPU
_BUILD_OVERHEAD = 2 * GIB  # Python, torch, TensorRT libraries during a build
_KV_FRACTION = 0.9  # KvCacheConfig.free_gpu_memory_fraction default
_BLOCK = 32  # KvCacheConfig.tokens_per_block default
_MAX_NUM_TOKENS = 8192  # BuildConfig.max_num_tokens default
_CONTEXT = 4096  # tokens per sequence when none is given (capped by the model)
_MIN_CAPABILITY = (8, 0)  # TensorRT-LLM 1.x: Ampere and newer
_GROUPWISE = (64, 128)  # fpA_intB_gemm_template.h: "Only group size 64 and 128 supported"
_MODEL_TYPES = ("qwen", "qwen2", "qwen3", "llama", "mistral")
_BACKENDS = ("engine", "pytorch")
# What TensorRT-LLM 1.2's PyTorch backend (trtllm-serve <hf model>, tensorrt_llm.LLM) serves
# here: 16-bit checkpoints and ModelOpt's FP8 / INT4-AWQ exports. HF GPTQ checkpoints load only
# through the engine path in 1.2 (PR #19442 for GPTQ in the PyTorch backend was still open).
_PYTORCH_MODES = ("bf16", "fp16", "fp8", "int4_awq")
_KV_DTYPES: dict[str, int | None] = {"auto": None, "fp16": 2, "bf16": 2, "int8": 1, "fp8": 1}


class SizingError(ValueError):
    """Bad input, a mode that cannot run here, or a model that does not fit even one sequence.
    The message says what to do instead (for the last: what would fit)."""


# Qwen's published quantized checkpoints, by name suffix: the quantization their config adds.
_SUFFIXES = {
    "-gptq-int4": {"quant_method": "gptq", "bits": 4, "group_size": 128},
    "-awq": {"quant_method": "awq", "bits": 4, "group_size": 128},
    "-fp8": {"quant_method": "fp8"},
}


def shape_of(config: Any, name: str | None = None) -> ModelShape:
    """:class:`labhelpers.models.ModelShape` of a dense decoder this module can size, from a
    config (dict, path, transformers config) or a shipped config's name; a quantized checkpoint's
    name (``Qwen2.5-7B-Instruct-GPTQ-Int4``) gives its base config with Qwen's quantization
    (4-bit, group 128), so its mode is ``int4_gptq``."""
    if isinstance(config, ModelShape):
        return config
    try:
        text = config.lower() if isinstance(config, str) and not Path(config).exists() else ""
        if suffix := next((s for s in _SUFFIXES if text.endswith(s)), None):
            name, base = name or config, load_config(config[: -len(suffix)])
            config = base | {"quantization_config": _SUFFIXES[suffix]}
        cfg = load_config(config)
        model_type = str(cfg.get("model_type") or cfg.get("text_config", {}).get("model_type", ""))
        if model_type.endswith("_moe") or "num_experts" in cfg or "num_local_experts" in cfg:
            raise SizingError(f"{name or model_type}: mixture-of-experts models are not sized here")
        if model_type not in _MODEL_TYPES:
            raise SizingError(
                f"{name or 'model'}: model_type {model_type!r} is not one this estimator knows "
                f"({', '.join(_MODEL_TYPES)}); its layer layout may differ"
            )
        return ModelShape.from_config(config, name)
    except SizingError:
        raise
    except ValueError as exc:
        raise SizingError(str(exc)) from None


# --------------------------------------------------------------------------- modes


@dataclass(frozen=True)
class Mode:
    """A weight storage format. ``kind``: float, fp8, weight_only, gptq, awq, smoothquant."""

    name: str
    label: str
    kind: str
    weight_bits: int
    group_size: int | None = None
    calibrates: bool = False
    min_capability: tuple[int, int] = (0, 0)

    def linear_bytes(self, k: int, n: int) -> int:
        """Bytes of one ``k``-input, ``n``-output linear layer in the engine: 16-bit ``2kn``;
        fp8 ``kn`` + two fp32 scales; int8/int4 weight-only ``kn·bits/8 + 2n``; GPTQ int4 group
        ``g`` ``kn/2 + 4n·k/g``; AWQ ``kn/2 + 2n·k/g + 2k``; SmoothQuant ``kn + 4n + 4k``."""
        packed, groups = k * n * self.weight_bits // 8, math.ceil(k / (self.group_size or k))
        return {
            "float": 2 * k * n,
            "fp8": k * n + 8,
            "weight_only": packed + 2 * n,
            "gptq": packed + groups * n * 4,
            "awq": packed + groups * n * 2 + 2 * k,
            "smoothquant": packed + 4 * n + 4 * k,
        }[self.kind]

    def checkpoint_linear_bytes(self, k: int, n: int) -> int:
        """The same layer in a Hugging Face GPTQ/AWQ checkpoint (packed int32 qweight and
        qzeros, fp16 scales, GPTQ's int32 g_idx)."""
        if self.kind not in ("gptq", "awq"):
            return self.linear_bytes(k, n)
        groups = math.ceil(k / (self.group_size or k))
        return k * n // 2 + groups * n // 2 + groups * n * 2 + (4 * k if self.kind == "gptq" else 0)

    def with_group_size(self, group_size: int | None) -> Mode:
        """The same mode with another group size (GPTQ/AWQ only)."""
        if group_size is None or group_size == self.group_size:
            return self
        if self.kind not in ("gptq", "awq"):
            raise SizingError(f"{self.name} has no group size; only int4_gptq / int4_awq do")
        if group_size <= 0:
            raise SizingError(f"group_size must be positive, got {group_size}")
        label = f"INT4 {self.kind.upper()} g{group_size}"
        return dataclasses.replace(self, group_size=group_size, label=label)


_MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("bf16", "BF16", "float", 16, min_capability=(8, 0)),
        Mode("fp16", "FP16", "float", 16),
        Mode("fp8", "FP8", "fp8", 8, calibrates=True, min_capability=(8, 9)),
        Mode("int8_sq", "INT8 SmoothQuant", "smoothquant", 8, calibrates=True),
        Mode("int8_wo", "INT8 weight-only", "weight_only", 8),
        Mode("int4_wo", "INT4 weight-only", "weight_only", 4),
        Mode("int4_gptq", "INT4 GPTQ g128", "gptq", 4, group_size=128),
        Mode("int4_awq", "INT4 AWQ g128", "awq", 4, group_size=128, calibrates=True),
    )
}


def get_mode(mode: str | Mode, group_size: int | None = None) -> Mode:
    """A :class:`Mode` by name (``"int4_gptq"``), optionally with another group size."""
    if isinstance(mode, Mode):
        return mode.with_group_size(group_size)
    found = _MODES.get(str(mode).lower().replace("-", "_"))
    if found is None:
        close = difflib.get_close_matches(str(mode), _MODES, n=2)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise SizingError(f"unknown mode {mode!r}; choose from {', '.join(_MODES)}.{hint}")
    return found.with_group_size(group_size)


def _mode_for(shape: ModelShape, mode: str | Mode | None, group_size: int | None) -> Mode:
    return (
        _mode_of(shape).with_group_size(group_size) if mode is None else get_mode(mode, group_size)
    )


def _mode_of(shape: ModelShape) -> Mode:
    """The mode a checkpoint is stored in: its ``quantization_config`` if any (GPTQ/AWQ 4-bit
    with their group size, fp8), else its dtype (bf16, or fp16 for fp16/fp32)."""
    q = shape.quantization
    if not q:
        return _MODES["bf16" if shape.dtype == "bfloat16" else "fp16"]
    method, bits = str(q.get("quant_method", "")).lower(), q.get("bits", 4)
    if method in ("gptq", "awq") and bits == 4:
        group = int(q.get("group_size") or 128)
        return _MODES[f"int4_{method}"].with_group_size(group if group > 0 else None)
    if method == "fp8":
        return _MODES["fp8"]
    raise SizingError(
        f"{shape.name}: quantization_config {method or '?'} {bits}-bit is not a mode here; "
        f"size it with an explicit mode ({', '.join(_MODES)})"
    )


# --------------------------------------------------------------------------- checks


def _kv_heads_per_gpu(shape: ModelShape, tp: int) -> int:
    if shape.num_kv_heads % tp == 0:
        return shape.num_kv_heads // tp
    if tp % shape.num_kv_heads == 0:
        return 1  # KV heads replicated: each GPU holds one
    raise SizingError(
        f"{shape.name}: {shape.num_kv_heads} KV heads cannot be split over tp={tp} GPUs; "
        "use a tp that divides the KV heads or that they divide"
    )


def _check_tp(shape: ModelShape, tp: int) -> None:
    if not isinstance(tp, int) or tp < 1:
        raise SizingError(f"tp must be a positive whole number, got {tp!r}")
    for what, count in (
        ("attention heads", shape.num_heads),
        ("MLP width", shape.intermediate_size),
    ):
        if count % tp:
            raise SizingError(
                f"{shape.name}: {what} ({count}) do not split evenly over tp={tp} GPUs; "
                "pick a tp that divides them (1, 2, 4, 8 usually)"
            )
    _kv_heads_per_gpu(shape, tp)


def _problems(
    shape: ModelShape, mode: Mode, gpu: GpuSpec, *, tp: int, kv_dtype: str, backend: str
) -> list[str]:
    """Why ``mode`` cannot run here, one message per reason (empty: it can): TensorRT-LLM 1.x
    needs Ampere (8.0) or newer; bf16 needs 8.0, fp8 (weights or KV) 8.9; GPTQ/AWQ group size
    64 or 128 dividing every layer's per-GPU input width, no GPTQ act-order; the backend's
    formats."""
    out: list[str] = []
    cc = "{}.{}".format(*gpu.capability)
    if gpu.capability < _MIN_CAPABILITY:
        out.append(
            f"{gpu.name} (compute capability {cc}, {gpu.arch or 'pre-Ampere'}) is not supported by "
            "TensorRT-LLM 1.x, which needs Ampere (8.0) or newer; Volta support ended with "
            "TensorRT 10.5. Serve it with vLLM (notebook 05) or transformers instead"
        )
    if gpu.capability < mode.min_capability:
        fix = "use fp16" if mode.name == "bf16" else "use int8_wo / int4_gptq / bf16"
        need = "{}.{}".format(*mode.min_capability)
        out.append(f"{mode.label} needs compute capability >= {need}; {gpu.name} has {cc}: {fix}")
    if kv_dtype == "fp8" and not gpu.supports_fp8:
        out.append(f"an fp8 KV cache needs compute capability >= 8.9; {gpu.name} has {cc}")
    if kv_dtype == "bf16" and not gpu.supports_bf16:
        out.append(f"a bf16 KV cache needs compute capability >= 8.0; {gpu.name} has {cc}")
    if backend == "pytorch" and mode.name not in _PYTORCH_MODES:
        out.append(
            f"{mode.label} is not served by TensorRT-LLM 1.2's PyTorch backend in this course "
            "(Hugging Face GPTQ checkpoints load only through the engine path): use "
            "backend='engine' (convert_checkpoint.py + trtllm-build)"
        )
    if mode.kind not in ("gptq", "awq"):
        return out
    g = mode.group_size
    if g not in _GROUPWISE:
        return out + [
            f"{mode.label}: TensorRT-LLM's groupwise int4 kernels support group sizes 64 and 128 "
            f"only, not {g}; re-quantize with group_size=128"
        ]
    if mode.kind == "gptq" and (shape.quantization or {}).get("desc_act"):
        out.append(
            "this GPTQ checkpoint uses act-order (desc_act=true), which convert_checkpoint.py "
            "rejects ('GPTQ with desc_act=True is not implemented'); use a desc_act=false one"
        )
    for layer, k, _, split in shape.linear_layers():
        k_gpu = k // tp if split == "row" else k
        if k_gpu % g:
            return out + [
                f"{layer}: {k_gpu} inputs per GPU (tp={tp}) is not a multiple of group size {g}; "
                "use another tp, or a checkpoint padded for it (Qwen pads some GPTQ models)"
            ]
    return out


# --------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class Estimate:
    """Memory for one model, mode and workload (:func:`estimate`). Byte counts are per GPU
    unless the name says ``total``; ``as_row()`` gives GiB. ``source_checkpoint_bytes``: the
    checkpoint you start from (a GPTQ checkpoint for int4_gptq, else 16-bit);
    ``build_disk_bytes`` / ``build_cpu_bytes``: the build's disk and host-RAM peak;
    ``build_gpu_bytes``: the larger of running at this workload and calibrating."""

    model: str
    mode: str
    mode_label: str
    params: int
    tp: int
    batch: int
    context: int
    kv_dtype: str
    max_num_tokens: int
    backend: str
    weight_bytes: int
    weight_bytes_total: int
    kv_bytes_per_token: int
    kv_bytes: int
    activation_bytes: int
    reserve_bytes: int
    source_checkpoint_bytes: int
    build_disk_bytes: int
    build_cpu_bytes: int
    build_gpu_bytes: int
    calibrates: bool

    @property
    def gpu_bytes(self) -> int:
        """Per-GPU total at run time: weights + KV + activations + reserve."""
        return self.fixed_bytes + self.kv_bytes

    @property
    def fixed_bytes(self) -> int:
        """Per-GPU memory that does not grow with batch × context."""
        return self.weight_bytes + self.activation_bytes + self.reserve_bytes

    def as_row(self) -> dict[str, Any]:
        """A flat dict in GiB (show with ``pandas.DataFrame([...])``)."""

        def gib(x: int) -> float:
            return round(x / GIB, 2)

        return {
            "model": self.model, "mode": self.mode, "label": self.mode_label, "tp": self.tp,
            "batch": self.batch, "context": self.context, "kv_dtype": self.kv_dtype,
            "weights_gib": gib(self.weight_bytes), "kv_gib": gib(self.kv_bytes),
            "activations_gib": gib(self.activation_bytes), "reserve_gib": gib(self.reserve_bytes),
            "gpu_total_gib": gib(self.gpu_bytes),
            "kv_kib_per_token": round(self.kv_bytes_per_token / 1024, 1),
            "build_cpu_gib": gib(self.build_cpu_bytes),
            "build_disk_gib": gib(self.build_disk_bytes),
            "build_gpu_gib": gib(self.build_gpu_bytes),
        }  # fmt: skip


def weight_bytes(shape: ModelShape, mode: Mode, *, tp: int = 1, layout: str = "engine") -> int:
    """Per-GPU weight bytes in ``mode`` (``layout="checkpoint"``: a Hugging Face GPTQ/AWQ
    checkpoint's own packing, for download and disk sizes)."""
    sizer = mode.linear_bytes if layout == "engine" else mode.checkpoint_linear_bytes
    layers = shape.linear_layers()
    per_layer = sum(sizer(k // tp, n) if s == "row" else sizer(k, n // tp) for _, k, n, s in layers)
    embedding = 2 * shape.vocab_size * shape.hidden_size
    lm_head = 0 if shape.tie_word_embeddings and tp == 1 else embedding // tp
    small = 2 * (shape.bias_params // tp) + 2 * shape.norm_params
    return shape.num_layers * per_layer + small + embedding + lm_head


def kv_bytes_per_token(shape: ModelShape, kv_dtype: str = "auto", *, tp: int = 1) -> int:
    """Per-GPU KV-cache bytes for one token: 2 × layers × KV heads × head size × bytes."""
    if kv_dtype not in _KV_DTYPES:
        raise SizingError(f"kv_dtype must be one of {', '.join(_KV_DTYPES)}, got {kv_dtype!r}")
    per_value = _KV_DTYPES[kv_dtype] or 2
    return 2 * shape.num_layers * _kv_heads_per_gpu(shape, tp) * shape.head_dim * per_value


def _kv_tokens(context: int) -> int:
    """Tokens a sequence occupies in a paged KV cache: rounded up to whole blocks."""
    return math.ceil(context / _BLOCK) * _BLOCK


def estimate(config: Any, mode: str | Mode | None = None, *, group_size: int | None = None,
             batch: int = 1, context: int | None = None, tp: int = 1, kv_dtype: str = "auto",
             max_num_tokens: int | None = None, backend: str = "engine",
             name: str | None = None) -> Estimate:  # fmt: skip
    """Size ``config`` (dict, path, transformers config or shipped name) in ``mode`` (default:
    the checkpoint's own) for ``batch`` sequences of ``context`` tokens each (prompt + output;
    default ``min(4096, model max)``) over ``tp`` GPUs. ``max_num_tokens`` (default
    ``min(8192, batch × context)``) is trtllm-build's flag of that name."""
    shape = shape_of(config, name)
    m = _mode_for(shape, mode, group_size)
    if backend not in _BACKENDS:
        raise SizingError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_tp(shape, tp)
    context = min(_CONTEXT, shape.max_context) if context is None else context
    for what, value in (("batch", batch), ("context", context)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SizingError(f"{what} must be a positive whole number, got {value!r}")
    if context > shape.max_context:
        raise SizingError(
            f"{shape.name}: context {context} is longer than the model's {shape.max_context} "
            "tokens (max_position_embeddings / seq_length); ask for less"
        )
    max_num_tokens = max_num_tokens or min(_MAX_NUM_TOKENS, batch * context)
    per_token, weights = kv_bytes_per_token(shape, kv_dtype, tp=tp), weight_bytes(shape, m, tp=tp)
    # Build-time activations: max_num_tokens x 16-bit x (4 hidden + q/k/v + 3 MLP widths per
    # GPU), plus fp32 logits for the batch.
    widths = 4 * shape.hidden_size + (shape.q_width + 2 * shape.kv_width) // tp
    widths += 3 * shape.intermediate_size // tp
    activations = max_num_tokens * 2 * widths + batch * shape.vocab_size * 4
    kv = batch * _kv_tokens(context) * per_token
    calibrates = m.calibrates or kv_dtype in ("int8", "fp8")
    sixteen_bit = weight_bytes(shape, _MODES["fp16"])
    source = weight_bytes(shape, m, layout="checkpoint") if m.kind == "gptq" else sixteen_bit
    if backend == "pytorch":  # quantize.py --export_format hf writes the quantized model
        disk = source + (0 if m.kind == "float" else weights * tp)
        cpu = source + _BUILD_OVERHEAD
    else:
        disk = source + 2 * weights * tp
        cpu = max(source + weights, 3 * weights) + _BUILD_OVERHEAD
        cpu = max(cpu, sixteen_bit + _BUILD_OVERHEAD) if calibrates else cpu
    calib_gpu = weight_bytes(shape, _MODES["fp16"], tp=tp) + activations + _RESERVE
    build_gpu = max(weights + kv + activations + _RESERVE, calib_gpu if calibrates else 0)
    return Estimate(
        shape.name, m.name, m.label, shape.params, tp, batch, context, kv_dtype, max_num_tokens,
        backend, weights, weights * tp, per_token, kv, activations, _RESERVE, source, disk, cpu,
        build_gpu, calibrates,
    )  # fmt: skip


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Verdict:
    """Whether an :class:`Estimate` fits a GPU, and the largest workload that does:
    ``max_batch`` sequences of ``estimate.context`` tokens, or ``max_context`` (capped by the
    model) at ``estimate.batch``; ``decode_tokens_per_s_bound``: one stream's memory-bandwidth
    upper bound (``labhelpers.roofline``) at the full context."""

    gpu: GpuSpec
    estimate: Estimate
    fits: bool
    kv_budget_bytes: int
    kv_capacity_tokens: int
    max_batch: int
    max_context: int
    decode_tokens_per_s_bound: float | None
    summary: str

    def as_row(self) -> dict[str, Any]:
        """The estimate's row plus the verdict columns (GiB)."""
        bound = self.decode_tokens_per_s_bound
        return self.estimate.as_row() | {
            "gpu": self.gpu.name, "gpu_gib": round(self.gpu.memory_gib, 2), "fits": self.fits,
            "kv_budget_gib": round(self.kv_budget_bytes / GIB, 2),
            "kv_capacity_tokens": self.kv_capacity_tokens, "max_batch": self.max_batch,
            "max_context": self.max_context,
            "decode_tok_s_bound": None if bound is None else round(bound, 1),
        }  # fmt: skip


def verdict(config: Any, gpu: str | GpuSpec, mode: str | Mode | None = None, *,
            kv_fraction: float = _KV_FRACTION, **workload: Any) -> Verdict:  # fmt: skip
    """Does ``config`` in ``mode`` fit ``tp`` × ``gpu`` for ``batch`` × ``context``? ``workload``:
    :func:`estimate`'s keywords. Raises :class:`SizingError` for the mode/GPU/backend rules and
    unknown GPUs, and when not even one sequence fits (then naming the tensor-parallel sizes,
    smaller modes, shorter contexts or KV types that would); else a :class:`Verdict`."""
    try:
        spec = gpu_spec(gpu)
    except ValueError as exc:
        raise SizingError(str(exc)) from None
    if not 0 < kv_fraction <= 1:
        raise SizingError(f"kv_fraction must be in (0, 1], got {kv_fraction}")
    shape = shape_of(config, workload.pop("name", None))
    m = _mode_for(shape, mode, workload.get("group_size"))
    est = estimate(shape, m, **workload)
    found = _problems(shape, m, spec, tp=est.tp, kv_dtype=est.kv_dtype, backend=est.backend)
    if found:
        raise SizingError(f"{shape.name} as {m.label} on {spec.name}: " + "; ".join(found))
    result = _fit(spec, est, shape, kv_fraction)
    if result.max_batch > 0:
        return result
    where = f"{est.tp} × {spec.name}" if est.tp > 1 else spec.name
    one_seq = _kv_tokens(est.context) * est.kv_bytes_per_token
    message = (
        f"{est.model} as {est.mode_label} does not fit {where} ({spec.memory_gib:.1f} GiB per GPU) "
        f"even at batch 1: weights {est.weight_bytes / GIB:.1f} + activations "
        f"{est.activation_bytes / GIB:.1f} + runtime {est.reserve_bytes / GIB:.1f} GiB, then "
        f"{one_seq / GIB:.2f} GiB of KV for one {est.context}-token sequence; the KV pool "
        f"would get {result.kv_budget_bytes / GIB:.2f} GiB."
    )
    if suggestions := _suggestions(shape, m, spec, est, kv_fraction):
        message += "\nWhat would fit:\n" + "\n".join(f"  - {s}" for s in suggestions)
    raise SizingError(message)


def _fit(spec: GpuSpec, est: Estimate, shape: ModelShape, kv_fraction: float) -> Verdict:
    budget = max(0, int(kv_fraction * (spec.memory_bytes - est.fixed_bytes)))
    capacity = budget // est.kv_bytes_per_token // _BLOCK * _BLOCK
    max_batch = capacity // _kv_tokens(est.context)
    max_context = min(shape.max_context, (capacity // est.batch) // _BLOCK * _BLOCK)
    fits = est.kv_bytes <= budget
    bound = None
    if spec.bandwidth_gbps:
        per_token = est.weight_bytes + est.kv_bytes_per_token * est.context
        bound = roofline_tokens_per_s(spec.bandwidth_gbps, per_token)
    where = f"{est.tp} × {spec.name}" if est.tp > 1 else spec.name
    if fits:
        summary = (
            f"{est.model} {est.mode_label} fits {where}: {est.gpu_bytes / GIB:.1f} of "
            f"{spec.memory_gib:.1f} GiB per GPU for batch {est.batch} × {est.context} tokens; "
            f"the KV pool holds {capacity} tokens (up to {max_batch} × {est.context}, "
            f"or {est.batch} × {max_context})"
        )
    else:
        summary = (
            f"{est.model} {est.mode_label} on {where}: batch {est.batch} × {est.context} needs "
            f"{est.kv_bytes / GIB:.1f} GiB of KV cache, the pool has {budget / GIB:.1f} GiB; "
            f"largest: {max_batch} × {est.context} or {est.batch} × {max_context}"
        )
    return Verdict(spec, est, fits, budget, capacity, max_batch, max_context, bound, summary)


def _suggestions(
    shape: ModelShape, mode: Mode, spec: GpuSpec, est: Estimate, kv_fraction: float
) -> list[str]:
    """What would fit one sequence: more GPUs, a smaller mode, a smaller KV type, less context."""
    out: list[str] = []

    def try_fit(m: Mode, tp: int, kv_dtype: str) -> Verdict | None:
        if _problems(shape, m, spec, tp=tp, kv_dtype=kv_dtype, backend=est.backend):
            return None
        try:
            e = estimate(
                shape, m, context=est.context, tp=tp, kv_dtype=kv_dtype, backend=est.backend
            )
        except SizingError:
            return None
        v = _fit(spec, e, shape, kv_fraction)
        return v if v.max_batch >= 1 else None

    for tp in (2, 4, 8):
        if tp > est.tp and (v := try_fit(mode, tp, est.kv_dtype)):
            out.append(
                f"tensor parallel over {tp} × {spec.name} (--tp_size {tp}): "
                f"{v.estimate.gpu_bytes / GIB:.1f} GiB per GPU at batch 1, up to {v.max_batch} "
                f"sequences of {est.context} tokens"
            )
            break
    current = weight_bytes(shape, mode)
    smaller = [m for m in _MODES.values() if weight_bytes(shape, m) < current]
    smaller.sort(key=lambda m: -weight_bytes(shape, m))
    for m in smaller:
        if v := try_fit(m, est.tp, est.kv_dtype):
            out.append(
                f"a smaller mode on the same GPU(s): {m.name} ({m.label}), "
                f"{v.estimate.weight_bytes / GIB:.1f} GiB of weights, up to {v.max_batch} "
                f"sequences of {est.context} tokens"
            )
            break
    if est.kv_dtype in ("auto", "fp16", "bf16"):
        kv = "fp8" if spec.supports_fp8 else "int8"
        if v := try_fit(mode, est.tp, kv):
            out.append(f"a {kv} KV cache (half the bytes per token): up to {v.max_batch} sequences")
    budget = kv_fraction * (spec.memory_bytes - est.fixed_bytes)
    tokens = int(budget // est.kv_bytes_per_token) // _BLOCK * _BLOCK
    if tokens >= _BLOCK:
        out.append(f"a shorter context: at most {min(tokens, shape.max_context)} tokens at batch 1")
    return out


# --------------------------------------------------------------------------- tables


def table(config: Any, *, gpu: str | GpuSpec | None = None,
          modes: Iterable[str | Mode] | None = None, kv_fraction: float = _KV_FRACTION,
          **workload: Any) -> list[dict[str, Any]]:  # fmt: skip
    """One row per mode (default: all): the estimate in GiB and, with a GPU, ``status``
    ("fits", "too big: ...", "unsupported: ...") and the largest batch / context. Never raises
    for a mode that cannot run; bad configs still raise. ``workload``: :func:`estimate`'s
    keywords (batch, context, tp, kv_dtype, backend)."""
    shape = shape_of(config, workload.pop("name", None))
    spec = None if gpu is None else gpu_spec(gpu)
    rows = []
    for mode in _MODES.values() if modes is None else modes:
        m = get_mode(mode)
        est = estimate(shape, m, **workload)
        row = est.as_row()
        if spec is not None:
            found = _problems(shape, m, spec, tp=est.tp, kv_dtype=est.kv_dtype, backend=est.backend)
            if found:
                row |= {"gpu": spec.name, "status": "unsupported: " + "; ".join(found)}
            else:
                v = _fit(spec, est, shape, kv_fraction)
                status = "fits" if v.fits else f"too big for batch {est.batch} × {est.context}"
                row |= v.as_row() | {
                    "status": status if v.max_batch else "does not fit even at batch 1"
                }
        rows.append(row)
    return rows
