"""The course's models: a registry kept as data (``labhelpers/data/models.json``),
``resolve(name)`` -> a local folder, and what a folder holds (tensors from the safetensors
headers, the architecture from config.json as :class:`ModelShape`).

``resolve`` prints what it chose and why: a local path; a stand-in by name; a complete copy
in the course, ModelScope or Hugging Face cache; a download (ModelScope, then Hugging Face
honouring ``HF_ENDPOINT``; both resume); else the offline stand-in — on a CPU machine only,
unless ``QWEN_LAB_OFFLINE=1``. Used by every notebook; stand-ins are built by tools/standin.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import shutil
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from labhelpers.files import GB, dir_size_bytes, models_dir
from labhelpers.machine import NotEnoughResourcesError, check_ram, gpu_available

_DATA = Path(__file__).resolve().parent / "data"
_STANDIN_STAMP = "COURSE_BUILD.json"  # written into a finished stand-in by mark_standin
_STANDIN_RECIPE = 1  # bump when tools/standin.py changes: set-up rebuilds the stand-ins
_Log = Callable[[str], Any]


class ModelError(RuntimeError):
    """A model could not be made available, or its folder is incomplete. The message says
    what to do."""


@dataclass(frozen=True)
class ModelSpec:
    """One entry of ``labhelpers/data/models.json``."""

    name: str
    params_b: float
    weights: str
    size_gb: float
    target: str
    note: str = ""
    hf_id: str | None = None
    modelscope_id: str | None = None
    fallback: str | None = None
    builder: str | None = None

    @property
    def is_standin(self) -> bool:
        return self.builder is not None

    def memory_needed_gb(self) -> float:
        """Rough memory to load and run it: weights x 1.2 + 0.5 GB (the KV cache on top)."""
        return self.size_gb * 1.2 + 0.5


def registry() -> dict[str, ModelSpec]:
    """Every model the course knows, by name."""
    raw = json.loads((_DATA / "models.json").read_text(encoding="utf-8"))
    return {name: ModelSpec(name=name, **fields) for name, fields in raw.items() if name[0] != "_"}


def _lookup(name: str) -> ModelSpec | None:
    """A registry entry by course name or hub id (``Qwen/...``), case-insensitively."""
    lowered = name.lower()
    for spec in registry().values():
        if lowered in {i.lower() for i in (spec.name, spec.hf_id, spec.modelscope_id) if i}:
            return spec
    return None


# --------------------------------------------------------------------------- folders


def safetensors_tensors(model_dir: str | os.PathLike[str]) -> dict[str, tuple[str, tuple, int]]:
    """``name -> (dtype, shape, bytes)`` for every tensor of a folder's ``*.safetensors`` files,
    read from their headers (no weights are loaded)."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    tensors = {}
    for file in files:
        with safe_open(file, framework="numpy") as fh:
            for name in fh.keys():
                part = fh.get_slice(name)
                shape, dtype = tuple(part.get_shape()), part.get_dtype()
                bits = re.search(r"\d+", dtype)  # "BF16" -> 2 bytes; "BOOL" -> 1 byte
                size = max(1, int(bits[0]) // 8) if bits else 1
                tensors[name] = (dtype, shape, math.prod(shape) * size)
    return tensors


def count_parameters(model_dir: str | os.PathLike[str]) -> int:
    """Weights stored in a folder's safetensors files (packed int tensors count as stored)."""
    return sum(math.prod(shape) for _, shape, _ in safetensors_tensors(model_dir).values())


def validate_model_dir(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` holds a complete transformers model (config.json with a model_type;
    every weight file readable; every shard of an index present; a tokenizer) and return it
    resolved; else :class:`ModelError` saying what to do."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(
            f"{path} does not exist. Check the path, or pass a model name from "
            "labhelpers/data/models.json (e.g. 'standin')."
        )
    redo = (
        "It looks like an interrupted download or copy: resolve the model again (downloads "
        "resume) or delete the folder."
    )
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path} has no readable config.json ({exc}). {redo}") from exc
    if "model_type" not in config:
        raise ModelError(f"{path}/config.json has no 'model_type'. {redo}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelError(f"{path} lacks {len(missing)} of {len(shards)} shards. {redo}")
    files = sorted(path.glob("*.safetensors"))
    if not files and not any(path.glob("pytorch_model*.bin")):
        raise ModelError(f"{path} has no weight files (*.safetensors). {redo}")
    for file in files:
        try:
            with safe_open(file, framework="numpy"):
                pass
        except Exception as exc:  # SafetensorError: truncated, not a safetensors file
            raise ModelError(f"{file} is unreadable ({exc}). {redo}") from exc
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelError(f"{path} has no tokenizer files (tokenizer.json). {redo}")
    return path.resolve()


def check_fits_in_ram(
    model: str | os.PathLike[str] | ModelSpec, bytes_per_weight: float | None = None, **kwargs: Any
) -> float:
    """Raise ``NotEnoughResourcesError`` before loading ``model`` (a folder or registry entry)
    when its weights x 1.2 + 0.5 GB exceed the available RAM; the weights as stored, or
    ``count_parameters x bytes_per_weight`` when it loads at another precision (fp32: 4,
    notebook 03). Returns the estimate in GB."""
    if isinstance(model, ModelSpec):
        need, what = model.memory_needed_gb(), model.name
    elif bytes_per_weight:
        weights, bits = count_parameters(model) * bytes_per_weight, bytes_per_weight * 8
        need, what = weights / GB * 1.2 + 0.5, f"{Path(model).name} at {bits:.0f} bits"
    else:
        need, what = dir_size_bytes(model) / GB * 1.2 + 0.5, Path(model).name
    hint = (
        "Close other kernels, or load a smaller copy: a 0.5B/1.5B model, a GPTQ-Int4 one, or a "
        "save_low_bit folder converted once on a machine with more RAM (notebook 03)."
    )
    return check_ram(need, f"loading {what}", hint, **kwargs)


def is_standin(path: str | os.PathLike[str]) -> bool:
    """True for a folder built by the stand-in builder (SmolLM2 in Qwen2 form, NOT Qwen)."""
    return (Path(path) / _STANDIN_STAMP).is_file()


def mark_standin(folder: str | os.PathLike[str], **facts: Any) -> None:
    """Stamp a finished stand-in folder (tools/standin.py) with the current recipe."""
    stamp = {**facts, "recipe_version": _STANDIN_RECIPE}
    (Path(folder) / _STANDIN_STAMP).write_text(json.dumps(stamp, indent=2) + "\n")


def standin_built(name: str) -> bool:
    """True when the stand-in ``name`` ("standin", "standin-gptq-int4") is in the course's
    models folder, completed by the current recipe."""
    try:
        stamp = json.loads((models_dir() / name / _STANDIN_STAMP).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("recipe_version") == _STANDIN_RECIPE


# --------------------------------------------------------------------------- architecture


def load_config(source: Any) -> dict[str, Any]:
    """A config as a dict, from a dict, a transformers config, a model folder or its
    config.json, or the name / hub id of a public Qwen config shipped with the course
    (``labhelpers/data/qwen_configs.json``: ``"Qwen3-8B"``, ``"Qwen/Qwen2.5-7B-Instruct"``)."""
    if isinstance(source, Mapping):
        return dict(source)
    if hasattr(source, "to_dict"):
        return dict(source.to_dict())
    path = Path(source).expanduser()
    path = path / "config.json" if path.is_dir() else path
    if path.is_file():
        return dict(json.loads(path.read_text(encoding="utf-8")))
    shipped = shipped_configs()
    for name, entry in shipped.items():
        if str(source).strip().lower() in (name.lower(), entry["hf_id"].lower()):
            return dict(entry["config"])
    raise ValueError(
        f"no config for {str(source)!r}: not a model folder or config.json, and not a shipped "
        f"config ({', '.join(shipped)}). Pass the model's config.json (a path, or the dict)."
    )


def shipped_configs() -> dict[str, dict[str, Any]]:
    """The public Qwen ``config.json`` copies shipped with the course, by model name."""
    data = json.loads((_DATA / "qwen_configs.json").read_text(encoding="utf-8"))
    return {name: entry for name, entry in data.items() if not name.startswith("_")}


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers of a dense decoder, read once from its config (notebooks 02-05,
    the roofline). Qwen1 (``model_type: qwen``) names things differently: ``kv_channels`` is
    the head size, ``intermediate_size`` twice each MLP projection, ``seq_length`` the context,
    no GQA. ``intermediate_size`` here is one projection."""

    name: str
    model_type: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    max_context: int
    qkv_bias: bool
    qk_norm: bool
    dtype: str
    quantization: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: Any, name: str | None = None) -> ModelShape:
        """From anything :func:`load_config` reads; multimodal configs via ``text_config``."""
        cfg = load_config(config)
        if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), Mapping):
            cfg = {**cfg["text_config"], "quantization_config": cfg.get("quantization_config")}
        if name is None and isinstance(config, (str, os.PathLike)):
            path = Path(config)
            name = (
                path.name if path.is_dir() else path.parent.name if path.is_file() else str(config)
            )
        label = name or cfg.get("_name_or_path") or cfg.get("model_type") or "model"
        qwen1 = cfg.get("model_type") == "qwen"
        context = "seq_length" if qwen1 else "max_position_embeddings"
        need = ["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size"]
        missing = [k for k in [*need, "vocab_size", context] if not _positive(cfg.get(k))]
        if missing:
            raise ValueError(
                f"{label}: config.json lacks positive whole numbers for {', '.join(missing)}; "
                "pass the model's full config.json, not a partial one"
            )
        heads, hidden = cfg["num_attention_heads"], cfg["hidden_size"]
        kv_heads = heads if qwen1 else int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ValueError(f"{label}: {heads} heads cannot share {kv_heads} KV heads evenly")
        fp16 = "float16" if cfg.get("fp16") else "bfloat16"  # Qwen1 says fp16/bf16 so
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or fp16
        quant = cfg.get("quantization_config")
        return cls(
            name=str(label),
            model_type=str(cfg.get("model_type") or ""),
            hidden_size=hidden,
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=int(cfg.get("kv_channels" if qwen1 else "head_dim") or hidden // heads),
            intermediate_size=cfg["intermediate_size"] // (2 if qwen1 else 1),
            vocab_size=cfg["vocab_size"],
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_context=cfg[context],
            qkv_bias=qwen1 or bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            qk_norm=cfg.get("model_type") == "qwen3",
            dtype=str(dtype).replace("torch.", ""),
            quantization=dict(quant) if isinstance(quant, Mapping) else None,
        )

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_layers(self) -> list[tuple[str, int, int, str]]:
        """One decoder block's linear layers: ``(name, inputs, outputs, "column"|"row")``."""
        h, f, q, kv = self.hidden_size, self.intermediate_size, self.q_width, self.kv_width
        return [
            ("q_proj", h, q, "column"),
            ("k_proj", h, kv, "column"),
            ("v_proj", h, kv, "column"),
            ("o_proj", q, h, "row"),
            ("gate_proj", h, f, "column"),
            ("up_proj", h, f, "column"),
            ("down_proj", f, h, "row"),
        ]

    @property
    def bias_params(self) -> int:
        return self.num_layers * (self.q_width + 2 * self.kv_width) if self.qkv_bias else 0

    @property
    def norm_params(self) -> int:
        per_layer = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        return self.num_layers * per_layer + self.hidden_size

    @property
    def params(self) -> int:
        """All parameters (tied embeddings counted once)."""
        linear = self.num_layers * sum(k * n for _, k, n, _ in self.linear_layers())
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return linear + embeddings + self.bias_params + self.norm_params

    def as_row(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row.pop("quantization")
        return row | {"params_b": round(self.params / 1e9, 3)}


def _positive(value: Any) -> bool:
    return isinstance(value, int) and value > 0


# --------------------------------------------------------------------------- caches and hubs


def _find_local(spec: ModelSpec, log: _Log = print) -> Path | None:
    """A complete local copy of ``spec``: the course cache, ModelScope's cache (which writes
    ``Qwen2.5`` as ``Qwen2___5``), the Hugging Face cache; else None."""
    candidates: list[tuple[str, Path | None]] = []
    if spec.hf_id:
        candidates.append(("course cache", models_dir() / spec.hf_id))
    if spec.modelscope_id:
        ms = Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache/modelscope/hub")
        for folder in {spec.modelscope_id.replace(".", "___"), spec.modelscope_id}:
            candidates += [("ModelScope cache", p) for p in (ms / "models" / folder, ms / folder)]
    if spec.hf_id:
        candidates.append(("Hugging Face cache", _hf_cache_path(spec.hf_id)))
    for where, path in candidates:
        if path is None or not path.exists():
            continue
        try:
            found = validate_model_dir(path)
        except ModelError as exc:
            log(f"  ✗ the {where} has {path}, but it is unusable: {exc}")
            continue
        log(f"  ✓ found in the {where}: {found}")
        return found
    return None


def _hf_cache_path(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download

    try:
        cache = os.environ.get("HF_HUB_CACHE")
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except Exception:  # not cached (or the library refuses): not usable
        return None


def is_offline() -> bool:
    """True when ``QWEN_LAB_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` asks for offline mode."""
    flags = ("QWEN_LAB_OFFLINE", "HF_HUB_OFFLINE")
    return any(os.environ.get(v, "") not in ("", "0") for v in flags)


def _hf_endpoint() -> str:
    """The Hugging Face endpoint in use (``HF_ENDPOINT`` for a mirror, else huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _reachable(host: str, timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def _check_disk(need_gb: float, model_id: str) -> None:
    free = shutil.disk_usage(models_dir()).free / GB
    if need_gb > free:
        raise NotEnoughResourcesError(
            f"downloading {model_id} needs about {need_gb:.1f} GB of disk, but {models_dir()} has "
            f"{free:.1f} GB free. Free some space, or point QWEN_LAB_CACHE at a bigger disk (on "
            "AutoDL: the data disk, /root/autodl-tmp)."
        )


def _download(spec: ModelSpec, log: _Log = print) -> Path | None:
    """Download ``spec`` into the course cache from each hub in ``QWEN_LAB_HUB_ORDER`` (default
    ``modelscope,hf``) until one works; the hubs resume partial downloads. None (after saying
    why) when offline, unreachable, or every hub failed."""
    if is_offline():
        log("  · offline mode (QWEN_LAB_OFFLINE / HF_HUB_OFFLINE): not downloading")
        return None
    dest = models_dir() / (spec.hf_id or spec.modelscope_id or spec.name)
    hubs = [h.strip() for h in os.environ.get("QWEN_LAB_HUB_ORDER", "modelscope,hf").split(",")]
    if set(hubs) - {"modelscope", "hf", ""}:
        raise ValueError(f"QWEN_LAB_HUB_ORDER may list 'modelscope' and 'hf', not {hubs}")
    for hub in filter(None, hubs):
        model_id = spec.modelscope_id if hub == "modelscope" else spec.hf_id
        host = "www.modelscope.cn" if hub == "modelscope" else urlparse(_hf_endpoint()).hostname
        if not model_id or not host:
            continue
        if not _reachable(host):
            log(f"  ✗ {hub}: cannot reach {host} within 3 s")
            continue
        _check_disk(spec.size_gb * 1.1 + 0.2, model_id)
        log(f"  … downloading {model_id} from {hub} (~{spec.size_gb:.1f} GB) into {dest}")
        try:
            if hub == "modelscope":
                from modelscope import snapshot_download as ms_download

                ms_download(model_id, local_dir=str(dest))
            else:
                from huggingface_hub import snapshot_download

                snapshot_download(model_id, local_dir=str(dest), endpoint=_hf_endpoint())
        except Exception as exc:  # network errors come in many types: try the next hub
            log(f"  ✗ {hub}: download failed ({type(exc).__name__}: {exc}); run again to resume")
            continue
        return validate_model_dir(dest)
    return None


# --------------------------------------------------------------------------- resolve


def resolve(name: str | os.PathLike[str], *, download_ok: bool = True, standin_ok: bool = True,
            log: _Log = print) -> Path:  # fmt: skip
    """A local folder for a model name, hub id or path; prints what was chosen and why.
    ``download_ok=False`` never touches the network; ``standin_ok=False`` raises instead of
    falling back to the offline stand-in."""
    text = os.fspath(name)
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        path = validate_model_dir(text)
        log(f"✓ {text}: using the local folder {path}")
        return path
    spec = _lookup(text)
    if spec is None and text.count("/") == 1:  # an unregistered hub id ("Qwen/Qwen3-0.6B")
        spec = ModelSpec(text, 0, "unknown", 0, "both", hf_id=text, modelscope_id=text)
    if spec is None:
        close = difflib.get_close_matches(text, registry(), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ModelError(
            f"Unknown model {text!r}: not a folder, not a hub id (org/name), not in "
            f"labhelpers/data/models.json.{hint} Known: {', '.join(registry())}."
        )
    if spec.is_standin:
        return _standin(spec, log)
    log(f"Resolving {spec.name} ({spec.note or spec.hf_id}):")
    found = _find_local(spec, log) or (_download(spec, log) if download_ok else None)
    if found is not None:
        return found
    if standin_ok and spec.fallback:
        if gpu_available() and not is_offline():
            raise ModelError(
                f"{spec.name} is not here and could not be downloaded, and this is a GPU machine: "
                "the 135M stand-in would print its numbers under GPU titles. Get the model: set "
                "HF_ENDPOINT=https://hf-mirror.com (or QWEN_LAB_HUB_ORDER=modelscope,hf), copy the "
                "folder here and pass its path, or set QWEN_LAB_OFFLINE=1 to accept the stand-in."
            )
        log(f"  → no copy of {spec.name} can be had here: using the OFFLINE STAND-IN "
            f"'{spec.fallback}' (SmolLM2-135M in Qwen2 form, NOT Qwen)")  # fmt: skip
        return _standin(registry()[spec.fallback], log)
    raise ModelError(
        f"{spec.name} is not in any local cache and could not be downloaded. Connect to the "
        "internet (or set HF_ENDPOINT to a mirror such as https://hf-mirror.com), or copy the "
        "model folder here and pass its path."
    )


def _standin(spec: ModelSpec, log: _Log) -> Path:
    if not standin_built(spec.name):
        raise ModelError(
            f"the offline stand-in '{spec.name}' is not built yet: run ./course setup "
            "(or python tools/standin.py), about 4 minutes once."
        )
    path = validate_model_dir(models_dir() / spec.name)
    log(f"✓ {spec.name}: {path}  [{spec.note}]")
    return path
