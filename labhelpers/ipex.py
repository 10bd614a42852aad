"""IPEX-LLM on a CPU (notebook 03, notebook 06's row): a model copy its transformers 4.37 reads,
the low-bit formats that work, the kernel build it loaded, one format measured in a fresh
process. Verified with ipex-llm 2.2.0: sym/asym_int4, sym/asym_int5, sym_int8 and woq_int4 work;
nf3/nf4/fp4/fp8 need an Intel GPU; K-quants, fp6 and mixed_fp4 *abort the process* (GGML_ASSERT)
when a layer width is not a multiple of 256.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from labhelpers.envs import kernel_python, run_in_env
from labhelpers.files import atomic_dir, cache_dir, dir_size_bytes
from labhelpers.measure import batch_throughput, chat_timings, heldout_text, perplexity
from labhelpers.models import ModelShape, check_fits_in_ram
from labhelpers.roofline import bytes_per_token, model_weight_bytes

_CPU_FORMATS = ("sym_int4", "asym_int4", "sym_int5", "asym_int5", "sym_int8", "woq_int4")
_GPU_ONLY = ("nf3", "nf4", "fp4", "fp8", "fp8_e4m3", "fp8_e5m2", "fp16", "bf16")
_BLOCK_256 = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "gguf_q4k_s", "gguf_q4k_m")
_CPU_ABORTS = ("fp6", "mixed_fp4", "mixed_fp8")
_KERNEL_BUILDS = ("amx", "avx512", "avxvnni", "avx2", "avx")  # the order libllama-api.so tries
_FP32 = "fp32"
_COPY_RECIPE = 1


class LowBitFormatError(ValueError):
    """A low-bit format this model or this device cannot use."""


class NotALowBitFolderError(FileNotFoundError):
    """A folder ``load_low_bit`` cannot read (not written by ``save_low_bit``)."""


# --------------------------------------------------------------------------- transformers 4.37


def _adapt_config(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 4.37 reads ``rope_theta``/``torch_dtype`` at the top level; transformers 5
    writes ``rope_parameters``/``dtype``. Without this the model silently runs with the default
    rope_theta (10000): it loads, then talks nonsense."""
    out = dict(config)
    rope = out.pop("rope_parameters", None)
    rope = rope if isinstance(rope, dict) else {}
    out.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        out.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    if "dtype" in out:
        out.setdefault("torch_dtype", out.pop("dtype"))
    out.pop("layer_types", None)
    return out


def _adapt_tokenizer_config(config: dict[str, Any], chat_template: str | None) -> dict[str, Any]:
    """4.37 does not know ``TokenizersBackend`` and reads the chat template only from here."""
    out = {k: v for k, v in config.items() if k not in ("backend", "is_local", "local_files_only")}
    if out.get("tokenizer_class") in (None, "TokenizersBackend"):
        out["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template and not out.get("chat_template"):
        out["chat_template"] = chat_template
    return out


def _adapt_tokenizer_json(tokenizer: dict[str, Any]) -> dict[str, Any]:
    """tokenizers 0.15 reads BPE merges as ``"a b"`` strings, not ``["a", "b"]`` pairs."""
    model = tokenizer.get("model") or {}
    merges = model.get("merges") or []
    if model.get("type") != "BPE" or not merges or not isinstance(merges[0], list):
        return tokenizer
    if any(" " in a or " " in b for a, b in merges):
        raise ValueError("tokenizer.json has merges with spaces: it needs tokenizers >= 0.20")
    new_model = {k: v for k, v in model.items() if k != "ignore_merges"}
    return tokenizer | {"model": new_model | {"merges": [f"{a} {b}" for a, b in merges]}}


def for_transformers_4_37(model_dir: str | os.PathLike[str],
                          dest: str | os.PathLike[str] | None = None, *,
                          log: Any = print) -> Path:  # fmt: skip
    """A copy of ``model_dir`` that transformers 4.37 / tokenizers 0.15 can load, in
    ``<cache>/transformers-4.37/<name>``: config.json, tokenizer_config.json and tokenizer.json
    rewritten, weights linked (the original is never touched). Made once (atomically) and
    reused while the source is unchanged."""
    src = Path(model_dir).expanduser().resolve()
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"{src} has no config.json: pass the folder models.resolve() gave")
    target = Path(dest).expanduser() if dest else cache_dir() / "transformers-4.37" / src.name
    if target.resolve() == src:
        raise ValueError("dest must differ from model_dir: the original is never modified")
    files = sorted(p for p in src.iterdir() if p.is_file())
    digest = hashlib.sha256(f"recipe {_COPY_RECIPE}".encode())
    for f in files:
        digest.update(f"{f.name} {f.stat().st_size} {int(f.stat().st_mtime)}".encode())
    stamp = target / "DOWNGRADED_FROM.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == digest.hexdigest():
        log(f"transformers 4.37 copy: up to date ({target})")
        return target
    template = src / "chat_template.jinja"
    template_text = template.read_text(encoding="utf-8") if template.is_file() else None
    adapt = {
        "config.json": _adapt_config,
        "tokenizer.json": _adapt_tokenizer_json,
        "tokenizer_config.json": lambda c: _adapt_tokenizer_config(c, template_text),
    }
    changed = []
    with atomic_dir(target, overwrite=True) as tmp:
        for f in files:
            if f.suffix in (".safetensors", ".bin", ".gguf"):
                os.symlink(f, tmp / f.name)
            elif f.name in adapt:
                old = json.loads(f.read_text(encoding="utf-8"))
                new = adapt[f.name](old)
                changed += [f.name] if new != old else []
                (tmp / f.name).write_text(json.dumps(new, ensure_ascii=False), encoding="utf-8")
            else:
                shutil.copy2(f, tmp / f.name)
        record = {"source": str(src), "fingerprint": digest.hexdigest(), "changed": changed}
        (tmp / stamp.name).write_text(json.dumps(record, indent=2))
    log(f"transformers 4.37 copy: {target} (rewrote {', '.join(changed) or 'nothing'}; links)")
    return target


# --------------------------------------------------------------------------- checks


def check_format(low_bit: str, config: Any = None, *, device: str = "cpu") -> str:
    """Return ``low_bit`` if ``from_pretrained(load_in_low_bit=low_bit)`` can work here, else
    raise :class:`LowBitFormatError` saying which format to use instead. ``config`` (dict,
    object or folder) is needed for the K-quants' layer-width check."""
    fmt, safe = low_bit.strip().lower(), ", ".join(_CPU_FORMATS)
    if fmt not in (*_CPU_FORMATS, *_GPU_ONLY, *_BLOCK_256, *_CPU_ABORTS):
        raise LowBitFormatError(
            f"'{low_bit}' is not an ipex-llm low-bit format. On a CPU use one of: {safe}."
        )
    if device != "cpu":
        return fmt
    if fmt in _GPU_ONLY:
        raise LowBitFormatError(
            f"'{fmt}' runs on Intel GPUs (device 'xpu') only; on a CPU ipex-llm refuses it. Use "
            f"sym_int4 (the size of nf4/fp4) or sym_int8 (like fp8). CPU formats: {safe}."
        )
    if fmt in _CPU_ABORTS:
        raise LowBitFormatError(
            f"'{fmt}' aborts the whole Python process on a CPU (GGML_ASSERT in ipex-llm 2.2.0): "
            f"the kernel would die. Use sym_int4 or asym_int5. CPU formats: {safe}."
        )
    if fmt in _BLOCK_256:
        if config is None:
            raise LowBitFormatError(
                f"'{fmt}' needs every layer width to be a multiple of 256: pass the model's "
                "config to check it, or use sym_int4."
            )
        shape = ModelShape.from_config(config)
        widths = {"hidden_size": shape.hidden_size, "intermediate_size": shape.intermediate_size}
        bad = ", ".join(f"{k}={v} ({v} % 256 = {v % 256})" for k, v in widths.items() if v % 256)
        if bad:
            raise LowBitFormatError(
                f"'{fmt}' packs weights in blocks of 256 values, but this model has {bad}: "
                "ipex-llm would abort the process (GGML_ASSERT). Use asym_int5 (close to q5_k in "
                "size) or sym_int4 instead."
            )
    return fmt


def check_low_bit_folder(path: str | os.PathLike[str]) -> str:
    """The format recorded in a folder written by ``model.save_low_bit(path)``, else
    :class:`NotALowBitFolderError` saying what to do instead."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise NotALowBitFolderError(
            f"{folder} has no config.json. Write it first: model = AutoModelForCausalLM."
            "from_pretrained(src, load_in_low_bit='sym_int4'); model.save_low_bit(folder)."
        )
    fmt = json.loads((folder / "config.json").read_text()).get("bigdl_transformers_low_bit")
    if not fmt:
        raise NotALowBitFolderError(
            f"{folder} holds an ordinary model (no 'bigdl_transformers_low_bit' in config.json): "
            "load_low_bit only reads folders written by save_low_bit; for this folder use "
            "AutoModelForCausalLM.from_pretrained(folder, load_in_low_bit='sym_int4')."
        )
    if not any(f.suffix in (".bin", ".safetensors") for f in folder.iterdir()):
        raise NotALowBitFolderError(
            f"{folder}/config.json says {fmt}, but there are no weights: save_low_bit did not "
            "finish. Delete the folder and save again."
        )
    return str(fmt)


# --------------------------------------------------------------------------- kernels


def loaded_kernel_builds(pid: int | str = "self") -> list[str]:
    """The ipex-llm kernel builds (``lib<family>_<build>.so``) mapped into a process. They are
    loaded at the first low-bit matmul: call this after a ``generate``."""
    pattern = re.compile(r"/ipex_llm/libs/lib\w+?_(" + "|".join(_KERNEL_BUILDS) + r")\.so$")
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return []
    return sorted({m.group(1) for line in lines if (m := pattern.search(line.strip()))})


def _best_build_for(flags: set[str] | frozenset[str]) -> str:
    """The fastest kernel build a CPU with these ``/proc/cpuinfo`` flags can run."""
    if {"amx_tile", "amx_int8"} <= flags:
        return "amx"
    if {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags:
        return "avx512"
    if {"avx_vnni", "avx2"} <= flags:
        return "avxvnni"
    return "avx2" if "avx2" in flags else "avx"


def explain_kernel_choice(loaded: str | None, vendor: str | None, flags: set[str]) -> str:
    """Why ipex-llm picked ``loaded`` on this CPU, in one paragraph."""
    best = _best_build_for(flags)
    if loaded is None:
        return "No ipex-llm kernel library is mapped yet: it loads at the first low-bit matmul."
    text = f"ipex-llm loaded its '{loaded}' build; this CPU ({vendor}) could run '{best}'."
    if loaded == best:
        return text + " That is the best build for it."
    if vendor != "GenuineIntel" and loaded == "avx":
        return text + (
            " ipex-llm checks the CPU vendor string and picks its AVX2/AVX-VNNI/AVX-512/AMX builds "
            "only on 'GenuineIntel' CPUs: on AMD and others it falls back to the plain AVX build "
            "(no FMA), even when the CPU supports the faster instructions."
        )
    return text + " (AMX is skipped when BIGDL_LLM_AMX_DISABLED is set.)"


def _all_position_logits(model: Any) -> None:
    """Make an IPEX-LLM model return logits for every position, as perplexity needs: it computes
    the LM head for the last position only (``optimize_lm_head``), which makes the first token
    faster. Switch it off only for scoring, and check that it worked."""
    import torch

    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "optimize_lm_head"):
        head.optimize_lm_head = False
    with torch.inference_mode():
        if model(torch.tensor([[1, 2, 3, 4]])).logits.shape[1] != 4:
            raise RuntimeError(
                "logits for the last position only: set IPEX_LLM_LAST_LM_HEAD=0 before loading"
            )


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# --------------------------------------------------------------------------- one format, measured


def _convert_format(model_dir: str, low_bit: str, dest: str) -> dict[str, Any]:
    """``from_pretrained(load_in_low_bit=...)`` + ``save_low_bit(dest)``, timed: the one-off
    conversion (run in a fresh process: :func:`measure_format_in_env`)."""
    check_format(low_bit, model_dir)
    folder = for_transformers_4_37(model_dir, log=lambda _: None)
    from ipex_llm.transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(str(folder), load_in_low_bit=low_bit).save_low_bit(dest)
    took, peak = time.perf_counter() - t0, _peak_rss_bytes()
    return {"convert_s": took, "disk_bytes": dir_size_bytes(dest), "convert_peak_rss_bytes": peak}


def measure_format(
    model_dir: str,
    low_bit: str,
    *,
    prompts: tuple[str, ...] = ("What is the capital of France? Answer in one sentence.",),
    max_new_tokens: int = 32,
    repeats: int = 3,
    eval_ids: list[int] | None = None,
    window: int = 512,
    stride: int = 256,
    threads: int = 1,
    low_bit_dir: str | None = None,
    batch_sizes: list[int] | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Measure ``low_bit`` (or "fp32": plain transformers) in *this* process (a fresh one:
    :func:`measure_format_in_env`): load time, weights in memory and streamed per token, TTFT
    and decode tokens/s (median over prompts x repeats), the greedy answers, aggregate tokens/s
    of static batches (``batch_sizes``), peak RSS, perplexity on ``eval_ids``, the kernel
    build. ``low_bit_dir``: a save_low_bit folder, loaded with load_low_bit."""
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    src = for_transformers_4_37(model_dir, log=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(src)
    t0 = time.perf_counter()
    if low_bit == _FP32:
        from transformers import AutoModelForCausalLM

        check_fits_in_ram(model_dir, 4.0)
        model = AutoModelForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    else:
        from ipex_llm.transformers import AutoModelForCausalLM

        check_format(low_bit, model_dir)
        if low_bit_dir:
            check_low_bit_folder(low_bit_dir)
            model = AutoModelForCausalLM.load_low_bit(low_bit_dir)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(src), load_in_low_bit=low_bit)
    row: dict[str, Any] = dict(format=low_bit, threads=threads, load_s=time.perf_counter() - t0)
    row["weights_bytes"], row["streamed_bytes"] = model_weight_bytes(model), bytes_per_token(model)
    log(f"    {low_bit}: loaded in {row['load_s']:.1f} s")
    median, row["answers"] = chat_timings(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, repeats=repeats, label=low_bit
    )
    for key in ("ttft_s", "decode_tokens_per_s", "new_tokens", "prompt_tokens"):
        row[key] = getattr(median, key)
    log(f"    {low_bit}: {median.decode_tokens_per_s:.1f} tokens/s, TTFT {median.ttft_s:.3f} s")
    if batch_sizes:
        row["sweep"] = batch_throughput(
            model, tokenizer, prompts, batch_sizes, max_new_tokens=max_new_tokens, log=log
        )
    row["peak_rss_bytes"] = _peak_rss_bytes()  # before scoring: its activations are extra
    if eval_ids:
        if low_bit != _FP32:
            _all_position_logits(model)
        row["perplexity"] = perplexity(model, eval_ids, window=window, stride=stride)
        log(f"    {low_bit}: perplexity {row['perplexity']:.3f}")
    row["kernel_build"] = ", ".join(loaded_kernel_builds()) or None
    if low_bit == _FP32:
        row["disk_bytes"] = row["weights_bytes"]  # what save_pretrained in fp32 would write
    return row


def measure_format_in_env(model_dir: str | os.PathLike[str], low_bit: str, *, threads: int = 1,
                          log: Any = print, **options: Any) -> dict[str, Any]:  # fmt: skip
    """:func:`measure_format` in the IPEX-LLM environment, each step in a fresh process so a
    format's peak RSS is its own and a crash cannot take the caller down: a low-bit format is
    converted and saved first (:func:`_convert_format`), then loaded with load_low_bit and
    measured. ``OMP_NUM_THREADS`` is set before the process starts (OpenMP reads it once). A
    failure returns ``{"format": ..., "error": ...}``."""
    python = kernel_python("qwen-lab-ipex", "ipex")
    row: dict[str, Any] = {"format": low_bit}
    if python is None:
        return row | {"error": "the IPEX-LLM environment (.venvs/ipex) is missing: ./course setup"}
    env = {"OMP_NUM_THREADS": str(threads), "IPEX_LLM_LAST_LM_HEAD": "0"}
    if "eval_ids" not in options:
        options["eval_ids"] = _tokenize_heldout(model_dir, options.pop("eval_tokens", 512))
    job = dict(env=env, log=log, model_dir=str(model_dir), low_bit=low_bit)
    with tempfile.TemporaryDirectory(prefix="ipex-") as tmp:
        try:
            if low_bit != _FP32:
                convert = "labhelpers.ipex:_convert_format"
                row |= run_in_env(
                    python, convert, name=f"ipex-convert-{low_bit}", dest=f"{tmp}/saved", **job
                )
                options["low_bit_dir"] = f"{tmp}/saved"
            measure = "labhelpers.ipex:measure_format"
            row |= run_in_env(
                python, measure, name=f"ipex-{low_bit}", threads=threads, **job, **options
            )
        except Exception as exc:  # a failed worker: its first line and the log's last (why)
            lines = str(exc).splitlines() or [type(exc).__name__]
            row["error"] = lines[0] + (f" {lines[-1]}" if len(lines) > 1 else "")
    return row


def _tokenize_heldout(model_dir: str | os.PathLike[str], tokens: int) -> list[int]:
    """The first ``tokens`` token ids of the held-out text with this model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(for_transformers_4_37(model_dir, log=lambda _: None))
    return tok(heldout_text())["input_ids"][:tokens] if tokens else []
