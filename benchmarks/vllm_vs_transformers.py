"""Benchmark: vLLM's OpenAI-compatible server under concurrent load vs single-stream
transformers ``generate`` of the same model, on this machine, in one run.

The measurement notebook 05_vllm_serving makes, as a script for repeated or scheduled runs:

    .venvs/core/bin/python benchmarks/vllm_vs_transformers.py
    .venvs/core/bin/python benchmarks/vllm_vs_transformers.py --model Qwen2.5-0.5B-Instruct \
        --concurrency 1 2 4 8 16 --json results.json

Reports aggregate tokens/s per concurrency level, the multiple of the highest level over
single-stream transformers (target on the 2-core course machine: >= 4x at concurrency 8),
and single-stream decode as a % of the memory-bandwidth roofline. Exit code 0 whether or not
the target is met (the verdict is printed); non-zero only when something fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from labhelpers import bench, env, loadtest, models, serve

PROMPT = loadtest.DEFAULT_PROMPTS[0]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="Qwen2.5-0.5B-Instruct-GPTQ-Int4",
        help="name from labhelpers/data/models.json, hub id or folder",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--requests-per-slot", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="single-stream repeats (median)")
    p.add_argument("--threads", type=int, default=1, help="transformers threads on CPU")
    p.add_argument("--target", type=float, default=4.0)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--json", help="write the results to this file")
    return p.parse_args()


def measure_vllm(model_dir, args: argparse.Namespace, on_gpu: bool) -> dict:
    if on_gpu:
        flags = dict(launcher="cli", max_model_len=8192, gpu_memory_utilization=0.85)
    else:
        flags = dict(dtype="bfloat16", max_model_len=2048, enforce_eager=True)
    kw = dict(temperature=0, extra_body={"ignore_eos": True})
    msgs = [{"role": "user", "content": PROMPT}]
    with serve.vllm_server(model_dir, name="bench-vllm", served_model_name="m", **flags) as server:
        client = server.client()
        bench.time_openai_stream(client, "m", msgs, max_tokens=args.max_tokens, **kw)  # warm-up
        runs = [
            bench.time_openai_stream(client, "m", msgs, max_tokens=args.max_tokens, **kw)
            for _ in range(args.repeats)
        ]
        levels = loadtest.sweep(
            server.openai_base_url,
            "m",
            args.concurrency,
            max_tokens=args.max_tokens,
            requests_per_level=lambda c: args.requests_per_slot * c,
            **kw,
        )
        startup_s = server.startup_s
    return {
        "startup_s": startup_s,
        "single_decode_tokens_per_s": statistics.median(r.decode_tokens_per_s for r in runs),
        "single_e2e_tokens_per_s": statistics.median(r.e2e_tokens_per_s for r in runs),
        "prompt_tokens": runs[-1].prompt_tokens or 0,
        "levels": [lvl.as_row() for lvl in levels],
    }


def measure_transformers(model_dir, args: argparse.Namespace, on_gpu: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not on_gpu and args.threads:
        torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map="auto", dtype="auto")
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    ).to(model.device)
    n = args.max_tokens
    run = bench.time_generate(
        lambda s: model.generate(
            **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=s
        ),
        label="transformers",
        warmup=1,
        repeats=args.repeats,
        measure_memory=False,
    )
    result = {
        "threads": torch.get_num_threads(),
        "e2e_tokens_per_s": run.median.e2e_tokens_per_s,
        "decode_tokens_per_s": run.median.decode_tokens_per_s,
        "weight_bytes": bench.model_weight_bytes(model),
        "kv": bench.kv_geometry(model.config),
    }
    return result  # the model is freed when this function returns


def main() -> int:
    args = parse_args()
    on_gpu = env.gpu_available()
    model_dir = models.resolve(args.model)
    vllm = measure_vllm(model_dir, args, on_gpu)  # server stopped before transformers runs
    tf = measure_transformers(model_dir, args, on_gpu)

    top = max(args.concurrency)
    top_level = next(r for r in vllm["levels"] if r["concurrency"] == top)
    multiple = top_level["aggregate_tokens_per_s"] / tf["e2e_tokens_per_s"]
    bw = bench.memory_bandwidth_gbps()
    per_token = bench.decode_bytes_per_token(
        tf["weight_bytes"], context_tokens=vllm["prompt_tokens"] + args.max_tokens // 2, **tf["kv"]
    )
    roofline = bench.roofline_tokens_per_s(bw.bytes_per_s, per_token)
    pct = bench.percent_of_roofline(vllm["single_decode_tokens_per_s"], roofline)

    print(f"\nmodel: {model_dir} on {'GPU' if on_gpu else 'CPU'}")
    print(f"vLLM startup: {vllm['startup_s']:.1f} s")
    for r in vllm["levels"]:
        print(
            f"  concurrency {r['concurrency']:>3}: {r['aggregate_tokens_per_s']:.1f} tok/s, "
            f"TTFT p50/p95 {r['ttft_p50_s']:.2f}/{r['ttft_p95_s']:.2f} s, "
            f"e2e p50/p95 {r['e2e_p50_s']:.2f}/{r['e2e_p95_s']:.2f} s, errors {r['errors']}"
        )
    print(
        f"transformers single stream ({tf['threads']} thread(s)): "
        f"{tf['e2e_tokens_per_s']:.1f} tok/s end-to-end"
    )
    verdict = "meets" if multiple >= args.target else "misses"
    print(
        f"concurrency {top}: {multiple:.2f}x single-stream transformers -> {verdict} the "
        f">= {args.target:g}x target"
    )
    print(
        f"vLLM single-stream decode {vllm['single_decode_tokens_per_s']:.1f} tok/s = {pct:.0f}% "
        f"of the roofline ({roofline:.0f} tok/s at {bw.read_gbps:.1f} GB/s)"
    )
    if args.json:
        tf_out = {k: v for k, v in tf.items() if k != "kv"}
        result = {
            "model": str(model_dir),
            "device": "GPU" if on_gpu else "CPU",
            "vllm": vllm,
            "transformers": tf_out,
            "multiple_at_top_concurrency": multiple,
            "top_concurrency": top,
            "target_multiple": args.target,
            "meets_target": multiple >= args.target,
            "bandwidth_read_gbps": bw.read_gbps,
            "roofline_tokens_per_s": roofline,
            "single_stream_percent_of_roofline": pct,
        }
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
