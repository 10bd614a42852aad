"""The course's models: a registry kept as data, and ``resolve(name)`` -> a local folder.

Resolution order, printed as it goes so a student sees what was chosen and why:

1. an explicit local path (checked: config, weights complete, tokenizer);
2. an offline stand-in by name (``standin``, ``standin-gptq-int4``), built if missing;
3. local caches: the course cache, ModelScope's cache (which rewrites ``.`` in folder
   names as ``___``, e.g. ``Qwen2___5-7B-Instruct``), the Hugging Face cache;
4. a download, ModelScope ``snapshot_download`` first, then ``huggingface_hub``
   (which honours ``HF_ENDPOINT``, e.g. a mirror), into a temporary folder renamed into
   place only when complete; network probes time out in seconds;
5. the model's offline stand-in, when nothing could be fetched.

The registry is ``labhelpers/data/models.json``: edit it to add models. Used by every
notebook's parameters cell (``MODEL_DIR = models.resolve(MODEL)``) and by notebook 00.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from labhelpers.atomic import atomic_dir
from labhelpers.paths import models_dir

GB = 1024**3
OFFLINE_ENV = "QWEN_LAB_OFFLINE"
HUB_ORDER_ENV = "QWEN_LAB_HUB_ORDER"
PROBE_TIMEOUT_S = 3.0
MODELSCOPE_HOST = "www.modelscope.cn"
# Rough run-time memory: weights as on disk x 1.2, plus 0.5 GB for the runtime.
# The KV cache comes on top and grows with batch x context (see notebook 04's sizing).
MEMORY_FACTOR = 1.2
RUNTIME_OVERHEAD_GB = 0.5

Log = Callable[[str], Any]


class ModelError(RuntimeError):
    """Base class: a model could not be made available. The message says what to do."""


class ModelNotFoundError(ModelError):
    """Unknown name, missing path, or nothing local and no way to download."""


class ModelDirError(ModelError):
    """A model folder that is incomplete or corrupt (e.g. a half-finished download)."""


class NotEnoughResourcesError(ModelError):
    """Too little RAM, GPU memory or disk for the chosen model."""


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the registry (see ``labhelpers/data/models.json``)."""

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
        """Rough memory to load and run it (weights x 1.2 + 0.5 GB; KV cache extra)."""
        return self.size_gb * MEMORY_FACTOR + RUNTIME_OVERHEAD_GB


def registry() -> dict[str, ModelSpec]:
    """All models the course knows, by name."""
    raw = json.loads(
        resources.files("labhelpers").joinpath("data/models.json").read_text(encoding="utf-8")
    )
    return {name: ModelSpec(name=name, **fields) for name, fields in raw.items() if name[0] != "_"}


def lookup(name: str) -> ModelSpec | None:
    """Find a registry entry by course name or by hub id (``Qwen/...``), case-insensitively."""
    lowered = name.lower()
    for spec in registry().values():
        ids = (spec.name, spec.hf_id or "", spec.modelscope_id or "")
        if lowered in (i.lower() for i in ids if i):
            return spec
    return None


def modelscope_folder_name(model_id: str) -> str:
    """ModelScope stores ``Qwen/Qwen2.5-7B-Instruct`` as ``Qwen/Qwen2___5-7B-Instruct``."""
    return model_id.replace(".", "___")


# --------------------------------------------------------------------------- checks


def validate_model_dir(path: str | os.PathLike[str]) -> Path:
    """Check that ``path`` holds a complete transformers model; return it resolved.

    Checks ``config.json`` (parses, has ``model_type``), weight files (safetensors headers
    readable and files as long as their headers say; every shard listed in an index
    present) and a tokenizer. Raises :class:`ModelDirError` naming the problem and fix.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"{path} does not exist. Check the path, or pass a model name from "
            f"labhelpers/data/models.json (e.g. 'standin') to download or build one."
        )
    if not path.is_dir():
        raise ModelDirError(f"{path} is a file; give the folder that holds config.json.")
    redo = (
        "It looks like an interrupted download or copy: delete the folder and resolve the "
        "model again (it will be downloaded or rebuilt)."
    )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelDirError(f"{path} has no config.json, so it is not a model folder. {redo}")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ModelDirError(f"{config_file} is not valid JSON ({exc}). {redo}") from exc
    if "model_type" not in config:
        raise ModelDirError(f"{config_file} has no 'model_type'. {redo}")
    _check_weights(path, redo)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise ModelDirError(f"{path} has no tokenizer files (tokenizer.json). {redo}")
    return path.resolve()


def _check_weights(path: Path, redo: str) -> None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise ModelDirError(f"{index} is unreadable ({exc}). {redo}") from exc
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelDirError(
                f"{path} is missing {len(missing)} of {len(shards)} weight shards "
                f"(first: {missing[0]}). {redo}"
            )
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        if any(path.glob("pytorch_model*.bin")):
            return
        raise ModelDirError(f"{path} has no weight files (*.safetensors). {redo}")
    for file in files:
        _check_safetensors(file, redo)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header describes it (no data is read)."""

    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


def read_safetensors_header(file: str | os.PathLike[str]) -> tuple[int, dict[str, Any]]:
    """``(header length, header dict)`` of one ``.safetensors`` file; ValueError when the file
    is not one. Reads only the first bytes of the file."""
    file = Path(file)
    size = file.stat().st_size
    try:
        with file.open("rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than file")
            header = json.loads(fh.read(header_len))
    except struct.error as exc:
        raise ValueError(str(exc)) from exc
    return header_len, header


def safetensors_tensors(model_dir: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    """Every tensor of a model folder's ``*.safetensors`` files, from their headers only
    (notebooks 03 and 06: parameter counts and bytes streamed per token)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir} has no *.safetensors weights")
    tensors = {}
    for file in files:
        for name, meta in read_safetensors_header(file)[1].items():
            if name != "__metadata__":
                begin, end = meta["data_offsets"]
                tensors[name] = TensorInfo(meta["dtype"], tuple(meta["shape"]), end - begin)
    return tensors


def _check_safetensors(file: Path, redo: str) -> None:
    size = file.stat().st_size
    try:
        header_len, header = read_safetensors_header(file)
    except ValueError as exc:
        raise ModelDirError(f"{file} is not a readable safetensors file ({exc}). {redo}") from exc
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        raise ModelDirError(
            f"{file} is truncated: {size:,} bytes on disk, its header says {expected:,}. {redo}"
        )


def dir_size_gb(path: str | os.PathLike[str]) -> float:
    """Size of a folder's files in GB (follows the links a hub cache uses)."""
    from labhelpers.bench import dir_size_bytes

    return dir_size_bytes(path) / GB


def available_ram_gb() -> float:
    """Memory available to a new allocation now (MemAvailable), in GB."""
    from labhelpers.env import memory_bytes

    available = memory_bytes()[1]
    if available is None:
        raise RuntimeError("cannot read available memory (no psutil, no /proc/meminfo)")
    return available / GB


def check_fits_in_ram(
    model: str | os.PathLike[str] | ModelSpec,
    *,
    available_gb: float | None = None,
) -> float:
    """Estimate the RAM needed to load ``model`` (a folder or a registry entry) and raise
    :class:`NotEnoughResourcesError` before loading if it will not fit. Returns the estimate.
    """
    if isinstance(model, ModelSpec):
        need, what = model.memory_needed_gb(), model.name
    else:
        need = dir_size_gb(model) * MEMORY_FACTOR + RUNTIME_OVERHEAD_GB
        what = str(model)
    have = available_ram_gb() if available_gb is None else available_gb
    if need > have:
        raise NotEnoughResourcesError(
            f"{what} needs about {need:.1f} GB of RAM to load and run, but only {have:.1f} GB "
            "is available. Close other programs or kernels, or choose a smaller model: a "
            "GPTQ-Int4 variant, a 0.5B/1.5B Qwen, or 'standin-gptq-int4'."
        )
    return need


def check_disk(size_gb: float, folder: Path, *, what: str) -> None:
    """Raise :class:`NotEnoughResourcesError` if ``folder`` has not room for ``size_gb``."""
    free = shutil.disk_usage(folder).free / GB
    need = size_gb * 1.1 + 0.2
    if need > free:
        raise NotEnoughResourcesError(
            f"Downloading {what} needs about {need:.1f} GB of disk, but {folder} has "
            f"{free:.1f} GB free. Free some space, or point QWEN_LAB_CACHE at a bigger disk "
            "(on AutoDL: the data disk, /root/autodl-tmp)."
        )


# --------------------------------------------------------------------------- local caches


def course_cache_path(repo_id: str) -> Path:
    """Where the course keeps a downloaded model: ``<cache>/models/<org>/<name>``."""
    return models_dir() / repo_id


def modelscope_cache_candidates(model_id: str) -> list[Path]:
    """Folders where ModelScope's ``snapshot_download`` may have put ``model_id``."""
    base = Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope" / "hub")
    names = {modelscope_folder_name(model_id), model_id}
    return [root / n for root in (base / "models", base) for n in sorted(names)]


def hf_cache_path(repo_id: str) -> Path | None:
    """The snapshot folder of ``repo_id`` in the Hugging Face cache, if complete there."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        cache = os.environ.get("HF_HUB_CACHE")  # None: huggingface_hub's default
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except Exception:  # not cached, or the library refuses: either way not usable
        return None


def find_local(spec: ModelSpec, log: Log = print) -> Path | None:
    """A complete local copy of ``spec`` in any known cache, or None."""
    candidates: list[tuple[str, Path | None]] = []
    if spec.hf_id:
        candidates.append(("course cache", course_cache_path(spec.hf_id)))
    if spec.modelscope_id:
        candidates += [
            ("ModelScope cache", p) for p in modelscope_cache_candidates(spec.modelscope_id)
        ]
    if spec.hf_id:
        candidates.append(("Hugging Face cache", hf_cache_path(spec.hf_id)))
    for where, path in candidates:
        if path is None or not path.exists():
            continue
        try:
            found = validate_model_dir(path)
        except ModelError as exc:
            log(f"  ✗ {where} has {path}, but it is unusable: {exc}")
            continue
        log(f"  ✓ found in the {where}: {found}")
        return found
    return None


# --------------------------------------------------------------------------- network


def is_offline() -> bool:
    """True when the user asked for offline mode (``QWEN_LAB_OFFLINE=1``, ``HF_HUB_OFFLINE=1``)."""
    return any(os.environ.get(v, "") not in ("", "0") for v in (OFFLINE_ENV, "HF_HUB_OFFLINE"))


def hf_endpoint() -> str:
    """The Hugging Face endpoint in use (``HF_ENDPOINT`` for a mirror, else huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def can_reach(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Open a TCP connection to ``host:port`` within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_order() -> list[str]:
    """Hubs to try, in order: ``QWEN_LAB_HUB_ORDER`` (e.g. ``hf,modelscope``), default
    ModelScope first (fast in China), then Hugging Face."""
    order = os.environ.get(HUB_ORDER_ENV, "modelscope,hf")
    hubs = [h.strip() for h in order.split(",") if h.strip()]
    unknown = set(hubs) - {"modelscope", "hf"}
    if unknown:
        raise ValueError(f"{HUB_ORDER_ENV} may list 'modelscope' and 'hf'; got {sorted(unknown)}")
    return hubs


def _download_modelscope(model_id: str, dest: Path) -> None:
    from modelscope import snapshot_download

    snapshot_download(model_id, local_dir=str(dest))


def _download_hf(repo_id: str, dest: Path) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id, local_dir=str(dest))


DOWNLOADERS: dict[str, Callable[[str, Path], None]] = {
    "modelscope": _download_modelscope,
    "hf": _download_hf,
}


def download(spec: ModelSpec, log: Log = print) -> Path | None:
    """Download ``spec`` into the course cache, trying each hub in :func:`hub_order`.

    Files go to a temporary folder renamed into place only once complete and valid, so
    an interrupted download leaves nothing that looks like a model. Returns None (after
    saying why) when no hub could be reached or every attempt failed.
    """
    if is_offline():
        log(f"  · offline mode ({OFFLINE_ENV} / HF_HUB_OFFLINE set): not downloading")
        return None
    dest = course_cache_path(spec.hf_id or spec.modelscope_id or spec.name)
    for hub in hub_order():
        model_id = spec.modelscope_id if hub == "modelscope" else spec.hf_id
        if not model_id:
            continue
        host = MODELSCOPE_HOST if hub == "modelscope" else urlparse(hf_endpoint()).hostname
        if not host or not can_reach(host):
            log(f"  ✗ {hub}: cannot reach {host} within {PROBE_TIMEOUT_S:.0f} s")
            continue
        check_disk(
            spec.size_gb, dest.parent if dest.parent.exists() else models_dir(), what=model_id
        )
        log(f"  … downloading {model_id} from {hub} (~{spec.size_gb:.1f} GB) into {dest}")
        try:
            with atomic_dir(dest, overwrite=True) as tmp:
                DOWNLOADERS[hub](model_id, tmp)
                validate_model_dir(tmp)
        except ModelError:
            raise
        except Exception as exc:  # network errors come in many types; try the next hub
            log(f"  ✗ {hub}: download failed ({type(exc).__name__}: {exc})")
            continue
        log(f"  ✓ downloaded: {dest}")
        return dest
    return None


# --------------------------------------------------------------------------- resolve


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep in name.strip("/").split("/", 1)[-1]


def resolve(
    name: str | os.PathLike[str],
    *,
    download_ok: bool = True,
    standin_ok: bool = True,
    log: Log = print,
) -> Path:
    """Return a local folder for a model name, hub id or path; print what was chosen and why.

    ``download_ok=False`` never touches the network; ``standin_ok=False`` raises instead of
    falling back to the offline stand-in.
    """
    text = os.fspath(name)
    if Path(text).expanduser().exists() or _looks_like_path(text):
        path = validate_model_dir(text)
        log(f"✓ {text}: using the local folder {path}")
        return path

    spec = lookup(text)
    if spec is None:
        if text.count("/") == 1:  # an unregistered hub id such as "Qwen/Qwen3-0.6B"
            spec = ModelSpec(
                name=text,
                params_b=0,
                weights="unknown",
                size_gb=0,
                target="both",
                hf_id=text,
                modelscope_id=text,
            )
        else:
            names = [n for n in registry()]
            close = difflib.get_close_matches(text, names, n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ModelNotFoundError(
                f"Unknown model {text!r}: not a folder, not a hub id (org/name) and not in "
                f"labhelpers/data/models.json.{hint} Known: {', '.join(names)}."
            )

    if spec.is_standin:
        return _resolve_standin(spec, log)

    log(f"Resolving {spec.name} ({spec.note or spec.hf_id}):")
    local = find_local(spec, log)
    if local is not None:
        return local
    log("  · not in any local cache")
    if download_ok:
        fetched = download(spec, log)
        if fetched is not None:
            return fetched
    if standin_ok and spec.fallback:
        log(
            f"  → no copy of {spec.name} can be had here; using the OFFLINE STAND-IN "
            f"'{spec.fallback}' (SmolLM2-135M in Qwen2 form, not Qwen) so the notebook still runs"
        )
        return _resolve_standin(registry()[spec.fallback], log)
    raise ModelNotFoundError(
        f"{spec.name} is not in any local cache and could not be downloaded. Connect to the "
        "internet (or set HF_ENDPOINT to a mirror such as https://hf-mirror.com), or copy the "
        "model folder here and pass its path."
    )


def _resolve_standin(spec: ModelSpec, log: Log) -> Path:
    from labhelpers import standin

    if not standin.is_built(spec.name):
        log(
            f"  … stand-in '{spec.name}' is not built yet; building it now (set-up normally "
            "does this)"
        )
        builder = (
            standin.build_standin if spec.name == standin.STANDIN else standin.build_standin_gptq
        )
        builder(log=log)
    path = validate_model_dir(standin.standin_dir(spec.name))
    log(f"✓ {spec.name}: {path}  [{spec.note}]")
    return path
