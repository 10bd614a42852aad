"""The decode roofline (notebooks 00, 01, 03, 05, 06): one decode step of one sequence reads
every weight it uses once plus the KV cache so far, so ``tokens/s <= bandwidth / bytes_per_token``.
:func:`bytes_per_token` counts what a step *streams*: the linear layers, norms and LM head, one
row of a separate input embedding, no rotary tables. Bandwidth is measured on the device that
decodes (:func:`memory_bandwidth_gbps`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labhelpers.files import GB
from labhelpers.machine import gpu_spec
from labhelpers.models import ModelShape, safetensors_tensors


@dataclass
class Bandwidth:
    """Sustained memory bandwidth in decimal GB/s on ``device``: ``read_gbps`` (summing an array
    much larger than the caches: what the roofline uses), ``copy_gbps`` (read + write bytes of
    a copy), the thread count, and for a GPU its datasheet peak."""

    read_gbps: float
    copy_gbps: float
    device: str
    threads: int | None
    size_mb: float
    datasheet_gbps: float | None = None


def memory_bandwidth_gbps(device: str = "cpu", *, size_mb: float | None = None, repeats: int = 5,
                          threads: int | None = None) -> Bandwidth:  # fmt: skip
    """Measure sustained memory bandwidth with torch: the best of ``repeats`` timed reads (a sum)
    and copies after a warm-up, as STREAM reports it (on a shared machine other work only ever
    makes a run slower, so the fastest run is the closest to what the memory can do).
    ``"cpu"``: host memory with ``threads`` torch threads (default: as set; compare decode speed
    at the same thread count). ``"cuda"``: the GPU's memory, with its datasheet peak beside it."""
    import torch

    cuda = device.startswith("cuda")
    n = int((size_mb or (2048 if cuda else 256)) * 2**20) // 4
    previous = torch.get_num_threads()
    if threads and not cuda:
        torch.set_num_threads(threads)
    try:
        src = torch.ones(n, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)

        def timed(fn: Any) -> float:
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return min(times)

        nbytes = n * 4
        read, copy = nbytes / timed(src.sum) / GB, 2 * nbytes / timed(lambda: dst.copy_(src)) / GB
        used = None if cuda else torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    datasheet = None
    if cuda:
        try:
            datasheet = gpu_spec(torch.cuda.get_device_name(0)).bandwidth_gbps
        except ValueError:  # a GPU the datasheet file does not know
            pass
        del src, dst
        torch.cuda.empty_cache()
    return Bandwidth(read, copy, device, used, nbytes / 2**20, datasheet)


def model_weight_bytes(model: Any) -> int:
    """Bytes held by a torch module's parameters and buffers (quantized layers keep their packed
    weights in buffers: GPTQ's ``qweight``/``scales``); shared tensors count once."""
    seen: dict[Any, int] = {}
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False) if t is not None]
    for tensor in tensors:
        ptr = tensor.data_ptr() if tensor.device.type != "meta" else 0
        key = (str(tensor.device), ptr) if ptr else ("id", id(tensor))
        seen[key] = max(seen.get(key, 0), tensor.numel() * tensor.element_size())
    return int(sum(seen.values()))


def _streamed_weight_bytes(model: Any) -> int:
    """A loaded model's weights less the rotary tables and, when the LM head does not share it,
    the input embedding table (a step reads one row of each)."""
    total, seen = model_weight_bytes(model), set()
    for name, module in model.named_modules():
        if name.endswith("rotary_emb"):
            for buf in module.buffers(recurse=False):
                if buf.data_ptr() not in seen:
                    seen.add(buf.data_ptr())
                    total -= buf.numel() * buf.element_size()
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and head is not None and emb.weight.data_ptr() != head.weight.data_ptr():
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def _checkpoint_streamed_bytes(model_dir: str | Path) -> int:
    """The same for a checkpoint loaded as stored (a server): its safetensors tensors, less the
    input embedding when a separate ``lm_head`` exists."""
    sizes = {name: nbytes for name, (_, _, nbytes) in safetensors_tensors(model_dir).items()}
    head = "lm_head.weight" in sizes
    return sum(sizes.values()) - (sizes.get("model.embed_tokens.weight", 0) if head else 0)


def bytes_per_token(weights: Any, config: Any = None, *, context_tokens: int = 0,
                    kv_bytes_per_elem: float | None = None) -> int:  # fmt: skip
    """Bytes one decode step of one sequence reads: the streamed weights plus the KV cache of
    ``context_tokens`` tokens, ``2 (K, V) x layers x KV heads x head size x bytes``.

    ``weights``: a loaded model (its config and dtype are used), a model folder (read as
    stored), or a byte count with ``config`` (a config dict, object or folder)."""
    if isinstance(weights, int):
        streamed, dtype_bytes = weights, 2
    elif isinstance(weights, (str, Path)):
        streamed, dtype_bytes, config = _checkpoint_streamed_bytes(weights), 2, config or weights
    else:
        streamed, config = _streamed_weight_bytes(weights), config or weights.config
        dtype_bytes = weights.dtype.itemsize
    if config is None:
        raise ValueError("give the model's config with a byte count")
    shape = ModelShape.from_config(config)
    per_elem = dtype_bytes if kv_bytes_per_elem is None else kv_bytes_per_elem
    kv = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * context_tokens * per_elem
    return int(streamed + kv)


def roofline_tokens_per_s(bandwidth_gbps: float, bytes_per_token: float) -> float:
    """The single-stream decode bound: ``bandwidth / bytes_per_token``. A batch reads the
    weights once per step for all its sequences, so its aggregate bound is higher."""
    if bytes_per_token <= 0:
        raise ValueError("bytes_per_token must be > 0")
    return bandwidth_gbps * GB / bytes_per_token


def percent_of_roofline(measured_tokens_per_s: float, roofline: float) -> float:
    """A measured decode rate as a percentage of its roofline."""
    if roofline <= 0:
        raise ValueError("the roofline must be > 0")
    return 100.0 * measured_tokens_per_s / roofline
