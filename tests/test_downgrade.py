"""labhelpers.downgrade: transformers-5 model folders adapted for transformers 4.37.

Pure JSON work: these tests run in every environment (core and ipex). The ones that load the
adapted copy with transformers 4.37 itself are in tests/ipex/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from labhelpers import downgrade
from labhelpers.downgrade import (
    NotAModelDirError,
    adapt_config,
    adapt_tokenizer_config,
    adapt_tokenizer_json,
    for_transformers_4_37,
    is_current,
)

TF5_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "dtype": "bfloat16",
    "hidden_size": 64,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "layer_types": ["full_attention"] * 2,
}
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}{% endfor %}"


def test_config_gets_rope_theta_and_torch_dtype():
    out = adapt_config(TF5_CONFIG)
    assert out["rope_theta"] == 1000000.0
    assert out["torch_dtype"] == "bfloat16"
    assert "rope_parameters" not in out and "dtype" not in out and "layer_types" not in out
    assert "rope_scaling" not in out  # default rope has no scaling
    assert TF5_CONFIG["dtype"] == "bfloat16", "the input is not modified"


def test_config_keeps_rope_scaling_of_non_default_rope():
    cfg = {**TF5_CONFIG, "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4}}
    out = adapt_config(cfg)
    assert out["rope_scaling"] == {"rope_type": "yarn", "factor": 4}


def test_config_from_older_transformers_passes_through():
    old = {"model_type": "qwen2", "rope_theta": 1e6, "torch_dtype": "bfloat16"}
    assert adapt_config(old) == old


def test_config_without_any_rope_gets_the_4_37_default():
    assert adapt_config({"model_type": "qwen2"})["rope_theta"] == downgrade.DEFAULT_ROPE_THETA


def test_tokenizer_config_gets_class_and_template():
    tf5 = {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers", "eos_token": "x"}
    out = adapt_tokenizer_config(tf5, TEMPLATE)
    assert out["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert out["chat_template"] == TEMPLATE
    assert "backend" not in out and out["eos_token"] == "x"


def test_tokenizer_config_keeps_its_own_class_and_template():
    own = {"tokenizer_class": "Qwen2Tokenizer", "chat_template": "mine"}
    assert adapt_tokenizer_config(own, TEMPLATE) == own


def test_bpe_merges_become_strings():
    tok = {"model": {"type": "BPE", "merges": [["Ġ", "t"], ["i", "n"]], "ignore_merges": False}}
    out = adapt_tokenizer_json(tok)
    assert out["model"]["merges"] == ["Ġ t", "i n"]
    assert "ignore_merges" not in out["model"]
    assert tok["model"]["merges"][0] == ["Ġ", "t"], "the input is not modified"


def test_bpe_merges_already_strings_or_not_bpe_pass_through():
    old = {"model": {"type": "BPE", "merges": ["a b"]}}
    assert adapt_tokenizer_json(old) is old
    wp = {"model": {"type": "WordPiece"}}
    assert adapt_tokenizer_json(wp) is wp


def test_merge_with_a_space_cannot_be_written_in_the_old_format():
    with pytest.raises(ValueError, match="tokenizers>=0.20"):
        adapt_tokenizer_json({"model": {"type": "BPE", "merges": [["a b", "c"]]}})


def _tf5_folder(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(TF5_CONFIG))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "TokenizersBackend"})
    )
    (folder / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "BPE", "merges": [["a", "b"]]}})
    )
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    return folder


def test_copy_adapts_links_weights_and_never_touches_the_original(tmp_cache: Path, tmp_path):
    src = _tf5_folder(tmp_path / "m")
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    lines: list[str] = []
    dest = for_transformers_4_37(src, log=lines.append)
    assert dest == tmp_cache / "transformers-4.37" / "m"
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before
    assert json.loads((dest / "config.json").read_text())["rope_theta"] == 1000000.0
    assert json.loads((dest / "tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    assert json.loads((dest / "tokenizer.json").read_text())["model"]["merges"] == ["a b"]
    weights = dest / "model.safetensors"
    assert weights.is_symlink() and os.path.samefile(weights, src / "model.safetensors")
    assert "rewrote config.json, tokenizer.json, tokenizer_config.json" in lines[0]
    assert is_current(src, dest)


def test_copy_is_reused_then_rebuilt_when_the_source_changes(tmp_cache: Path, tmp_path):
    src = _tf5_folder(tmp_path / "m")
    lines: list[str] = []
    dest = for_transformers_4_37(src, log=lines.append)
    for_transformers_4_37(src, log=lines.append)
    assert "up to date" in lines[1]
    (src / "config.json").write_text(json.dumps({**TF5_CONFIG, "hidden_size": 128}))
    os.utime(src / "config.json", (1, 1))
    assert not is_current(src, dest)
    for_transformers_4_37(src, log=lines.append)
    assert json.loads((dest / "config.json").read_text())["hidden_size"] == 128
    assert not [p for p in dest.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_bad_input_gets_a_clear_error(tmp_cache: Path, tmp_path):
    with pytest.raises(NotAModelDirError, match="no config.json"):
        for_transformers_4_37(tmp_path)
    src = _tf5_folder(tmp_path / "m")
    with pytest.raises(ValueError, match="never modified"):
        for_transformers_4_37(src, dest=src)
