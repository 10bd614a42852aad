"""Measure one IPEX-LLM low-bit format (or fp32) in a fresh process: load time, TTFT, decode
tokens/s, peak RSS, weights in memory, size on disk of save_low_bit, perplexity, one answer.

Each format runs in its own process so that peak RSS belongs to that format alone (a Python
process rarely gives memory back) and a format that crashes cannot take the notebook's kernel
down. Used by notebook 03_ipex_llm_cpu_int4 (and labhelpers.compare for 06_which_backend)::

    python -m labhelpers.lowbit_bench --model DIR --format sym_int4 --json out.json

Runs in the IPEX-LLM environment (.venvs/ipex, transformers 4.37).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

FP32 = "fp32"
DEFAULT_PROMPT = "用一句话介绍一下杭州。"


def measure(
    model_dir: str | os.PathLike[str],
    low_bit: str,
    *,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 32,
    repeats: int = 3,
    eval_tokens: int = 512,
    threads: int = 1,
    low_bit_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Measure ``low_bit`` (an ipex-llm format, or "fp32" for plain transformers) in *this*
    process. Call it from a fresh process (:func:`measure_in_subprocess`).

    ``low_bit_dir``: a folder that :func:`convert` wrote with ``save_low_bit``; the model is
    then loaded with ``load_low_bit`` (what a user does every day after converting once)."""
    import torch
    from transformers import AutoTokenizer

    from . import bench, lowbit, quant
    from .downgrade import for_transformers_4_37

    torch.set_num_threads(threads)
    src = Path(model_dir)
    config = json.loads((src / "config.json").read_text())
    row: dict[str, Any] = {"format": low_bit, "threads": threads}
    if low_bit == FP32:
        lowbit.check_ram_for_load(src, 4.0)
    else:
        lowbit.check_format(low_bit, config)
    folder = for_transformers_4_37(src, log=lambda _msg: None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    t0 = time.perf_counter()
    if low_bit == FP32:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    elif low_bit_dir is not None:
        from ipex_llm.transformers import AutoModelForCausalLM

        lowbit.check_low_bit_folder(low_bit_dir)
        model = AutoModelForCausalLM.load_low_bit(str(low_bit_dir))
    else:
        from ipex_llm.transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, load_in_low_bit=low_bit)
    row["load_s"] = time.perf_counter() - t0
    row["weights_bytes"] = bench.model_weight_bytes(model)
    row["streamed_bytes"] = bench.streamed_weight_bytes(model)  # what one decode step reads
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    runs = bench.time_generate(
        lambda streamer: model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            streamer=streamer,
        ),
        label=low_bit,
        warmup=1,
        repeats=repeats,
    )
    median = runs.median
    row.update(
        ttft_s=median.ttft_s,
        decode_tokens_per_s=median.decode_tokens_per_s,
        new_tokens=median.new_tokens,
    )
    answer = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    row["answer"] = tokenizer.decode(answer[0, ids.shape[1] :], skip_special_tokens=True)
    if eval_tokens:
        if low_bit != FP32:
            lowbit.all_position_logits(model)
        eval_ids = tokenizer(quant.heldout_text())["input_ids"][:eval_tokens]
        window = min(512, len(eval_ids))
        row["perplexity"] = quant.perplexity(model, eval_ids, window=window, stride=window // 2)
        row["eval_tokens"] = len(eval_ids)
    if low_bit == FP32:
        row["disk_bytes"] = row["weights_bytes"]  # what save_pretrained in fp32 would write
    libs = lowbit.loaded_kernel_libraries()
    row["kernel_build"] = libs[0].build if libs else None
    row["peak_rss_bytes"] = bench.rss_peak_bytes()
    return row


def convert(
    model_dir: str | os.PathLike[str], low_bit: str, dest: str | os.PathLike[str]
) -> dict[str, Any]:
    """``from_pretrained(load_in_low_bit=...)`` then ``save_low_bit(dest)``, timed: the
    one-off conversion. Returns convert_s, disk_bytes and the conversion's peak RSS."""
    from . import bench, lowbit
    from .downgrade import for_transformers_4_37

    src = Path(model_dir)
    lowbit.check_format(low_bit, json.loads((src / "config.json").read_text()))
    folder = for_transformers_4_37(src, log=lambda _msg: None)
    from ipex_llm.transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, load_in_low_bit=low_bit)
    model.save_low_bit(str(dest))
    convert_s = time.perf_counter() - t0
    return {
        "convert_s": convert_s,
        "disk_bytes": bench.dir_size_bytes(dest),
        "convert_peak_rss_bytes": bench.rss_peak_bytes(),
    }


def _run_cli(argv: list[str], env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Run ``python -m labhelpers.lowbit_bench ... --json OUT`` and return its JSON or an error."""
    out = Path(argv[argv.index("--json") + 1])
    try:
        run = subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if run.returncode != 0 or not out.is_file():
        last = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
        how = f"exit code {run.returncode}" if run.returncode >= 0 else "killed by a signal"
        return {"error": f"{how}: {last}"}
    return json.loads(out.read_text())


def measure_in_subprocess(
    model_dir: str | os.PathLike[str],
    low_bit: str,
    *,
    python: str | os.PathLike[str] | None = None,
    threads: int = 1,
    timeout_s: float = 600,
    **options: Any,
) -> dict[str, Any]:
    """Run :func:`measure` in a fresh ``python`` (default: this interpreter) and return its row.

    ``OMP_NUM_THREADS`` is set to ``threads`` before the process starts (it must be: the
    OpenMP runtime reads it once). A process that fails or dies returns a row with ``error``.
    """
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "IPEX_LLM_LAST_LM_HEAD": "0",  # keep every position's logits: perplexity needs them
        "TRANSFORMERS_VERBOSITY": "error",
    }
    base = [str(python or sys.executable), "-m", "labhelpers.lowbit_bench", "--model"]
    base += [str(model_dir), "--format", low_bit, "--threads", str(threads)]
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        row: dict[str, Any] = {"format": low_bit}
        run_argv = [*base, "--json", f"{tmp}/row.json"]
        if low_bit != FP32:
            saved = f"{tmp}/saved"
            converted = _run_cli(
                [*base, "--convert-to", saved, "--json", f"{tmp}/c.json"], env, timeout_s
            )
            row.update(converted)
            if "error" in converted:
                return row
            run_argv += ["--low-bit-dir", saved]
        for key, value in options.items():
            run_argv += [f"--{key.replace('_', '-')}", str(value)]
        row.update(_run_cli(run_argv, env, timeout_s))
        return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m labhelpers.lowbit_bench",
        description="Measure one IPEX-LLM low-bit format (or fp32) on one model.",
    )
    parser.add_argument("--model", required=True, help="model folder (transformers 5 or 4.x)")
    parser.add_argument("--format", default="sym_int4", help="ipex-llm low_bit, or fp32")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-tokens", type=int, default=512, help="0: skip perplexity")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="write the row here (default: print it)")
    parser.add_argument("--convert-to", type=Path, help="only convert and save_low_bit here")
    parser.add_argument("--low-bit-dir", type=Path, help="load_low_bit from this folder")
    args = parser.parse_args(argv)
    if args.convert_to:
        row = convert(args.model, args.format, args.convert_to)
    else:
        row = measure(
            args.model,
            args.format,
            prompt=args.prompt,
            max_new_tokens=args.max_new_tokens,
            repeats=args.repeats,
            eval_tokens=args.eval_tokens,
            threads=args.threads,
            low_bit_dir=args.low_bit_dir,
        )
    text = json.dumps(row, ensure_ascii=False, indent=2)
    if args.json:
        args.json.write_text(text, encoding="utf-8")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
