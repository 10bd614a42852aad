"""GPTQ on the bench (notebook 02, tools/standin.py): calibration conversations rendered with the
model's own chat template (as the Qwen docs do) and kept apart from the evaluation text; the
checks before a long run; a round-to-nearest baseline on GPTQ's grid, so the gap to GPTQ is its
error compensation alone; GPTQModel's working conditions on a CPU. The quantization itself stays
in the notebook (``QuantizeConfig`` -> ``GPTQModel.load`` -> ``quantize`` -> ``save``).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from labhelpers.files import GB, cache_dir, quiet_output
from labhelpers.machine import check_ram
from labhelpers.models import ModelShape, count_parameters

_ROLES = {"system", "user", "assistant"}
_Conversation = list[dict[str, str]]


# --------------------------------------------------------------------------- calibration data


def load_conversations(path: str | os.PathLike[str] | None = None) -> list[_Conversation]:
    """Conversations from a JSONL file, one ``{"messages": [{"role": ..., "content": ...}, ...]}``
    (or a bare list of messages) per line; None: the course's 64 built-in ones (Chinese and
    English, varied topics)."""
    if path is None:
        path = Path(__file__).resolve().parent / "data" / "calibration_chats.jsonl"
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"Calibration file {path} does not exist. Give a JSONL file with one conversation "
            'per line, e.g. {"messages": [{"role": "user", "content": "..."}, '
            '{"role": "assistant", "content": "..."}]}'
        )
    return _parse_jsonl(path.read_text(encoding="utf-8").splitlines(), str(path))


def _parse_jsonl(lines: Iterable[str], source: str) -> list[_Conversation]:
    conversations = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{source}, line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not valid JSON ({exc})") from exc
        messages = item.get("messages") if isinstance(item, dict) else item
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: expected a non-empty list of messages")
        for msg in messages:
            ok = isinstance(msg, dict) and msg.get("role") in _ROLES
            if not ok or not isinstance(msg.get("content"), str):
                raise ValueError(
                    f"{where}: each message needs a role in {sorted(_ROLES)} and a content "
                    f"string; got {msg!r}"
                )
        conversations.append(messages)
    if not conversations:
        raise ValueError(f"{source} holds no conversations.")
    return conversations


def python_doc_conversations(
    n: int, *, avoid: str | None = None, chars: int = 2000
) -> list[_Conversation]:
    """Up to ``n`` English technical conversations from the Python Language Reference
    (``pydoc_data.topics``): a question about a section, a chunk of its text as the answer (at
    most 3 chunks per section, shuffled with a fixed seed). Sections sharing any 8-word
    sequence with ``avoid`` (the evaluation text) are left out."""
    from pydoc_data.topics import topics

    convs = []
    for name in sorted(topics):
        text = topics[name].strip()
        if avoid is not None and ngram_overlap([text], avoid) > 0:
            continue
        question = f"Explain this part of the Python reference: {name}."
        for start in range(0, min(len(text), 3 * chars), chars):
            answer = {"role": "assistant", "content": text[start : start + chars]}
            convs.append([{"role": "user", "content": question}, answer])
    random.Random(0).shuffle(convs)
    return convs[:n]


def build_calibration_set(tokenizer: Any, conversations: Sequence[_Conversation], *,
                          max_length: int = 512,
                          min_tokens: int = 8) -> list[dict[str, list[int]]]:  # fmt: skip
    """Render each conversation with ``apply_chat_template(..., tokenize=False)``, tokenize with
    truncation to ``max_length`` and return GPTQ examples ``{"input_ids", "attention_mask"}``;
    conversations shorter than ``min_tokens`` are dropped."""
    examples = []
    for conv in conversations:
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= min_tokens:
            examples.append({"input_ids": list(ids), "attention_mask": [1] * len(ids)})
    if not examples:
        raise ValueError(
            f"All {len(conversations)} calibration conversations are shorter than {min_tokens} "
            "tokens after templating. GPTQ needs real text: use longer conversations, e.g. "
            "gptq.load_conversations()."
        )
    return examples


def ngram_overlap(texts: Iterable[str], reference: str, *, n: int = 8) -> float:
    """Share of ``reference``'s word ``n``-grams that occur in ``texts``: 0.0 means the
    evaluation text was not seen in calibration (8 words in a row rarely repeat by chance)."""

    def grams(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"\w+", text.lower())
        return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}

    ref = grams(reference)
    if not ref:
        raise ValueError(f"reference has fewer than {n} words")
    return len(ref & set().union(*(grams(t) for t in texts))) / len(ref)


# --------------------------------------------------------------------------- before a run


def layer_widths(model_or_config: Any) -> dict[str, int]:
    """Input width of each kind of linear layer GPTQ quantizes, from a loaded model (every
    ``nn.Linear`` but ``lm_head``) or from a config (dict, object or folder)."""
    if hasattr(model_or_config, "named_modules"):
        return {name: m.in_features for name, m in _linears(model_or_config)}
    return {name: k for name, k, _, _ in ModelShape.from_config(model_or_config).linear_layers()}


def check_group_size(widths: int | Iterable[int], group_size: int) -> list[int]:
    """The GPTQ group sizes that divide every input width (each group of input channels shares
    one scale); ValueError naming them when ``group_size`` (-1: one group per row) is not one."""
    widths = sorted({widths} if isinstance(widths, int) else set(widths))
    working = [g for g in (16, 32, 64, 128, 256, 512, 1024) if all(w % g == 0 for w in widths)]
    bad = [w for w in widths if group_size != -1 and (group_size <= 0 or w % group_size)]
    if bad:
        raise ValueError(
            f"group_size={group_size} does not divide the input width of every layer: "
            f"{', '.join(map(str, bad))} % {group_size} != 0. The width must be a whole number "
            f"of groups. Use one of {working} (or -1: one scale per row)."
        )
    return working


def check_output_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Refuse an existing output folder unless ``overwrite``, before minutes of work. Write the
    result with ``files.atomic_dir``: the old folder stays until the new one is complete."""
    path = Path(path).expanduser()
    if path.exists() and (not overwrite or not path.is_dir()):
        raise FileExistsError(
            f"{path} already exists. Set OVERWRITE = True in the parameters cell to replace it "
            "(the old folder stays until the new one is complete), or choose another OUTPUT."
        )
    return path


def check_quantization_fits(
    model_dir: str | os.PathLike[str], *, dtype: str = "float32", **kwargs: Any
) -> float:
    """Raise ``NotEnoughResourcesError`` before loading when a GPTQModel run on the CPU will not
    fit: about twice the weights in the calibration ``dtype`` (the model, the layer being
    processed, its inputs for every sample, Hessians) + 0.8 GB, measured on the stand-in.
    Returns the estimate in GB. On a GPU the model still loads into RAM first."""
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2}
    if dtype not in sizes:
        raise ValueError(f"dtype must be one of {sorted(sizes)}")
    weights_gb = count_parameters(model_dir) / GB
    hint = "Close other kernels, quantize a smaller model, or use a machine with more memory."
    if dtype == "float32":
        hint = f"Calibrating in bfloat16 needs about {weights_gb * 4 + 0.8:.1f} GB. " + hint
    return check_ram(weights_gb * sizes[dtype] * 2 + 0.8, f"quantizing in {dtype}", hint, **kwargs)


# --------------------------------------------------------------------------- RTN


def _linears(model: Any) -> list[tuple[str, Any]]:
    import torch

    found = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return [(n, m) for n, m in found if not n.endswith("lm_head")]


def _rtn_fake_quantize(weight: Any, *, bits: int = 4, group_size: int = 64) -> Any:
    """Round-to-nearest, group-wise, symmetric, on GPTQ's grid (codes 0 ... 2**bits-1 around a
    zero point of 2**(bits-1); scale ``2 max|w| / (2**bits - 1)`` per group): what each weight
    becomes after quantization and dequantization. The error is at most half a step."""
    import torch

    if bits not in (2, 3, 4, 8):
        raise ValueError(f"bits must be 2, 3, 4 or 8; got {bits}")
    out_f, in_f = weight.shape
    group_size = in_f if group_size == -1 else group_size
    check_group_size(in_f, group_size)
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    scale = 2 * w.abs().amax(-1, keepdim=True) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group
    zero = 2 ** (bits - 1)
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return ((q - zero) * scale).reshape(out_f, in_f).to(weight.dtype)


def rtn_quantize_(model: Any, *, bits: int = 4, group_size: int = 64) -> int:
    """Replace, in place, the weight of every ``nn.Linear`` but ``lm_head`` by its RTN round
    trip; the group size is checked against every layer before anything changes. Returns the
    number of layers. Quantize a copy (``copy.deepcopy``) to keep the original."""
    import torch

    linears = [m for _, m in _linears(model)]
    check_group_size([m.in_features for m in linears], group_size)
    with torch.no_grad():
        for m in linears:
            m.weight.copy_(_rtn_fake_quantize(m.weight, bits=bits, group_size=group_size))
    return len(linears)


def packed_size_bytes(model: Any, *, bits: int = 4, group_size: int = 64) -> int:
    """Bytes of a GPTQ checkpoint of ``model``, from its shapes: per quantized ``nn.Linear``
    ``bits`` per weight (``qweight``), an fp16 scale and a packed zero point per group and
    output (``scales``, ``qzeros``), an int32 group index per input (``g_idx``); every other
    tensor in bf16; tied tensors once."""
    quantized, seen, total = set(), set(), 0
    for _, m in _linears(model):
        out_f, in_f = m.weight.shape
        groups = 1 if group_size == -1 else in_f // group_size
        total += out_f * in_f * bits // 8 + groups * out_f * (2 + bits / 8) + in_f * 4
        quantized.add(id(m.weight))
    for p in [*model.parameters(), *model.buffers()]:
        if id(p) in quantized or p.data_ptr() in seen:
            continue
        if p.dtype.is_floating_point and p.numel() > 1:
            seen.add(p.data_ptr())
            total += p.numel() * 2
    return int(total)


# --------------------------------------------------------------------------- GPTQModel


def prepare_gptqmodel(log_path: str | os.PathLike[str] | None = None) -> Path:
    """Get GPTQModel ready in this process, before ``from gptqmodel import ...``: its CPU worker
    pool is sized at import (on 2 cores the default asks for more workers than the pool has and
    quantization fails), and the import prints a banner, GIL and torchao warnings. Imports it
    once with all of that in ``log_path`` (returned) and silences its INFO lines."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    log_path = Path(log_path or cache_dir() / "logs" / "gptqmodel.log")
    warnings.filterwarnings("ignore", message=".*register_constant.*")
    with quiet_output(log_path, what="importing GPTQModel"):
        import gptqmodel  # noqa: F401
    for name in ("gptqmodel", "torchao", "logbar", "tokenicer"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # torchao's deprecation notes
    return log_path


@contextmanager
def logs_in(folder: str | os.PathLike[str], layers: int) -> Iterator[Callable[[], str]]:
    """Run a block in ``folder``, where GPTQModel writes per-layer logs (``./logs``); yields a
    heartbeat for ``files.quiet_output(status=...)``: "; layer k of <layers> done"."""
    folder, cwd = Path(folder), os.getcwd()
    folder.mkdir(parents=True, exist_ok=True)

    def progress() -> str:
        logs = sorted((folder / "logs").glob("gptq_log_*.log"), key=lambda p: p.stat().st_mtime)
        text = logs[-1].read_text(errors="replace") if logs else ""
        found = [int(n) for n in re.findall(r'"layer":\s*(\d+)', text)]
        return f"; layer {max(found) + 1} of {layers} done" if found else ""

    os.chdir(folder)
    try:
        yield progress
    finally:
        os.chdir(cwd)


def store_unquantized_as_bf16(folder: str | os.PathLike[str]) -> None:
    """Cast a saved checkpoint's float32 tensors (embeddings, norms) to bf16 in place:
    calibrating in float32 is better on a CPU, but transformers (``dtype="auto"``) and vLLM
    should load the checkpoint in bf16, the dtype their CPU int4 kernels use."""
    import torch
    from safetensors.torch import load_file, save_file

    folder, total = Path(folder), 0
    for file in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(file))
        for name, value in tensors.items():
            tensors[name] = value.to(torch.bfloat16) if value.dtype == torch.float32 else value
        total += sum(v.numel() * v.element_size() for v in tensors.values())
        save_file(tensors, str(file), metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index records the total bytes
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total
        index.write_text(json.dumps(data, indent=2) + "\n")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"dtype": "bfloat16"}, indent=2) + "\n")
