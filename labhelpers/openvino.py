"""OpenVINO int4 (notebooks 07b and 06): an exported IR measured the way notebook 06 measures
every backend, inside the OpenVINO environment (``.venvs/openvino``; notebook 06 runs
``labhelpers.openvino:measure_ir`` there with ``envs.run_in_env``). The notebook itself exports
with ``optimum-cli export openvino`` and chats with ``openvino_genai.LLMPipeline``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from labhelpers.files import dir_size_bytes
from labhelpers.measure import PeakMemory, perplexity_from_logprobs

_KV_BYTES = {"u8": 1, "i8": 1, "f16": 2, "bf16": 2, "f32": 4}


def _perplexity(
    folder: Path, ids: Sequence[int], threads: int | None, window: int, stride: int
) -> float:
    """``LLMPipeline`` returns no prompt log-probabilities; optimum-intel's ``OVModelForCausalLM``
    runs the same IR on the same CPU plugin and returns every position's logits."""
    import torch
    from optimum.intel import OVModelForCausalLM

    config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
    model = OVModelForCausalLM.from_pretrained(folder, ov_config=config)

    def score(chunk: list[int]) -> list[float]:
        ids = torch.tensor([chunk])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1).gather(1, ids[0, 1:, None])[:, 0].tolist()

    return perplexity_from_logprobs(score, list(ids), window=window, stride=stride)


def measure_ir(
    ov_dir: str | Path,
    *,
    prompts: Sequence[str] = ("Hello!",),
    max_new_tokens: int = 32,
    repeats: int = 3,
    threads: int | None = 1,
    batch_sizes: Sequence[int] = (),
    eval_ids: Sequence[int] | None = None,
    window: int = 512,
    stride: int = 256,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """An OpenVINO IR folder (``optimum-cli export openvino``) measured with
    ``openvino_genai.LLMPipeline(ov_dir, "CPU", INFERENCE_NUM_THREADS=threads)`` (None: all
    cores): load time; per prompt the greedy chat answer (a warm-up too), then ``repeats`` timed
    runs of exactly ``max_new_tokens``: median TTFT and decode tokens/s (1 / TPOT) from GenAI's
    ``perf_metrics``; for each of ``batch_sizes`` one ``generate`` of that many prompts, aggregate
    tokens/s; peak RSS and its increase; weights (``openvino_model.bin``, read once per token)
    and folder size; the KV-cache element size; perplexity on ``eval_ids`` in
    ``measure.perplexity``'s windows (through ``OVModelForCausalLM``)."""
    folder = Path(ov_dir)
    if not (folder / "openvino_model.xml").is_file():
        raise FileNotFoundError(
            f"{folder} holds no OpenVINO IR (openvino_model.xml): export "
            "it first with optimum-cli export openvino (notebook 07b)"
        )
    import openvino as ov
    import openvino_genai as genai

    answer_cfg = genai.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
    exact = genai.GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False
    )
    row: dict[str, Any] = dict(threads=threads or "all", answers=[], sweep=[])
    scheduler = genai.SchedulerConfig()
    scheduler.enable_prefix_caching = False  # every run prefills, as in the other backends
    config = dict(scheduler_config=scheduler) | (
        {"INFERENCE_NUM_THREADS": threads} if threads else {}
    )
    runs = []
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        pipe = genai.LLMPipeline(str(folder), "CPU", **config)
        row["load_s"] = time.perf_counter() - t0
        for prompt in prompts:
            chat = genai.ChatHistory([{"role": "user", "content": prompt}])
            row["answers"].append(pipe.generate(chat, answer_cfg).texts[0].strip())
            for _ in range(repeats):
                pm = pipe.generate(chat, exact).perf_metrics
                n, ttft = pm.get_num_generated_tokens(), pm.get_ttft().mean / 1000
                decode = 1000 / pm.get_tpot().mean if n > 1 else None
                runs.append((ttft, decode, n, pm.get_num_input_tokens()))
        for size in batch_sizes:
            t0 = time.perf_counter()
            pipe.generate([prompts[i % len(prompts)] for i in range(size)], exact)
            wall = time.perf_counter() - t0
            row["sweep"].append(
                dict(concurrency=size, aggregate_tok_s=size * max_new_tokens / wall, wall_s=wall)
            )
            log(f"    batch of {size}: {size * max_new_tokens / wall:.1f} tokens/s aggregate")
        del pipe
    for key, values in zip(("ttft_s", "decode_tokens_per_s", "new_tokens", "prompt_tokens"),
                           zip(*runs, strict=True), strict=True):  # fmt: skip
        row[key] = statistics.median(v for v in values if v is not None)
    log(f"    {row['decode_tokens_per_s']:.1f} tokens/s, TTFT {row['ttft_s']:.3f} s")
    core = ov.Core()
    kv = core.get_property("CPU", "KV_CACHE_PRECISION").get_type_name()
    row |= dict(
        peak_rss_bytes=mem.peak_rss_bytes,
        rss_increase_bytes=mem.peak_rss_delta_bytes,
        kv_bytes_per_elem=_KV_BYTES.get(kv, 2),
        weights_bytes=(folder / "openvino_model.bin").stat().st_size,
        disk_bytes=dir_size_bytes(folder),
        engine_version=genai.__version__.split("-")[0],
        precision=core.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name(),
    )
    if eval_ids:
        t0 = time.perf_counter()
        row["perplexity"] = _perplexity(folder, eval_ids, threads, window, stride)
        row["perplexity_s"] = time.perf_counter() - t0
        log(f"    perplexity {row['perplexity']:.3f}")
    return row
