"""GGUF files on the lab bench: check them, convert to them, quantize them (notebook
07_llama_cpp_gguf).

The notebook calls llama.cpp's own tools directly (its converter ``convert_hf_to_gguf.py``,
``llama_cpp.llama_model_quantize``, ``llama_cpp.Llama``); this module adds what a careful
user does around them:

* :func:`check_gguf` says what a file is when it is *not* a GGUF file (a safetensors file, a
  folder, a zip, an empty or truncated download) instead of llama.cpp's bare "failed to load";
* :func:`ftype` turns a quantization name (``"Q4_K_M"``) into llama.cpp's file-type number and
  names the closest known types when the name is wrong;
* :func:`check_convertible` reads the converter's table of supported architectures (without
  importing torch) and fails before a long conversion starts;
* :func:`convert_hf` and :func:`quantize` write to a temporary name next to the destination
  and rename only when the file is complete, so a crash, Ctrl-C or full disk never leaves a
  file that looks finished.

The converter is the one vendored in the ``llama-cpp-python`` sdist (with its ``conversion/``
and ``gguf-py/`` folders); ``./course setup`` copies it into the course cache
(:func:`converter_dir`), so it runs offline. Importing this module is instant: ``gguf`` and
``llama_cpp`` are imported inside the functions that use them.
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import difflib
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

from labhelpers.files import cache_dir, quiet_output

__all__ = [
    "GGUF_MAGIC",
    "K_QUANT_BLOCK",
    "LLAMA_CPP_VERSION",
    "PRE_TOKENIZER_LAUNCHER",
    "ConversionError",
    "GGUFError",
    "NotGGUFError",
    "UnknownQuantTypeError",
    "UnsupportedArchitectureError",
    "check_convertible",
    "check_gguf",
    "convert_hf",
    "converter_argv",
    "converter_dir",
    "ftype",
    "llama_cpp_status",
    "quant_types",
    "quantize",
    "supported_architectures",
]

GGUF_MAGIC = b"GGUF"
# llama.cpp's K-quants (Q2_K ... Q6_K) pack a row in super-blocks of 256 weights (QK_K): a
# tensor whose rows are not a multiple of 256 wide gets a fallback type instead.
K_QUANT_BLOCK = 256
# The llama-cpp-python release ./course builds (requirements/llama-cpp.txt; tests check both).
LLAMA_CPP_VERSION = "0.3.36"
CONVERTER_SCRIPT = "convert_hf_to_gguf.py"
# Written by ./course when building llama-cpp-python failed on this machine (not in CI).
BUILD_FAILED_FILE = "llama-cpp-python-{version}.FAILED"

# Runs llama.cpp's converter with one change: when the tokenizer's pre-tokenizer is not
# recognised by its hash, use the name given on the command line instead of stopping.
# ``python -c LAUNCHER <pre-tokenizer> <convert_hf_to_gguf.py> <converter arguments...>``
PRE_TOKENIZER_LAUNCHER = """\
import runpy, sys
from pathlib import Path
pre, script = sys.argv[1], Path(sys.argv[2])
sys.argv = [str(script), *sys.argv[3:]]
sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]
from conversion.base import TextModel
detect = TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return detect(self, tokenizer)  # the hash is known: the converter's own answer
    except NotImplementedError:
        print(f"pre-tokenizer not recognised by its hash: writing {pre!r} as told", file=sys.stderr)
        return pre
TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(str(script), run_name="__main__")
"""


class GGUFError(ValueError):
    """Base class of this module's input errors."""


class NotGGUFError(GGUFError):
    """A path that should be a GGUF file is not one."""


class UnknownQuantTypeError(GGUFError):
    """A quantization type llama.cpp does not know."""


class UnsupportedArchitectureError(GGUFError):
    """A model whose architecture llama.cpp's converter cannot convert."""


class ConversionError(RuntimeError):
    """llama.cpp's converter or quantizer failed (the message has the end of its output)."""


# --------------------------------------------------------------------------------------
# Checking a file
# --------------------------------------------------------------------------------------


def _looks_like(head: bytes, path: Path) -> str:
    """A short guess at what a file is, from its first bytes and its name."""
    if not head:
        return "an empty file (an interrupted download or copy?)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .bin/.pt checkpoint or a zipped folder)"
    if head[:2] in (b"\x80\x02", b"\x80\x04", b"\x80\x05"):
        return "a Python pickle (an old PyTorch checkpoint)"
    if len(head) >= 9 and head[8:9] == b"{":
        (n,) = struct.unpack("<Q", head[:8])
        if 0 < n < 100_000_000:
            return "a safetensors file (Hugging Face weights)"
    if head.lstrip()[:1] in (b"{", b"["):
        return "a JSON file"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (the real file was never downloaded: git lfs pull)"
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        return f"a {path.suffix} file"
    return f"a file starting with {head[:8]!r}"


def check_gguf(path: str | os.PathLike[str]) -> Path:
    """Return ``path`` if it is a complete-looking GGUF file; else raise :class:`NotGGUFError`
    saying what it is and what to do (notebook 07_llama_cpp_gguf).

    Checks the 4-byte magic ``GGUF``, the format version (2 or 3) and that the header's
    counts are plausible; llama.cpp itself only says "failed to load model"."""
    p = Path(path)
    convert = (
        "A Hugging Face model folder must be converted first: "
        f"python {CONVERTER_SCRIPT} <folder> --outtype f16 --outfile model-f16.gguf"
    )
    if not p.exists():
        raise NotGGUFError(f"{p} does not exist. Check the path (or run the conversion cell).")
    if p.is_dir():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        hint = f"It holds GGUF files: {ggufs[:5]}; pass one of them." if ggufs else convert
        raise NotGGUFError(f"{p} is a folder, not a GGUF file. {hint}")
    with open(p, "rb") as fh:
        head = fh.read(24)
    if head[:4] != GGUF_MAGIC:
        raise NotGGUFError(
            f"{p} is not a GGUF file: it looks like {_looks_like(head, p)}, and a GGUF file "
            f"starts with the bytes {GGUF_MAGIC!r}. {convert}"
        )
    if len(head) < 24:
        raise NotGGUFError(f"{p} is truncated ({len(head)} bytes): download or convert it again.")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise NotGGUFError(
            f"{p} is GGUF version {version}; llama.cpp reads versions 2 and 3 "
            "(a big-endian file or a newer format: convert it again with this llama.cpp)."
        )
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise NotGGUFError(f"{p} has an implausible header ({n_tensors} tensors, {n_kv} keys).")
    return p


# --------------------------------------------------------------------------------------
# Quantization types
# --------------------------------------------------------------------------------------


def quant_types() -> dict[str, int]:
    """llama.cpp's file types by name (``{"F16": 1, "Q4_0": 2, ..., "Q4_K_M": 15, ...}``),
    from the ``gguf`` package's copy of ``enum llama_ftype``."""
    import gguf

    types = {}
    for name, member in gguf.LlamaFileType.__members__.items():
        if name == "GUESSED":
            continue
        short = "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
        types[short] = int(member)
    return types


def ftype(name: str) -> int:
    """llama.cpp's file-type number for a quantization name (case-insensitive: ``"q4_k_m"``
    works). Raises :class:`UnknownQuantTypeError` naming the closest known types."""
    types = quant_types()
    key = name.strip().upper().replace("-", "_")
    if key in types:
        return types[key]
    close = difflib.get_close_matches(key, list(types), n=4, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownQuantTypeError(
        f"llama.cpp has no quantization type {name!r}.{hint} Known types: {', '.join(types)}."
    )


# --------------------------------------------------------------------------------------
# The converter
# --------------------------------------------------------------------------------------


def converter_dir(version: str = LLAMA_CPP_VERSION) -> Path:
    """The folder holding llama.cpp's ``convert_hf_to_gguf.py`` with its ``conversion/`` and
    ``gguf-py/`` folders, copied from the llama-cpp-python sdist by ``./course setup``:
    ``<course cache>/llama.cpp/<version>/``. Raises FileNotFoundError when missing."""
    folder = cache_dir() / "llama.cpp" / version
    missing = [n for n in (CONVERTER_SCRIPT, "conversion", "gguf-py") if not (folder / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"llama.cpp's converter is not in {folder} (missing {', '.join(missing)}). "
            "Run ./course setup: it copies the converter out of the llama-cpp-python "
            f"{version} source package."
        )
    return folder


def supported_architectures(converter: str | os.PathLike[str] | None = None) -> set[str]:
    """The Hugging Face ``architectures`` names the converter can convert to a text model,
    read from its ``conversion/__init__.py`` table without importing it (no torch)."""
    folder = Path(converter) if converter is not None else converter_dir()
    tree = ast.parse((folder / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = getattr(node, "target", None) or (getattr(node, "targets", None) or [None])[0]
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
            return set(ast.literal_eval(node.value))
    raise RuntimeError(f"no TEXT_MODEL_MAP in {folder / 'conversion' / '__init__.py'}")


def check_convertible(
    model_dir: str | os.PathLike[str], converter: str | os.PathLike[str] | None = None
) -> str:
    """Return the model's architecture (``config.json`` ``architectures[0]``) if the
    converter supports it; else raise :class:`UnsupportedArchitectureError` (or
    FileNotFoundError for a folder without ``config.json``)."""
    folder = Path(model_dir)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: not a Hugging Face model folder. Pass the folder "
            "that holds config.json, the tokenizer and the *.safetensors weights."
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    archs = config.get("architectures") or []
    if not archs:
        raise UnsupportedArchitectureError(
            f"{config_file} names no architectures; the converter picks its model class from it."
        )
    known = supported_architectures(converter)
    if archs[0] not in known:
        close = difflib.get_close_matches(archs[0], sorted(known), n=3, cutoff=0.6)
        hint = f" Close names it knows: {', '.join(close)}." if close else ""
        raise UnsupportedArchitectureError(
            f"llama.cpp's converter (llama-cpp-python {LLAMA_CPP_VERSION}) cannot convert "
            f"{archs[0]} ({len(known)} architectures supported).{hint} Use a model whose "
            "architecture it supports, a newer llama.cpp, or a GGUF someone already made."
        )
    return archs[0]


def converter_argv(
    model_dir: str | os.PathLike[str],
    outfile: str | os.PathLike[str],
    *,
    outtype: str = "f16",
    pre_tokenizer: str | None = None,
    python: str = sys.executable,
    converter: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The converter's command line. With ``pre_tokenizer`` the script runs through
    :data:`PRE_TOKENIZER_LAUNCHER`, which uses that name only where the converter's own
    hash lookup fails (a tokenizer it does not recognise)."""
    script = (Path(converter) if converter is not None else converter_dir()) / CONVERTER_SCRIPT
    args = [os.fspath(model_dir), "--outtype", outtype, "--outfile", os.fspath(outfile)]
    if pre_tokenizer:
        return [python, "-c", PRE_TOKENIZER_LAUNCHER, pre_tokenizer, str(script), *args]
    return [python, str(script), *args]


def _partial_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.partial-{os.getpid()}")


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def convert_hf(
    model_dir: str | os.PathLike[str],
    outfile: str | os.PathLike[str],
    *,
    outtype: str = "f16",
    pre_tokenizer: str | None = None,
    converter: str | os.PathLike[str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    timeout_s: float = 1800,
    log=print,
) -> Path:
    """Convert a Hugging Face model folder to a GGUF file with llama.cpp's converter.

    Checks the architecture first (:func:`check_convertible`), runs the converter in a
    subprocess writing ``.<name>.partial-<pid>`` next to ``outfile``, checks the result
    with :func:`check_gguf`, then renames it to ``outfile`` (replacing an older file only
    now). The converter's output goes to ``log_path`` (default: next to ``outfile`` with
    ``.log`` added). Raises :class:`ConversionError` with the end of that log on failure;
    the partial file is removed."""
    conv = Path(converter) if converter is not None else converter_dir()
    check_convertible(model_dir, conv)
    dest = Path(outfile)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(dest)
    log_file = Path(log_path) if log_path else dest.with_name(dest.name + ".log")
    argv = converter_argv(
        model_dir, tmp, outtype=outtype, pre_tokenizer=pre_tokenizer, converter=conv
    )
    shown = ["python" if a == sys.executable else a for a in argv]
    if pre_tokenizer:
        shown[2] = "<PRE_TOKENIZER_LAUNCHER>"
    log(f"$ {' '.join(shown)}")
    t0 = time.perf_counter()
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        log_file.write_text(run.stdout + run.stderr, encoding="utf-8")
        if run.returncode != 0:
            raise ConversionError(
                f"the converter exited with code {run.returncode} (full output: {log_file}):\n"
                f"{_tail(run.stdout + run.stderr)}"
            )
        check_gguf(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"  wrote {dest} ({dest.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    return dest


# --------------------------------------------------------------------------------------
# Quantizing
# --------------------------------------------------------------------------------------


def quantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    qtype: str,
    *,
    nthread: int = 0,
    log_path: str | os.PathLike[str] | None = None,
) -> Path:
    """``llama_cpp.llama_model_quantize`` from GGUF ``src`` to ``dst`` as ``qtype``
    (``"Q8_0"``, ``"Q4_K_M"``, ...), checked and atomic: the name and the source are
    checked first (:func:`ftype`, :func:`check_gguf`), llama.cpp writes a temporary file
    next to ``dst``, which is renamed only when llama.cpp reports success. ``nthread=0``:
    all cores. llama.cpp's output (a line per tensor, a warning per fallback) goes to
    ``log_path`` when given (file descriptors 1 and 2, as C code writes them). Raises
    :class:`ConversionError` when llama.cpp fails."""
    source = check_gguf(src)
    file_type = ftype(qtype)
    dest = Path(dst)
    if dest.resolve() == source.resolve():
        raise GGUFError(f"source and destination are the same file ({dest}): pick another name")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type
    params.nthread = nthread
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial_name(dest)
    where = f"its log ({log_path})" if log_path else "its log above"
    try:
        capture: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if log_path:
            capture = quiet_output(Path(log_path), what=f"quantizing to {qtype}")
        with capture:
            rc = llama_cpp.llama_model_quantize(
                os.fspath(source).encode(), os.fspath(tmp).encode(), ctypes.byref(params)
            )
        if rc != 0:
            raise ConversionError(
                f"llama.cpp could not quantize {source.name} to {qtype} (code {rc}); {where} "
                "says why (for example a type that needs an importance matrix)."
            )
        check_gguf(tmp)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# --------------------------------------------------------------------------------------
# Is llama-cpp-python here?
# --------------------------------------------------------------------------------------


def llama_cpp_status(version: str = LLAMA_CPP_VERSION) -> tuple[bool, str]:
    """``(True, "llama-cpp-python 0.3.36")`` when ``llama_cpp`` imports, else ``(False,
    reason)``: the reason ``./course setup`` recorded when the build failed on this machine
    (with its log), or the import error."""
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, or OSError when the shared library will not load
        marker = cache_dir() / "wheels" / BUILD_FAILED_FILE.format(version=version)
        if marker.is_file():
            return False, marker.read_text(encoding="utf-8").strip()
        return False, (
            f"llama_cpp does not import ({type(exc).__name__}: {exc}). Run ./course setup: "
            f"it builds llama-cpp-python {version} from source (a C++ compiler is needed)."
        )
    return True, f"llama-cpp-python {llama_cpp.__version__}"
