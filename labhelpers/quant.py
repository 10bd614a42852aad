"""What quantization costs, and the checks to run before a GPTQ job.

- held-out evaluation text (the Python Language Reference shipped in the standard library),
  and a check that calibration text does not overlap it;
- perplexity with a sliding window, as in the Hugging Face perplexity guide;
- a plain round-to-nearest (RTN) group-wise baseline, on the same grid GPTQ uses, so the
  difference between the two is GPTQ's error compensation and nothing else;
- checks before a long quantization run: group size vs layer widths (with divisors to
  use instead), an output folder that exists, RAM;
- GPTQModel's working conditions on a CPU (worker pool, log folder) and the bf16 storage
  of the tensors GPTQ leaves unquantized.

Used by notebook 02_gptq_calibration and by the stand-in builder (labhelpers.standin).
Importing it is instant: torch is imported inside the functions.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from labhelpers.models import NotEnoughResourcesError, available_ram_gb

# Group sizes GPTQ kernels accept (-1 = one group per output row, i.e. per channel).
GPTQ_GROUP_SIZES = (16, 32, 64, 128, 256, 512, 1024)
# Held-out text for perplexity: two chapters of the Python Language Reference.
HELDOUT_TOPICS = ("execmodel", "import")
GB = 1024**3
# Peak RAM of a GPTQ run, measured with GPTQModel on the stand-in (notebook 02): about
# twice the weights in the calibration dtype (the model plus the layer being processed,
# its inputs/outputs for every sample, Hessians), plus the runtime.
QUANT_RAM_FACTOR = 2.0
QUANT_RAM_OVERHEAD_GB = 0.8
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1}


class GroupSizeError(ValueError):
    """A GPTQ/RTN group size that does not divide a layer's input width."""


# --------------------------------------------------------------------------- held-out text


def heldout_text(topics: Sequence[str] = HELDOUT_TOPICS) -> str:
    """English technical text for perplexity (notebook 02_gptq_calibration): chapters of
    the Python Language Reference that ship with Python (``pydoc_data.topics``), so the
    same text is available offline on every machine with the same Python version."""
    from pydoc_data.topics import topics as docs

    unknown = [t for t in topics if t not in docs]
    if unknown:
        raise KeyError(f"unknown pydoc topics {unknown}; known: {sorted(docs)[:10]}...")
    return "\n\n".join(docs[t].strip() for t in topics)


def _word_ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def ngram_overlap(texts: Iterable[str], reference: str, *, n: int = 8) -> float:
    """Fraction of ``reference``'s word ``n``-grams that also occur in ``texts``
    (notebook 02_gptq_calibration): 0.0 means the evaluation text was not seen during
    calibration. Eight words in a row rarely repeat by chance."""
    ref = _word_ngrams(reference, n)
    if not ref:
        raise ValueError(f"reference has fewer than {n} words")
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        seen |= _word_ngrams(text, n)
    return len(ref & seen) / len(ref)


# --------------------------------------------------------------------------- perplexity


def _logits(model: Any, input_ids: Any) -> Any:
    out = model(input_ids)
    return out if hasattr(out, "shape") else out.logits


def perplexity(
    model: Any,
    input_ids: Any,
    *,
    window: int = 512,
    stride: int = 256,
) -> float:
    """Perplexity of ``model`` on one long token sequence, with a sliding window
    (notebook 02_gptq_calibration).

    The text is cut into windows of ``window`` tokens that start every ``stride``
    tokens. Each token is scored once: in the first window that reaches it, with up to
    ``window - stride`` tokens of context before it (the Hugging Face perplexity guide's
    method); with ``stride == window`` the windows do not overlap and each window's first
    token is not scored. ``input_ids``: a 1-D or ``(1, n)`` tensor or list. ``model(ids)``
    may return logits or an object with ``.logits``. Returns ``exp(mean NLL per token)``.
    """
    import torch

    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1).tolist()
    device = next(iter(model.parameters()), torch.empty(0)).device

    def score(chunk: list[int]) -> list[float]:
        with torch.inference_mode():
            tokens = torch.tensor([chunk], device=device)
            logits = _logits(model, tokens)[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            return logprobs.gather(1, tokens[0, 1:, None])[:, 0].tolist()

    return perplexity_from_logprobs(score, ids, window=window, stride=stride)


def perplexity_from_logprobs(
    score: Callable[[list[int]], Sequence[float]],
    input_ids: Sequence[int],
    *,
    window: int = 512,
    stride: int = 256,
) -> float:
    """:func:`perplexity` for a model that only returns log-probabilities, such as an
    OpenAI-compatible server (vLLM's ``prompt_logprobs``; notebook 06_which_backend).

    ``score(chunk)`` gets a window of token ids and returns the log-probability of each
    token after the first (``len(chunk) - 1`` floats, natural log). The windows and the
    tokens scored are exactly those of :func:`perplexity`, so both give the same number for
    the same model and text."""
    ids = [int(i) for i in input_ids]
    n = len(ids)
    if n < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window; got stride={stride}, window={window}")
    nll_sum, counted, scored_up_to = 0.0, 0, 1  # token 0 has no context: never scored
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        chunk = ids[begin:end]
        logprobs = list(score(chunk))
        if len(logprobs) != len(chunk) - 1:
            raise ValueError(
                f"score() returned {len(logprobs)} log-probabilities for a window of "
                f"{len(chunk)} tokens; expected {len(chunk) - 1} (one per token after the first)"
            )
        # index (in logprobs) of the first token not scored yet; with stride == window the
        # window's first token has no context here and is skipped
        first = max(0, scored_up_to - begin - 1)
        nll_sum -= sum(logprobs[first:])
        counted += len(logprobs) - first
        scored_up_to = end
        if end == n:
            break
    return math.exp(nll_sum / counted)


# --------------------------------------------------------------------------- RTN


def check_group_size(in_features: int | Iterable[int], group_size: int) -> None:
    """Raise :class:`GroupSizeError` if ``group_size`` does not divide every input width,
    naming the widths and the group sizes that would work (notebook 02_gptq_calibration).
    ``-1`` (one group per row) always works."""
    widths = sorted({in_features} if isinstance(in_features, int) else set(in_features))
    if group_size == -1:
        return
    if group_size <= 0:
        raise GroupSizeError(f"group_size must be positive or -1; got {group_size}")
    bad = [w for w in widths if w % group_size]
    if bad:
        ok = suggest_group_sizes(widths)
        raise GroupSizeError(
            f"group_size={group_size} does not divide the input width of every layer: "
            f"{', '.join(map(str, bad))} % {group_size} != 0. Each group of {group_size} input "
            "channels shares one scale, so the width must be a whole number of groups. "
            f"Use one of {ok} (or -1: one scale per row)."
        )


def suggest_group_sizes(widths: Iterable[int]) -> list[int]:
    """The GPTQ group sizes (16 ... 1024) that divide every width (notebook 02)."""
    widths = list(widths)
    return [g for g in GPTQ_GROUP_SIZES if all(w % g == 0 for w in widths)]


def layer_widths(model_or_config: Any) -> dict[str, int]:
    """Input width of each kind of linear layer GPTQ quantizes (notebook 02).

    From a model (every ``nn.Linear`` except ``lm_head``) or from a config object or
    ``config.json`` dict of a Llama/Qwen-style decoder (attention input ``hidden_size``,
    attention output ``heads * head_dim``, MLP down projection ``intermediate_size``).
    """
    if hasattr(model_or_config, "named_modules"):
        import torch

        return {
            name: mod.in_features
            for name, mod in model_or_config.named_modules()
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head")
        }
    cfg = model_or_config
    get = cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d)
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    if hidden is None or heads is None or get("intermediate_size") is None:
        raise ValueError("config needs hidden_size, num_attention_heads and intermediate_size")
    head_dim = get("head_dim") or hidden // heads
    return {
        "q/k/v/gate/up_proj": int(hidden),
        "o_proj": int(heads * head_dim),
        "down_proj": int(get("intermediate_size")),
    }


def group_scales(weight: Any, *, bits: int = 4, group_size: int = 64) -> Any:
    """Symmetric scale of each group of ``group_size`` input channels, shape
    ``(out, in // group_size)``: ``2 * max|w| / (2**bits - 1)``, GPTQ's symmetric grid
    (integer codes 0 ... 2**bits-1 around a zero point of 2**(bits-1))."""
    import torch

    out_f, in_f = weight.shape
    if group_size == -1:
        group_size = in_f
    check_group_size(in_f, group_size)
    amax = weight.detach().float().reshape(out_f, in_f // group_size, group_size).abs().amax(-1)
    scale = 2 * amax / (2**bits - 1)
    return torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group


def fake_quantize(weight: Any, scale: Any, *, bits: int = 4) -> Any:
    """Round ``weight`` to the grid ``scale * (q - 2**(bits-1))``, ``q`` in 0 ... 2**bits-1,
    and return the dequantized tensor (same shape and dtype). ``scale``: one per group,
    shape ``(out, groups)``."""
    import torch

    out_f, in_f = weight.shape
    groups = scale.shape[1]
    w = weight.detach().float().reshape(out_f, groups, in_f // groups)
    s = scale.float().unsqueeze(-1)
    zero = 2 ** (bits - 1)
    q = torch.clamp(torch.round(w / s) + zero, 0, 2**bits - 1)
    return ((q - zero) * s).reshape(out_f, in_f).to(weight.dtype)


def rtn_fake_quantize(weight: Any, *, bits: int = 4, group_size: int = 64) -> Any:
    """Round-to-nearest, group-wise, symmetric: what each weight becomes after int
    quantization and dequantization, with no error compensation (notebook 02). The
    round-trip error is at most half a step (``scale / 2``) in every group."""
    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8; got {bits}")
    return fake_quantize(weight, group_scales(weight, bits=bits, group_size=group_size), bits=bits)


def rtn_quantize_(
    model: Any, *, bits: int = 4, group_size: int = 64, skip: Sequence[str] = ("lm_head",)
) -> int:
    """Replace, in place, the weight of every ``nn.Linear`` (except names ending in
    ``skip``) by its RTN round trip (notebook 02_gptq_calibration). Checks the group size
    against every layer first, so a bad size fails before anything changes. Returns the
    number of layers quantized. Quantize a copy (``copy.deepcopy``) to keep the original."""
    import torch

    linears = [
        mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and not name.endswith(tuple(skip))
    ]
    if group_size != -1:
        check_group_size([m.in_features for m in linears], group_size)
    with torch.no_grad():
        for mod in linears:
            mod.weight.copy_(rtn_fake_quantize(mod.weight, bits=bits, group_size=group_size))
    return len(linears)


# --------------------------------------------------------------------------- before a run


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Refuse an output folder that already exists unless ``overwrite`` (notebook 02).

    Call it before a long quantization run, so the refusal comes first, not after minutes
    of work. Write the result with :func:`labhelpers.atomic.atomic_dir`, which replaces
    the old folder only once the new one is complete.
    """
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists. Set OVERWRITE = True in the parameters cell to replace "
            "it (the old folder stays until the new one is complete), or choose another OUTPUT."
        )
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder; choose another OUTPUT.")
    return path


def count_parameters(model_dir: str | os.PathLike[str]) -> int:
    """Number of weights in a model folder's safetensors files, read from their headers
    without loading anything (notebook 02). Packed int tensors count as stored."""
    total = 0
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors files")
    for file in files:
        with file.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        for name, meta in header.items():
            if name != "__metadata__":
                total += math.prod(meta["shape"])
    return total


def estimate_quantization_ram_gb(
    model_dir: str | os.PathLike[str], *, dtype: str = "float32"
) -> float:
    """Rough peak RAM of a GPTQModel run on the CPU (notebook 02): weights in the
    calibration ``dtype`` x 2, plus 0.8 GB. On a GPU the model still loads into RAM
    first; the GPU then needs roughly one layer plus the calibration activations."""
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}")
    weights = count_parameters(model_dir) * _DTYPE_BYTES[dtype] / GB
    return weights * QUANT_RAM_FACTOR + QUANT_RAM_OVERHEAD_GB


def check_quantization_fits(
    model_dir: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    available_gb: float | None = None,
) -> float:
    """Raise :class:`labhelpers.models.NotEnoughResourcesError` before loading when the
    estimate of :func:`estimate_quantization_ram_gb` exceeds the available RAM
    (notebook 02). Returns the estimate in GB."""
    need = estimate_quantization_ram_gb(model_dir, dtype=dtype)
    have = available_ram_gb() if available_gb is None else available_gb
    if need > have:
        half = estimate_quantization_ram_gb(model_dir, dtype="bfloat16")
        hint = (
            f" Calibrating in bfloat16 needs about {half:.1f} GB."
            if dtype == "float32" and half <= have
            else ""
        )
        raise NotEnoughResourcesError(
            f"Quantizing {model_dir} in {dtype} needs about {need:.1f} GB of RAM, but only "
            f"{have:.1f} GB is available.{hint} Close other kernels, or quantize a smaller model "
            "(Qwen2.5-0.5B/1.5B-Instruct), or run this notebook on a machine with more memory."
        )
    return need


# --------------------------------------------------------------------------- GPTQModel


def packed_size_bytes(model: Any, *, bits: int = 4, group_size: int = 64) -> int:
    """Bytes a GPTQ checkpoint of ``model`` holds, computed from its shapes (notebook 02):
    each quantized ``nn.Linear`` stores ``bits`` per weight (``qweight``), an fp16 scale
    and a packed zero point per group and output row (``scales``, ``qzeros``) and an int32
    group index per input channel (``g_idx``); every other tensor (embeddings, norms,
    biases) in bf16. Tied tensors count once."""
    import torch

    quantized, seen, total = set(), set(), 0
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
            out_f, in_f = mod.weight.shape
            groups = in_f // (in_f if group_size == -1 else group_size)
            total += out_f * in_f * bits // 8 + groups * out_f * 2 + groups * out_f * bits // 8
            total += in_f * 4
            quantized.add(id(mod.weight))
    for param in list(model.parameters()) + list(model.buffers()):
        if id(param) in quantized or param.data_ptr() in seen:
            continue
        if param.dtype.is_floating_point and param.ndim >= 1 and param.numel() > 1:
            seen.add(param.data_ptr())
            total += param.numel() * 2
    return total


def prepare_gptqmodel_cpu() -> None:
    """Set ``GPTQMODEL_CPU_WORKERS`` before ``import gptqmodel`` (notebook 02, stand-in
    builder): GPTQModel sizes its CPU worker pool at import, and on a 2-core machine its
    default asks for more workers than the pool has and quantization fails."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))


@contextmanager
def logs_in(folder: str | os.PathLike[str]) -> Iterator[Path]:
    """Run a block with ``folder`` as the working directory (notebook 02, stand-in
    builder): GPTQModel writes per-layer logs under ``./logs``; keep them out of the
    notebook's folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        yield folder
    finally:
        os.chdir(cwd)


def store_unquantized_as_bf16(folder: str | os.PathLike[str]) -> None:
    """Cast a saved checkpoint's float32 tensors (embeddings, norms) to bfloat16 in place
    (notebook 02, stand-in builder).

    Calibrating in float32 gives better results on a CPU, but then the tensors GPTQ leaves
    unquantized are saved in float32. Stored in bfloat16, transformers (``dtype="auto"``)
    and vLLM load the checkpoint in bf16, the dtype their CPU int4 kernels use.
    """
    import torch
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(file))
        cast = {
            k: v.to(torch.bfloat16) if v.dtype == torch.float32 else v for k, v in tensors.items()
        }
        total += sum(v.numel() * v.element_size() for v in cast.values())
        save_file(cast, str(file), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index records the total tensor bytes
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2) + "\n")
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = "bfloat16"
    config_file.write_text(json.dumps(config, indent=2) + "\n")
