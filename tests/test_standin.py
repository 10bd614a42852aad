"""tools/standin.py: the offline stand-in models (the real GGUF, the real conversion, the
folders set-up built)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
from conftest import require

from labhelpers import models
from labhelpers.files import models_dir

standin = importlib.import_module("standin")  # tools/standin.py (conftest puts tools/ on sys.path)

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def original():
    return standin.load_original(torch.float32)


@pytest.mark.slow
def test_qwen2_copy_has_exactly_the_llama_logits(original):
    llama, tokenizer = original
    qwen = standin.llama_to_qwen2(llama)
    assert type(qwen).__name__ == "Qwen2ForCausalLM"
    assert qwen.config.num_hidden_layers == 30 and qwen.config.hidden_size == 576
    biases = [p for n, p in qwen.named_parameters() if n.endswith("q_proj.bias")]
    assert len(biases) == 30 and all(float(b.detach().abs().max()) == 0.0 for b in biases)
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        a = llama(**inputs).logits
        b = qwen(**inputs).logits
    assert a.shape == b.shape == (1, inputs["input_ids"].shape[1], 49152)
    assert float((a - b).abs().max()) == 0.0


@pytest.mark.slow
def test_conversion_rejects_a_mismatched_model(original):
    llama, _ = original
    broken = type(llama)(llama.config)
    broken.model.layers = broken.model.layers[:29]  # drop a layer: names no longer line up
    broken.config.num_hidden_layers = 31
    with pytest.raises(standin.StandinError, match="mismatch"):
        standin.llama_to_qwen2(broken)


@pytest.mark.slow
def test_built_standin_is_labelled_and_answers(standin_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models.validate_model_dir(standin_path)
    assert models.is_standin(standin_path)
    assert "NOT QWEN" in (standin_path / "README.md").read_text()
    config = json.loads((standin_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(standin_path)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(standin_path, dtype=torch.float32)
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.slow
def test_gptq_standin_is_a_standard_gptq_checkpoint():
    require(
        models.standin_built("standin-gptq-int4"),
        "standin-gptq-int4 is not built: run ./course setup",
    )
    path = models_dir() / "standin-gptq-int4"
    models.validate_model_dir(path)
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == 4 and qcfg["group_size"] == 64
    assert qcfg["sym"] is True and qcfg["desc_act"] is False
    assert qcfg.get("checkpoint_format", "gptq") == "gptq"
    tensors = models.safetensors_tensors(path)
    assert tensors["model.layers.0.self_attn.q_proj.qweight"][0] == "I32"
    assert tensors["model.layers.0.self_attn.q_proj.scales"][0] == "F16"
    assert tensors["model.norm.weight"][0] == "BF16", "unquantized tensors stored in bf16"
    assert "NOT QWEN" in (path / "README.md").read_text()


@pytest.mark.slow
def test_building_again_is_a_no_op(standin_path: Path, capsys):
    require(
        models.standin_built("standin-gptq-int4"),
        "standin-gptq-int4 is not built: run ./course setup",
    )
    stamps = {
        n: (models_dir() / n / models._STANDIN_STAMP).stat().st_mtime_ns
        for n in ("standin", "standin-gptq-int4")
    }
    assert standin.main([]) == 0
    out = capsys.readouterr().out
    assert "✓ standin already built" in out and "✓ standin-gptq-int4 already built" in out
    assert stamps == {
        n: (models_dir() / n / models._STANDIN_STAMP).stat().st_mtime_ns for n in stamps
    }


def test_missing_gguf_package_gives_setup_hint(monkeypatch, tmp_cache: Path):
    from labhelpers import gguf

    monkeypatch.setattr(gguf, "_STANDIN_PACKAGE", "no_such_package_xyz")
    with pytest.raises(standin.StandinError, match="./course setup"):
        standin.gguf_source()
    assert standin.main(["--only", "standin"]) == 1, "a clear error, not a traceback"
    assert not (models_dir() / "standin").exists()
