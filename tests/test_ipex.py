"""labhelpers.ipex without ipex_llm: the transformers-4.37 copy, format and folder checks, kernel
builds, the RAM check. These run in every environment; tests/ipex/ checks them against the
real library inside the IPEX-LLM environment (tests/test_ipex_env.py starts it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from labhelpers import ipex, models
from labhelpers.ipex import LowBitFormatError, NotALowBitFolderError, check_format
from labhelpers.machine import NotEnoughResourcesError

TF5_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "dtype": "bfloat16",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 2,
    "vocab_size": 100,
    "max_position_embeddings": 8192,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "layer_types": ["full_attention"] * 2,
}
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}{% endfor %}"
WIDE = {**TF5_CONFIG, "hidden_size": 1536, "intermediate_size": 8960}  # Qwen2.5-1.5B's widths


def tf5_folder(folder: Path, config: dict | None = None, **files: object) -> Path:
    """A model folder as transformers 5 writes it (weights are placeholder bytes)."""
    folder.mkdir(parents=True)
    contents = {
        "config.json": config or TF5_CONFIG,
        "tokenizer_config.json": {
            "tokenizer_class": "TokenizersBackend",
            "backend": "tokenizers",
            "eos_token": "x",
        },  # noqa: E501
        "tokenizer.json": {
            "model": {"type": "BPE", "merges": [["Ġ", "t"], ["a", "b"]], "ignore_merges": False}
        },  # noqa: E501
        "chat_template.jinja": TEMPLATE,
        "model.safetensors": b"\0" * 1024,
        **files,
    }
    for name, value in contents.items():
        if isinstance(value, bytes):
            (folder / name).write_bytes(value)
        else:
            (folder / name).write_text(value if isinstance(value, str) else json.dumps(value))
    return folder


def read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


# --------------------------------------------------------------------------- transformers 4.37


def test_the_copy_rewrites_what_4_37_misreads_and_links_the_weights(
    tmp_cache: Path, tmp_path: Path
):
    src = tf5_folder(tmp_path / "m")
    before = {f.name: f.read_bytes() for f in src.iterdir()}
    lines: list[str] = []
    dest = ipex.for_transformers_4_37(src, log=lines.append)
    assert dest == tmp_cache / "transformers-4.37" / "m"
    assert {f.name: f.read_bytes() for f in src.iterdir()} == before, "the original is untouched"
    config = read(dest, "config.json")
    assert config["rope_theta"] == 100000.0, (
        "without it 4.37 silently uses 10000 and talks nonsense"
    )
    assert config["torch_dtype"] == "bfloat16"
    assert not {"rope_parameters", "dtype", "layer_types", "rope_scaling"} & set(config)
    tok_config = read(dest, "tokenizer_config.json")
    assert tok_config == {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "x",
        "chat_template": TEMPLATE,
    }  # noqa: E501
    assert read(dest, "tokenizer.json") == {"model": {"type": "BPE", "merges": ["Ġ t", "a b"]}}
    weights = dest / "model.safetensors"
    assert weights.is_symlink() and os.path.samefile(weights, src / "model.safetensors")
    assert (dest / "chat_template.jinja").read_text() == TEMPLATE
    assert "rewrote config.json, tokenizer.json, tokenizer_config.json" in lines[0]


def test_non_default_rope_keeps_its_scaling_and_old_folders_pass_through(tmp_cache, tmp_path: Path):
    yarn = {**TF5_CONFIG, "rope_parameters": {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4}}
    dest = ipex.for_transformers_4_37(tf5_folder(tmp_path / "yarn", yarn), log=lambda _: None)
    assert read(dest, "config.json")["rope_scaling"] == {"rope_type": "yarn", "factor": 4}
    old = {"model_type": "qwen2", "rope_theta": 1e6, "torch_dtype": "bfloat16"}
    own_tok = {"tokenizer_class": "Qwen2Tokenizer", "chat_template": "mine"}
    lines: list[str] = []
    src = tf5_folder(
        tmp_path / "old",
        old,
        **{
            "tokenizer_config.json": own_tok,
            "tokenizer.json": {"model": {"type": "BPE", "merges": ["a b"]}},
        },
    )
    dest = ipex.for_transformers_4_37(src, log=lines.append)
    assert read(dest, "config.json") == old and read(dest, "tokenizer_config.json") == own_tok
    assert "rewrote nothing" in lines[0]
    no_rope = ipex.for_transformers_4_37(
        tf5_folder(tmp_path / "bare", {"model_type": "qwen2"}), log=print
    )
    assert read(no_rope, "config.json")["rope_theta"] == 10000.0


def test_a_merge_with_a_space_cannot_be_written_in_the_old_format(tmp_cache, tmp_path: Path):
    src = tf5_folder(
        tmp_path / "m", **{"tokenizer.json": {"model": {"type": "BPE", "merges": [["a b", "c"]]}}}
    )
    with pytest.raises(ValueError, match="tokenizers >= 0.20"):
        ipex.for_transformers_4_37(src, log=lambda _: None)
    assert not (tmp_cache / "transformers-4.37" / "m").exists(), "nothing half-written"


def test_the_copy_is_reused_then_rebuilt_when_the_source_changes(tmp_cache: Path, tmp_path: Path):
    src = tf5_folder(tmp_path / "m")
    lines: list[str] = []
    dest = ipex.for_transformers_4_37(src, log=lines.append)
    ipex.for_transformers_4_37(src, log=lines.append)
    assert "up to date" in lines[1]
    (src / "config.json").write_text(json.dumps({**TF5_CONFIG, "hidden_size": 128}))
    os.utime(src / "config.json", (1, 1))
    ipex.for_transformers_4_37(src, log=lines.append)
    assert "rewrote" in lines[2] and read(dest, "config.json")["hidden_size"] == 128
    assert not [p for p in dest.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_bad_input_gets_a_clear_error(tmp_cache: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="no config.json.*models.resolve"):
        ipex.for_transformers_4_37(tmp_path)
    src = tf5_folder(tmp_path / "m")
    with pytest.raises(ValueError, match="never modified"):
        ipex.for_transformers_4_37(src, dest=src)


# --------------------------------------------------------------------------- formats and folders


@pytest.mark.parametrize("fmt", list(ipex._CPU_FORMATS))
def test_cpu_formats_pass(fmt: str):
    assert check_format(fmt) == fmt
    assert check_format(f" {fmt.upper()} ", TF5_CONFIG) == fmt


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "fp8"])
def test_gpu_only_formats_are_refused_on_cpu_with_an_alternative(fmt: str):
    with pytest.raises(LowBitFormatError, match="Intel GPUs.*sym_int4"):
        check_format(fmt)
    assert check_format(fmt, device="xpu") == fmt


@pytest.mark.parametrize("fmt", ["fp6", "mixed_fp4"])
def test_formats_that_abort_the_process_are_never_offered_on_cpu(fmt: str):
    with pytest.raises(LowBitFormatError, match="aborts the whole Python process"):
        check_format(fmt, WIDE)


def test_k_quants_need_widths_divisible_by_256():
    with pytest.raises(LowBitFormatError, match=r"hidden_size=576 \(576 % 256 = 64\)"):
        check_format("q4_k", TF5_CONFIG)
    assert check_format("q6_k", WIDE) == "q6_k"  # 1536 and 8960 are multiples of 256
    with pytest.raises(LowBitFormatError, match=r"intermediate_size=2800 \(2800 % 256 = 240\)"):
        check_format("q6_k", {**WIDE, "hidden_size": 1024, "intermediate_size": 2800})
    with pytest.raises(LowBitFormatError, match="pass the model's config"):
        check_format("q5_k")


def test_unknown_format_lists_the_cpu_formats():
    with pytest.raises(LowBitFormatError, match="not an ipex-llm low-bit format.*sym_int4"):
        check_format("int3")


def test_low_bit_folder_checks(tmp_path: Path):
    with pytest.raises(NotALowBitFolderError, match="no config.json.*save_low_bit"):
        ipex.check_low_bit_folder(tmp_path / "missing")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(NotALowBitFolderError, match="ordinary model.*load_in_low_bit"):
        ipex.check_low_bit_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"bigdl_transformers_low_bit": "sym_int4"}))
    with pytest.raises(NotALowBitFolderError, match="no weights"):
        ipex.check_low_bit_folder(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert ipex.check_low_bit_folder(tmp_path) == "sym_int4"


def test_ram_check_before_loading(tmp_path: Path):
    import numpy as np
    from safetensors.numpy import save_file

    save_file(
        {"a": np.zeros((10, 20), np.float16), "b": np.zeros(5, np.float16)},
        str(tmp_path / "model.safetensors"),
    )  # noqa: E501
    check = models.check_fits_in_ram  # what notebook 03 calls before loading in fp32
    assert check(tmp_path, 4, available_gb=1.0) == pytest.approx(205 * 4 / 1e9 * 1.2 + 0.5)
    with pytest.raises(NotEnoughResourcesError, match="at 32 bits.*save_low_bit"):
        check(tmp_path, 4, available_gb=0.1)
    with pytest.raises(FileNotFoundError):
        check(tmp_path / "nothing", 4)


# --------------------------------------------------------------------------- kernel builds


def test_kernel_build_choice():
    avx512 = {"avx", "avx2", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    assert ipex._best_build_for(avx512) == "avx512"
    assert ipex._best_build_for({"avx", "avx2", "avx_vnni"}) == "avxvnni"
    assert ipex._best_build_for({"avx", "avx2", "amx_tile", "amx_int8"}) == "amx"
    assert ipex._best_build_for({"avx"}) == "avx"
    amd = ipex.explain_kernel_choice("avx", "AuthenticAMD", {"avx", "avx2"})
    assert "'avx2'" in amd and "GenuineIntel" in amd
    assert "best build" in ipex.explain_kernel_choice("avx2", "GenuineIntel", {"avx", "avx2"})
    assert "mapped yet" in ipex.explain_kernel_choice(None, "GenuineIntel", {"avx"})


MAPS = """
import mmap, sys, time
files = [open(p, "rb") for p in sys.argv[1:]]
maps = [mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) for f in files]
print("ready", flush=True)
time.sleep(30)
"""


def test_loaded_kernel_builds_are_read_from_the_process_memory_map(tmp_path: Path):
    libs = tmp_path / "site-packages" / "ipex_llm" / "libs"
    libs.mkdir(parents=True)
    names = ["libllama_avx2.so", "libbloom_avx2.so", "libgptneox_avx512.so", "libother.so"]
    for name in names:
        (libs / name).write_bytes(b"\x7fELF" + b"\0" * 4092)
    proc = subprocess.Popen(
        [sys.executable, "-c", MAPS, *(str(libs / n) for n in names)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        assert ipex.loaded_kernel_builds(proc.pid) == ["avx2", "avx512"]
    finally:
        proc.kill()
        proc.wait()
    assert ipex.loaded_kernel_builds(2**30) == [], "no such process"


# --------------------------------------------------------------------------- one format, measured


@pytest.mark.slow
def test_a_refused_format_comes_back_as_an_error_row_that_says_why(
    standin_path, monkeypatch, tmp_path
):
    """The worker refuses before ipex_llm is imported, so any interpreter shows it."""
    monkeypatch.setenv("QWEN_LAB_CACHE", str(tmp_path))  # the copy and the worker's log
    monkeypatch.setattr(ipex, "kernel_python", lambda *a: Path(sys.executable))
    lines: list[str] = []
    row = ipex.measure_format_in_env(standin_path, "q4_k", eval_ids=[1, 2, 3], log=lines.append)
    assert set(row) == {"format", "error"} and row["format"] == "q4_k"
    assert "LowBitFormatError" in row["error"] and "576 % 256" in row["error"]
