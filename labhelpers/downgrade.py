"""Adapt a model folder written by transformers 5 so that transformers 4.37 can load it.

IPEX-LLM 2.2.0 (notebook 03_ipex_llm_cpu_int4, and the IPEX-LLM row of 06_which_backend) runs
with transformers 4.37 / tokenizers 0.15, which cannot read what transformers 5 writes:

- ``config.json``: 4.37 reads ``rope_theta`` and ``torch_dtype`` at the top level; transformers 5
  writes ``rope_parameters: {"rope_theta": ...}`` and ``dtype``. Without the fix the model silently
  runs with the default rope_theta (10000): it loads, then talks nonsense.
- ``tokenizer_config.json``: 4.37 does not know ``tokenizer_class: TokenizersBackend`` and reads
  the chat template only from this file (transformers 5 writes ``chat_template.jinja``).
- ``tokenizer.json``: tokenizers 0.15 expects BPE merges as ``"a b"`` strings; newer versions
  write ``["a", "b"]`` pairs (else: ``data did not match any variant of untagged enum
  ModelWrapper``).

The adapted model is a *copy* in the course cache (weights are symlinked, not copied): the
original folder is never modified. Real Qwen checkpoints from ModelScope / Hugging Face were
written by older transformers and mostly pass through unchanged.

Pure JSON work: this module imports nothing heavy and works in every course environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from .atomic import atomic_dir
from .paths import cache_dir

RECIPE_VERSION = 1
STAMP = "DOWNGRADED_FROM.json"
#: Files that are linked, never rewritten (large; the same in both versions).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
DEFAULT_ROPE_THETA = 10000.0  # what transformers 4.37's Qwen2Config assumes when it is missing


class NotAModelDirError(FileNotFoundError):
    """The folder has no config.json: it is not a Hugging Face model folder."""


def adapt_config(config: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of a ``config.json`` dict that transformers 4.37 reads correctly."""
    out = dict(config)
    rope = out.get("rope_parameters")
    if "rope_theta" not in out:
        if isinstance(rope, dict) and "rope_theta" in rope:
            out["rope_theta"] = rope["rope_theta"]
        else:
            out["rope_theta"] = DEFAULT_ROPE_THETA
    if isinstance(rope, dict):
        rope_type = rope.get("rope_type", "default")
        if rope_type != "default" and "rope_scaling" not in out:
            out["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        out.pop("rope_parameters")
    if "torch_dtype" not in out and "dtype" in out:
        out["torch_dtype"] = out["dtype"]
    out.pop("dtype", None)
    # transformers 5 only: a per-layer list 4.37 does not know (harmless, but noisy).
    out.pop("layer_types", None)
    return out


def adapt_tokenizer_config(
    tokenizer_config: dict[str, Any], chat_template: str | None
) -> dict[str, Any]:
    """Return a copy of ``tokenizer_config.json`` for transformers 4.37.

    ``chat_template`` is the content of ``chat_template.jinja`` (transformers 5 keeps the
    template there); 4.37 only reads it from this file.
    """
    out = dict(tokenizer_config)
    if out.get("tokenizer_class") in (None, "TokenizersBackend"):
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template and not out.get("chat_template"):
        out["chat_template"] = chat_template
    for key in ("backend", "is_local", "local_files_only"):
        out.pop(key, None)
    return out


def adapt_tokenizer_json(tokenizer: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``tokenizer.json`` whose BPE merges tokenizers 0.15 can parse."""
    model = tokenizer.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return tokenizer
    merges = model.get("merges") or []
    if merges and not isinstance(merges[0], list):
        return tokenizer
    bad = [m for m in merges if " " in m[0] or " " in m[1]]
    if bad:
        raise ValueError(
            f"tokenizer.json has merges containing spaces (e.g. {bad[0]!r}); they cannot be "
            "written in the old 'a b' format. This tokenizer needs tokenizers>=0.20."
        )
    out = dict(tokenizer)
    out["model"] = {**model, "merges": [f"{a} {b}" for a, b in merges]}
    out["model"].pop("ignore_merges", None)
    return out


def _source_fingerprint(src: Path) -> str:
    """Hash of the small files plus size/mtime of the weights: changes when the source does."""
    h = hashlib.sha256(f"recipe {RECIPE_VERSION}".encode())
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name == STAMP:
            continue
        st = f.stat()
        h.update(f"{f.name} {st.st_size} {int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def default_destination(src: Path) -> Path:
    """Where the adapted copy of ``src`` lives: ``<cache>/transformers-4.37/<name>``."""
    return cache_dir() / "transformers-4.37" / src.name


def is_current(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> bool:
    """True when ``dest`` is an adapted copy of ``src`` as it is now."""
    stamp = Path(dest) / STAMP
    if not stamp.is_file():
        return False
    try:
        data = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return data.get("fingerprint") == _source_fingerprint(Path(src))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")


def for_transformers_4_37(
    model_dir: str | os.PathLike[str],
    dest: str | os.PathLike[str] | None = None,
    *,
    log: Any = print,
) -> Path:
    """Return a copy of ``model_dir`` that transformers 4.37 / tokenizers 0.15 can load.

    The copy is made once (atomically) and reused while the source is unchanged; weight files
    are symlinked. Used by notebook 03_ipex_llm_cpu_int4 and labhelpers.compare.
    """
    src = Path(model_dir).expanduser().resolve()
    if not (src / "config.json").is_file():
        raise NotAModelDirError(
            f"{src} has no config.json: not a Hugging Face model folder. Pass the folder that "
            "labhelpers.models.resolve() returned (or that save_pretrained wrote)."
        )
    target = Path(dest).expanduser() if dest is not None else default_destination(src)
    if target.resolve() == src:
        raise ValueError("dest must differ from model_dir: the original is never modified")
    if is_current(src, target):
        log(f"transformers 4.37 copy: up to date ({target})")
        return target
    chat_template = None
    if (src / "chat_template.jinja").is_file():
        chat_template = (src / "chat_template.jinja").read_text(encoding="utf-8")
    changed: list[str] = []
    with atomic_dir(target, overwrite=True) as tmp:
        for f in sorted(src.iterdir()):
            if not f.is_file():
                continue
            out = tmp / f.name
            if f.name.endswith(WEIGHT_SUFFIXES):
                os.symlink(f, out)
            elif f.name in ("config.json", "tokenizer_config.json"):
                old = _read_json(f)
                if f.name == "config.json":
                    new = adapt_config(old)
                else:
                    new = adapt_tokenizer_config(old, chat_template)
                if new != old:
                    changed.append(f.name)
                _write_json(out, new)
            elif f.name == "tokenizer.json":
                old = _read_json(f)
                new = adapt_tokenizer_json(old)
                if new is old:
                    shutil.copy2(f, out)
                else:
                    changed.append("tokenizer.json")
                    out.write_text(json.dumps(new, ensure_ascii=False), encoding="utf-8")
            else:
                shutil.copy2(f, out)
        _write_json(
            tmp / STAMP,
            {
                "source": str(src),
                "fingerprint": _source_fingerprint(src),
                "recipe_version": RECIPE_VERSION,
                "changed": changed,
            },
        )
    log(
        f"transformers 4.37 copy: {target} (rewrote {', '.join(changed) or 'nothing'}; "
        "weights linked to the original)"
    )
    return target
