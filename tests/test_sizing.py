"""Tests for labhelpers.sizing: exact arithmetic on toy configs, real Qwen configs, published
memory figures, clear errors; and notebook 04's generated TensorRT-LLM commands."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from labhelpers import sizing
from labhelpers.files import GIB
from labhelpers.machine import GpuSpec
from labhelpers.models import load_config, shipped_configs

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = next(iter(sorted((ROOT / "notebooks").glob("04_*.ipynb"))), None)

# A toy Qwen2 config small enough to size by hand: head_dim 16, q width 64, kv width 32.
TOY = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 1000,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
# Per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate/up 64x128 x2 + down 128x64 = 36864.
TOY_LINEAR = 2 * 36864
TOY_BIAS = 2 * (64 + 32 + 32)  # q/k/v biases (Qwen2)
TOY_NORMS = 2 * 2 * 64 + 64  # two RMSNorms per layer + the final one
TOY_EMBED = 1000 * 64  # embedding; the untied lm_head has as many again
TOY_PARAMS = TOY_LINEAR + TOY_BIAS + TOY_NORMS + 2 * TOY_EMBED  # 202304

# --------------------------------------------------------------------------- arithmetic


def test_toy_weight_bytes_per_mode():
    shape = sizing.shape_of(TOY)
    small = 2 * TOY_BIAS + 2 * TOY_NORMS + 2 * 2 * TOY_EMBED  # stays 16-bit in every mode
    assert sizing.weight_bytes(shape, sizing.get_mode("bf16")) == 2 * TOY_PARAMS == 404608
    # int8 weight-only: 1 byte per weight + an fp16 scale per output channel.
    outs = 64 + 32 + 32 + 64 + 128 + 128 + 64  # output channels of one layer's linears
    assert (
        sizing.weight_bytes(shape, sizing.get_mode("int8_wo")) == TOY_LINEAR + 2 * 2 * outs + small
    )
    # int4 weight-only: half a byte per weight + the same scales.
    assert sizing.weight_bytes(shape, sizing.get_mode("int4_wo")) == 296064
    # GPTQ g32: per group of 32 inputs, an fp16 scale and an fp16 zero per output:
    # q 2x64, k 2x32, v 2x32, o 2x64, gate/up 2x128 each, down 4x64 -> 1152 groups x 4 B.
    gptq = sizing.weight_bytes(shape, sizing.get_mode("int4_gptq", 32))
    assert gptq == 2 * (36864 // 2 + 1152 * 4) + small == 303232
    # AWQ g32: scales only (1152 x 2 B) + a pre-quant scale per input (2 B x 512 inputs).
    awq = sizing.weight_bytes(shape, sizing.get_mode("int4_awq", 32))
    assert awq == 2 * (36864 // 2 + 1152 * 2 + 2 * (64 * 6 + 128)) + small == 300672
    # fp8: one byte per weight plus two fp32 scales per linear.
    assert sizing.weight_bytes(shape, sizing.get_mode("fp8")) == TOY_LINEAR + 2 * 7 * 8 + small


def test_toy_kv_cache_and_activations():
    shape = sizing.shape_of(TOY)
    # K and V x 2 layers x 2 KV heads x 16 dims x 2 bytes
    assert sizing.kv_bytes_per_token(shape) == 2 * 2 * 2 * 16 * 2 == 256
    assert sizing.kv_bytes_per_token(shape, "fp8") == 128
    assert sizing.kv_bytes_per_token(shape, "int8", tp=2) == 64  # 1 KV head per GPU
    assert sizing.kv_bytes_per_token(shape, tp=4) == 128  # 2 KV heads over 4 GPUs: replicated
    est = sizing.estimate(TOY, "bf16", batch=3, context=40)
    assert est.kv_bytes == 3 * 64 * 256  # 40 tokens -> two 32-token blocks per sequence
    assert est.max_num_tokens == 120  # min(8192, 3 x 40)
    # 120 tokens x 2 B x (4x64 + (64 + 2x32) + 3x128) + fp32 logits 3 x 1000 x 4
    assert est.activation_bytes == 120 * 2 * 768 + 12000 == 196320
    assert est.gpu_bytes == 404608 + 49152 + 196320 + sizing._RESERVE


def test_tensor_parallel_splits_layers_but_not_the_embedding():
    shape = sizing.shape_of(TOY)
    bf16 = sizing.get_mode("bf16")
    tp2 = sizing.weight_bytes(shape, bf16, tp=2)
    # Linears, q/k/v biases and the lm_head split in two; the embedding and norms do not.
    assert tp2 == TOY_LINEAR + TOY_BIAS + 2 * TOY_NORMS + 2 * TOY_EMBED + TOY_EMBED
    est = sizing.estimate(TOY, "bf16", tp=2)
    assert est.weight_bytes_total == 2 * tp2


def test_tied_embeddings_counted_once():
    tied = sizing.shape_of({**TOY, "tie_word_embeddings": True})
    untied = sizing.shape_of(TOY)
    bf16 = sizing.get_mode("bf16")
    assert untied.params - tied.params == TOY_EMBED
    assert sizing.weight_bytes(untied, bf16) - sizing.weight_bytes(tied, bf16) == 2 * TOY_EMBED
    # tp > 1: every GPU keeps the whole table and gets its own lm_head slice.
    assert sizing.weight_bytes(tied, bf16, tp=2) == sizing.weight_bytes(untied, bf16, tp=2)


def test_qwen1_config_dialect():
    qwen1 = {
        "model_type": "qwen",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 256,  # twice each projection: w1, w2 are 128 wide
        "kv_channels": 16,
        "vocab_size": 1000,
        "seq_length": 256,
        "max_position_embeddings": 32768,
        "no_bias": True,
    }
    shape = sizing.shape_of(qwen1)
    assert sizing.kv_bytes_per_token(shape) == 2 * 2 * 4 * 16 * 2  # no GQA
    assert sizing.estimate(qwen1, "bf16").context == 256, "capped at seq_length"


def test_verdict_capacity_arithmetic():
    toy_gpu = GpuSpec("toy", memory_bytes=2 * GIB, capability=(8, 9), bandwidth_gbps=1000)
    v = sizing.verdict(TOY, toy_gpu, "bf16", batch=1, context=256)
    fixed = 404608 + (256 * 2 * 768 + 4000) + GIB  # weights + activations + reserve
    budget = int(0.9 * (2 * GIB - fixed))
    assert v.kv_budget_bytes == budget == 965646000
    assert v.kv_capacity_tokens == budget // 256 // 32 * 32 == 3772032
    assert v.max_batch == 3772032 // 256 == 14734
    assert v.max_context == 256  # capped by the model
    assert v.fits
    # decode bound: bandwidth / (weights + KV of the whole context), one stream
    assert v.decode_tokens_per_s_bound == pytest.approx(1000e9 / (404608 + 256 * 256))


def test_verdict_reports_too_big_batch():
    toy_gpu = GpuSpec("toy", memory_bytes=GIB + 3_000_000, capability=(8, 0))
    v = sizing.verdict(TOY, toy_gpu, "bf16", batch=64, context=256, max_num_tokens=256)
    assert not v.fits and 0 < v.max_batch < 64
    assert "largest" in v.summary


# --------------------------------------------------------------------------- real configs


def test_every_shipped_config_loads_with_the_right_geometry():
    geometry = {  # (layers, heads, kv_heads, head_dim, MLP width, KV bytes per token at 16 bit)
        "Qwen-7B-Chat": (32, 32, 32, 128, 11008, 524288),
        "Qwen1.5-7B-Chat": (32, 32, 32, 128, 11008, 524288),
        "Qwen2-7B-Instruct": (28, 28, 4, 128, 18944, 57344),
        "Qwen2.5-7B-Instruct": (28, 28, 4, 128, 18944, 57344),
        "Qwen2.5-0.5B-Instruct": (24, 14, 2, 64, 4864, 12288),
        "Qwen2.5-72B-Instruct": (80, 64, 8, 128, 29568, 327680),
        "Qwen3-8B": (36, 32, 8, 128, 12288, 147456),
    }
    assert set(shipped_configs()) == set(geometry)
    for name, (layers, heads, kv, dim, ffn, kv_bytes) in geometry.items():
        s = sizing.shape_of(name)
        assert s.name == name
        assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == (layers, heads, kv, dim)
        assert s.intermediate_size == ffn
        assert sizing.kv_bytes_per_token(s) == kv_bytes
    assert sizing.shape_of("Qwen2.5-0.5B-Instruct").tie_word_embeddings
    assert sizing.shape_of("Qwen3-8B").qk_norm
    assert not sizing.shape_of("Qwen3-8B").qkv_bias
    assert sizing.shape_of("Qwen-7B-Chat").params == 7721324544


# --------------------------------------------------------------------------- published numbers

# Qwen2.5 Speed Benchmark, transformers on one A100 80GB, batch 1, generating 2048 tokens:
# GPU memory (GB = GiB, torch.cuda.max_memory_allocated / 1024**3) by input length.
# Source: QwenLM/Qwen2.5 docs/source/benchmark/speed_benchmark.rst (commit a912d23, 2024-11-06),
# https://qwen.readthedocs.io/en/v2.5/benchmark/speed_benchmark.html
QWEN25_SPEED_BENCHMARK = [
    ("Qwen2.5-0.5B-Instruct", "bf16", 1, 0.97),
    ("Qwen2.5-0.5B-Instruct", "int4_gptq", 1, 0.48),
    ("Qwen2.5-0.5B-Instruct", "bf16", 6144, 1.23),
    ("Qwen2.5-7B-Instruct", "bf16", 1, 14.38),
    ("Qwen2.5-7B-Instruct", "int4_gptq", 1, 5.52),
    ("Qwen2.5-7B-Instruct", "int4_awq", 1, 5.39),
    ("Qwen2.5-7B-Instruct", "bf16", 6144, 15.38),
    ("Qwen2.5-7B-Instruct", "int4_gptq", 6144, 6.52),
    ("Qwen2.5-7B-Instruct", "int4_awq", 6144, 6.39),
    ("Qwen2.5-72B-Instruct", "bf16", 1, 136.20),
    ("Qwen2.5-72B-Instruct", "int4_gptq", 1, 39.91),
    ("Qwen2.5-72B-Instruct", "int4_awq", 1, 39.44),
]
# Left out: Qwen2.5-0.5B-Instruct AWQ (0.68 GiB, 70% of its BF16 figure). At 0.5B the AutoAWQ
# run holds buffers beyond weights + KV + activations that this rule does not model.


@pytest.mark.parametrize(("name", "mode", "prompt", "published"), QWEN25_SPEED_BENCHMARK)
def test_matches_qwen25_published_gpu_memory_within_10_percent(name, mode, prompt, published):
    # max_memory_allocated holds weights, the KV cache and the prefill's activations, but
    # not the CUDA context / workspaces (our runtime reserve), so that is left out here.
    est = sizing.estimate(name, mode, context=prompt + 2048, max_num_tokens=prompt)
    ours = (est.weight_bytes + est.kv_bytes + est.activation_bytes) / GIB
    assert ours == pytest.approx(published, rel=0.10)


# The seed project's table (Qwen-TensorRT-LLM README, "软硬件要求", 7B = Qwen-7B-Chat, with its
# default build: max_batch_size 2, 2048 input + 2048 output tokens): GPU memory and disk (GB).
SEED_7B = {"fp16": (21, 42), "int8_wo": (14, 28), "int4_wo": (10, 21), "int4_gptq": (10, 16)}


@pytest.mark.parametrize("mode", SEED_7B)
def test_matches_seed_table_gpu_within_15_and_disk_within_25_percent(mode):
    gpu_gb, disk_gb = SEED_7B[mode]
    est = sizing.estimate("Qwen-7B-Chat", mode, batch=2, context=4096, max_num_tokens=4096)
    assert est.build_gpu_bytes / GIB == pytest.approx(gpu_gb, rel=0.15)
    assert est.build_disk_bytes / GIB == pytest.approx(disk_gb, rel=0.25)


# --------------------------------------------------------------------------- unsupported


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpu": "A100 80GB", "mode": "fp8"}, r"FP8 needs compute capability >= 8\.9"),
        ({"gpu": "RTX 3090", "mode": "bf16", "kv_dtype": "fp8"}, r"fp8 KV cache needs"),
        ({"gpu": "T4", "mode": "fp16"}, r"Turing.*not supported by TensorRT-LLM 1\.x"),
        ({"gpu": "V100 32GB", "mode": "fp16"}, r"Volta.*TensorRT 10\.5"),
        ({"gpu": "RTX 4090", "mode": "int4_gptq", "group_size": 32}, r"64 and 128 only"),
        ({"gpu": "RTX 4090", "mode": "int4_gptq", "backend": "pytorch"}, r"engine path"),
        ({"gpu": "RTX 4090", "backend": "onnx"}, r"backend must be one of \('engine', 'pytorch'\)"),
    ],
)
def test_unsupported_modes_say_why(kwargs, message):
    with pytest.raises(sizing.SizingError, match=message):
        sizing.verdict("Qwen2.5-7B-Instruct", **kwargs)


def test_unknown_gpus_are_sizing_errors():
    with pytest.raises(sizing.SizingError, match=r"Close: RTX 4090"):
        sizing.verdict(TOY, "RTX 4900")
    with pytest.raises(sizing.SizingError, match=r"machine\.GpuSpec"):
        sizing.verdict(TOY, "Voodoo 5 6000")


def test_gptq_group_must_divide_each_gpus_inputs():
    # Qwen2.5-72B's MLP width 29568 = 231 x 128: split over 2 or 8 GPUs, down_proj's inputs
    # per GPU are no longer whole groups. (Qwen's GPTQ-Int4 72B checkpoint pads it to 29696.)
    with pytest.raises(sizing.SizingError, match="down_proj: 3696 inputs per GPU"):
        sizing.verdict("Qwen2.5-72B-Instruct", "H100 80GB", "int4_gptq", tp=8)
    with pytest.raises(sizing.SizingError, match="down_proj: 14784 inputs per GPU"):
        sizing.verdict("Qwen2.5-72B-Instruct", "H100 80GB", "int4_gptq", tp=2)
    padded = {**load_config("Qwen2.5-72B-Instruct"), "intermediate_size": 29696}
    assert sizing.verdict(padded, "H100 80GB", "int4_gptq", tp=8).fits
    assert sizing.verdict("Qwen2.5-72B-Instruct", "H100 80GB", "int4_gptq").fits  # tp=1: 80 GB


def test_gptq_act_order_checkpoint_is_rejected():
    cfg = load_config("Qwen2.5-7B-Instruct")
    cfg["quantization_config"] = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 128,
        "desc_act": True,
    }
    with pytest.raises(sizing.SizingError, match="desc_act"):
        sizing.verdict(cfg, "RTX 4090")


def test_mode_from_checkpoint_and_registry_names():
    cfg = load_config("Qwen2.5-7B-Instruct")
    assert sizing._mode_of(sizing.shape_of(cfg)).name == "bf16"
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 64}
    mode = sizing._mode_of(sizing.shape_of(cfg))
    assert (mode.name, mode.group_size, mode.label) == ("int4_gptq", 64, "INT4 GPTQ g64")
    gptq_ckpt = sizing.shape_of("Qwen2.5-7B-Instruct-GPTQ-Int4")  # Qwen's published checkpoint
    assert sizing._mode_of(gptq_ckpt).label == "INT4 GPTQ g128"
    assert gptq_ckpt.name == "Qwen2.5-7B-Instruct-GPTQ-Int4" and gptq_ckpt.num_layers == 28
    assert sizing._mode_of(sizing.shape_of("Qwen2.5-7B-Instruct-AWQ")).name == "int4_awq"
    assert sizing._mode_of(sizing.shape_of("Qwen2.5-0.5B-Instruct")).name == "bf16"
    plan = sizing.verdict("Qwen2.5-7B-Instruct-GPTQ-Int4", "RTX 4090")
    assert plan.estimate.mode == "int4_gptq" and plan.fits
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "bits": 4}
    with pytest.raises(sizing.SizingError, match="explicit mode"):
        sizing.estimate(cfg)


# --------------------------------------------------------------------------- does not fit


def test_does_not_fit_suggests_tensor_parallel():
    with pytest.raises(sizing.SizingError) as info:
        sizing.verdict("Qwen2.5-72B-Instruct", "RTX 4090", "bf16", context=4096)
    assert "even at batch 1" in str(info.value) and "What would fit:" in str(info.value)
    assert "--tp_size 8" in str(info.value)


def test_does_not_fit_suggests_a_smaller_mode_and_more_gpus():
    # 7B in bf16 (14.2 GiB of weights) plus runtime does not leave room on a 16 GB card.
    with pytest.raises(sizing.SizingError) as info:
        sizing.verdict("Qwen2.5-7B-Instruct", "RTX 4080", "bf16", context=4096)
    text = str(info.value).split("What would fit:")[1]
    assert "--tp_size 2" in text
    assert "smaller mode" in text and "fp8" in text  # the 4080 is an Ada card: fp8 runs


def test_table_never_raises_for_modes_and_marks_them():
    rows = {r["mode"]: r for r in sizing.table("Qwen2.5-7B-Instruct", gpu="A100 80GB", batch=4)}
    assert set(rows) == set(sizing._MODES)
    assert rows["fp8"]["status"].startswith("unsupported: ")
    assert rows["int4_gptq"]["status"] == "fits" and rows["int4_gptq"]["max_batch"] > 4
    t4 = sizing.table("Qwen2.5-0.5B-Instruct", gpu="T4")
    assert all(r["status"].startswith("unsupported") for r in t4)
    plain = sizing.table("Qwen2.5-0.5B-Instruct")
    assert "status" not in plain[0] and plain[0]["weights_gib"] > 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"model_type": "qwen2", "hidden_size": 64},
            "lacks positive whole numbers for num_attention_heads",
        ),
        ({**TOY, "model_type": ""}, "model_type '' is not one this estimator knows"),
        ({**TOY, "model_type": "gpt_neox"}, "gpt_neox.*not one this estimator knows"),
        ({**TOY, "model_type": "qwen2_moe", "num_experts": 60}, "mixture-of-experts"),
        ({**TOY, "num_key_value_heads": 3}, "cannot share 3 KV heads"),
        ({**TOY, "hidden_size": "64"}, "whole numbers for hidden_size"),
        ({**TOY, "num_hidden_layers": 0}, "num_hidden_layers"),
        (
            {k: v for k, v in TOY.items() if k != "max_position_embeddings"},
            "max_position_embeddings",
        ),
    ],
)
def test_bad_configs_are_sizing_errors(config, message):
    with pytest.raises(sizing.SizingError, match=message):
        sizing.estimate(config)


def test_bad_sources_and_arguments(tmp_path: Path):
    with pytest.raises(sizing.SizingError, match="not a shipped config"):
        sizing.estimate("Qwen9-1T")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(sizing.SizingError, match="Expecting property name"):
        sizing.verdict(tmp_path, "RTX 4090")
    with pytest.raises(sizing.SizingError, match="unknown mode 'int3'"):
        sizing.estimate(TOY, "int3")
    with pytest.raises(sizing.SizingError, match="longer than the model's 256"):
        sizing.estimate(TOY, context=1024)
    with pytest.raises(sizing.SizingError, match="tp=3"):
        sizing.estimate(TOY, tp=3)
    with pytest.raises(sizing.SizingError, match="batch must be a positive"):
        sizing.estimate(TOY, batch=0)
    with pytest.raises(sizing.SizingError, match="kv_dtype"):
        sizing.estimate(TOY, kv_dtype="int2")
    with pytest.raises(sizing.SizingError, match="no group size"):
        sizing.get_mode("bf16", group_size=64)
    with pytest.raises(sizing.SizingError, match="kv_fraction"):
        sizing.verdict(TOY, "RTX 4090", kv_fraction=0)


# --------------------------------------------------------------------------- notebook 04 commands

FLAGS = json.loads((Path(sizing.__file__).parent / "data" / "trtllm_flags.json").read_text())


def _notebook_code() -> list[dict]:
    if NOTEBOOK is None:
        pytest.skip("notebook 04 is not present")
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


def _command_builders() -> dict:
    cells = [c for c in _notebook_code() if "trtllm-commands" in c["metadata"].get("tags", [])]
    assert len(cells) == 1, "notebook 04 has one cell tagged trtllm-commands"
    namespace: dict = {}
    exec(compile("".join(cells[0]["source"]), "trtllm-commands", "exec"), namespace)
    return namespace


def _tool_and_flags(argv: list[str]) -> tuple[str, list[tuple[str, str | None]]]:
    """The TensorRT-LLM tool an argv runs and its (flag, value) pairs (mpirun's own skipped)."""
    for i, word in enumerate(argv):
        tool = Path(word).name
        if tool in FLAGS["tools"]:
            rest = argv[i + 1 :]
            pairs = []
            for j, w in enumerate(rest):
                if w.startswith("--"):
                    value = (
                        rest[j + 1]
                        if j + 1 < len(rest) and not rest[j + 1].startswith("--")
                        else None
                    )
                    pairs.append((w, value))
            return tool, pairs
    raise AssertionError(f"no known TensorRT-LLM tool in {shlex.join(argv)}")


def _check(argv: list[str]) -> str:
    tool, pairs = _tool_and_flags(argv)
    spec = FLAGS["tools"][tool]
    for flag, value in pairs:
        assert flag in spec["flags"], f"{tool} {flag} is not in the verified flag table"
        if flag in spec.get("choices", {}):
            assert value in spec["choices"][flag], f"{tool} {flag} {value}"
    return tool


@pytest.mark.parametrize("mode", list(sizing._MODES))
@pytest.mark.parametrize("tp", [1, 2])
def test_engine_commands_use_only_verified_flags(mode, tp):
    ns = _command_builders()
    for kv in ("auto", "int8", "fp8"):
        if mode == "int4_gptq" and kv == "fp8":
            with pytest.raises(ValueError, match="kv_cache='int8'"):
                ns["engine_commands"]("./model", mode, tp=tp, kv_cache=kv)
            continue
        steps = ns["engine_commands"]("./model", mode, tp=tp, kv_cache=kv)
        tools = [_check(argv) for argv in steps.values()]
        assert tools[1:] == ["trtllm-build", "run.py"]
        assert tools[0] in ("convert_checkpoint.py", "quantize.py")


def test_gptq_engine_command_is_the_documented_one():
    steps = _command_builders()["engine_commands"]("./Qwen2.5-7B-Instruct-GPTQ-Int4", "int4_gptq")
    convert = shlex.join(steps["convert"])
    assert (
        "--use_weight_only --weight_only_precision int4_gptq --per_group --group_size 128"
        in convert
    )
    assert "--dtype float16" in convert and "models/core/qwen/convert_checkpoint.py" in convert


def test_serve_commands_use_only_verified_flags_and_loopback():
    ns = _command_builders()
    for kwargs in ({}, {"backend": "tensorrt", "tokenizer": "./hf", "tp": 2}):
        argv = ns["serve_command"]("./model", **kwargs)
        assert _check(argv) == "trtllm-serve"
        assert argv[argv.index("--host") + 1] == "127.0.0.1"


@pytest.mark.parametrize("mode", list(sizing._MODES))
def test_pytorch_route_commands_use_only_verified_flags(mode):
    """The route that stays after 1.2: serve a Hugging Face checkpoint, after a ModelOpt
    export for fp8/AWQ; GPTQ, weight-only int8 and SmoothQuant have no PyTorch-backend route."""
    build = _command_builders()["pytorch_commands"]
    for kv in ("auto", "int8", "fp8"):
        if mode not in sizing._PYTORCH_MODES or kv == "int8":
            with pytest.raises(ValueError, match="engine route"):
                build("./model", mode, kv_cache=kv)
            continue
        steps = build("./model", mode, kv_cache=kv, tp=2, max_num_tokens=2048)
        assert [_check(argv) for argv in steps.values()][-1] == "trtllm-serve"
        serve = steps["serve"]
        assert serve[serve.index("--backend") + 1] == "pytorch" and "--tokenizer" not in serve
        assert serve[serve.index("--max_num_tokens") + 1] == "2048"
        if mode in ("bf16", "fp16") and kv == "auto":
            assert list(steps) == ["serve"] and serve[1] == "./model", "no conversion, no build"
        else:
            quantize = steps["quantize"]
            assert _check(quantize) == "quantize.py"
            assert quantize[quantize.index("--export_format") + 1] == "hf"
            assert serve[1] == quantize[quantize.index("--output_dir") + 1]


def test_notebook_code_cells_compile_and_use_verified_api_names():
    import ast

    api = {name.split(".")[-1]: set(entry["names"]) for name, entry in FLAGS["python_api"].items()}
    seen = set()
    for i, cell in enumerate(_notebook_code()):
        tree = ast.parse(
            compile("".join(cell["source"]), f"04 code cell {i}", "exec", ast.PyCF_ONLY_AST)
        )
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = (
                    node.func.id
                    if isinstance(node.func, ast.Name)
                    else getattr(node.func, "attr", "")
                )
                if func in api:
                    seen.add(func)
                    unknown = {k.arg for k in node.keywords} - api[func]
                    assert not unknown, f"{func}({', '.join(sorted(unknown))}) is not verified"
    assert seen == {"LLM", "KvCacheConfig", "SamplingParams"}


def test_pinned_version_is_the_same_everywhere():
    version = FLAGS["version"]
    reqs = (ROOT / "requirements" / "trtllm-gpu.txt").read_text()
    assert f"tensorrt-llm=={version}" in reqs
    params = "".join(_notebook_code()[0]["source"])
    assert f'TRTLLM_VERSION = "{version}"' in params
