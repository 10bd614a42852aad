"""labhelpers.standin: the offline stand-in models (real GGUF, real conversion)."""

from __future__ import annotations

import json

import pytest

from labhelpers import models, standin

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def original():
    return standin.load_original(torch.float32)


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


def test_conversion_rejects_a_mismatched_model(original):
    llama, _ = original
    broken = type(llama)(llama.config)
    broken.model.layers = broken.model.layers[:29]  # drop a layer: names no longer line up
    broken.config.num_hidden_layers = 31
    with pytest.raises(standin.StandinError, match="mismatch"):
        standin.llama_to_qwen2(broken)


def test_built_standin_is_labelled_and_answers():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = standin.build_standin()  # built by set-up; idempotent
    assert standin.is_built(standin.STANDIN)
    models.validate_model_dir(path)
    assert "NOT QWEN" in (path / "README.md").read_text()
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["dtype"] == "bfloat16"
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert prompt.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    inputs = tok(prompt, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_gptq_standin_is_a_standard_gptq_checkpoint():
    path = standin.standin_dir(standin.STANDIN_GPTQ)
    if not standin.is_built(standin.STANDIN_GPTQ):
        pytest.skip("standin-gptq-int4 not built: run ./course setup (takes ~3 min)")
    models.validate_model_dir(path)
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "gptq" and qcfg["bits"] == 4 and qcfg["group_size"] == 64
    assert qcfg["sym"] is True and qcfg["desc_act"] is False
    assert qcfg.get("checkpoint_format", "gptq") == "gptq"
    from safetensors import safe_open

    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names |= set(f.keys())
    assert "model.layers.0.self_attn.q_proj.qweight" in names
    assert "model.layers.0.self_attn.q_proj.scales" in names
    assert "NOT QWEN" in (path / "README.md").read_text()


def test_unknown_standin_name():
    with pytest.raises(ValueError, match="unknown stand-in"):
        standin.standin_dir("qwen")


def test_missing_gguf_package_gives_setup_hint(monkeypatch):
    monkeypatch.setattr(standin, "GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(standin.StandinError, match="./course setup"):
        standin.gguf_source()
