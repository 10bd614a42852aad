"""labhelpers.lowbit: format checks, save_low_bit folders, kernel-build detection, RAM checks.

No ipex_llm needed: these run in every environment. tests/ipex/ checks them against the real
library in the IPEX-LLM environment.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labhelpers import lowbit
from labhelpers.lowbit import (
    LowBitFormatError,
    NotALowBitFolderError,
    best_build_for,
    check_format,
    check_low_bit_folder,
    check_ram_for_load,
    explain_kernel_choice,
    loaded_kernel_libraries,
    parameter_count,
)
from labhelpers.models import NotEnoughResourcesError

STANDIN = {"hidden_size": 576, "intermediate_size": 1536}  # the course stand-in
WIDE = {"hidden_size": 1536, "intermediate_size": 8960}  # Qwen2.5-1.5B


@pytest.mark.parametrize("fmt", list(lowbit.CPU_FORMATS))
def test_cpu_formats_pass(fmt: str):
    assert check_format(fmt, STANDIN) == fmt
    assert check_format(fmt.upper()) == fmt


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "fp8"])
def test_gpu_only_formats_are_refused_on_cpu_with_an_alternative(fmt: str):
    with pytest.raises(LowBitFormatError, match="Intel GPUs.*sym_int4"):
        check_format(fmt, STANDIN)
    assert check_format(fmt, STANDIN, device="xpu") == fmt


@pytest.mark.parametrize("fmt", ["fp6", "mixed_fp4"])
def test_formats_that_abort_the_process_are_never_offered_on_cpu(fmt: str):
    with pytest.raises(LowBitFormatError, match="aborts the whole Python process"):
        check_format(fmt, WIDE)


def test_k_quants_need_widths_divisible_by_256():
    with pytest.raises(LowBitFormatError, match=r"hidden_size=576 \(576 % 256 = 64\)"):
        check_format("q4_k", STANDIN)
    assert check_format("q4_k", {"hidden_size": 1024, "intermediate_size": 4096}) == "q4_k"
    assert check_format("q6_k", WIDE) == "q6_k"  # Qwen2.5-1.5B: 1536 and 8960 are multiples
    with pytest.raises(LowBitFormatError, match=r"intermediate_size=2800 \(2800 % 256 = 240\)"):
        check_format("q6_k", {"hidden_size": 1024, "intermediate_size": 2800})
    with pytest.raises(LowBitFormatError, match="pass the model's config"):
        check_format("q5_k")


def test_unknown_format_lists_the_cpu_formats():
    with pytest.raises(LowBitFormatError, match="not an ipex-llm low-bit format.*sym_int4"):
        check_format("int3")


def test_low_bit_folder_checks(tmp_path: Path):
    with pytest.raises(NotALowBitFolderError, match="does not exist.*save_low_bit"):
        check_low_bit_folder(tmp_path / "missing")
    with pytest.raises(NotALowBitFolderError, match="no config.json"):
        check_low_bit_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    with pytest.raises(NotALowBitFolderError, match="ordinary.*load_in_low_bit"):
        check_low_bit_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"bigdl_transformers_low_bit": "sym_int4"}))
    with pytest.raises(NotALowBitFolderError, match="no weights"):
        check_low_bit_folder(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    assert check_low_bit_folder(tmp_path) == "sym_int4"


def test_kernel_build_choice():
    assert (
        best_build_for({"avx", "avx2", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})
        == "avx512"
    )
    assert best_build_for({"avx", "avx2", "avx_vnni"}) == "avxvnni"
    assert best_build_for({"avx", "avx2", "amx_tile", "amx_int8"}) == "amx"
    assert best_build_for({"avx"}) == "avx"
    amd = explain_kernel_choice("avx", "AuthenticAMD", {"avx", "avx2"})
    assert "'avx2'" in amd and "GenuineIntel" in amd
    assert "best build" in explain_kernel_choice("avx2", "GenuineIntel", {"avx", "avx2"})
    assert "mapped yet" in explain_kernel_choice(None, "GenuineIntel", {"avx"})


def test_no_kernel_library_in_a_process_without_ipex():
    import subprocess

    proc = subprocess.Popen(["sleep", "10"])
    try:
        assert loaded_kernel_libraries(proc.pid) == []
    finally:
        proc.kill()
        proc.wait()
    assert loaded_kernel_libraries(pid=2**30) == []


def test_parameter_count_and_ram_check(tmp_path: Path):
    import numpy as np
    from safetensors.numpy import save_file

    save_file(
        {"a": np.zeros((10, 20), np.float16), "b": np.zeros(5, np.float16)},
        str(tmp_path / "model.safetensors"),
    )
    assert parameter_count(tmp_path) == 205
    need = check_ram_for_load(tmp_path, available_gb=1.0)
    assert 0.5 < need < 0.6
    with pytest.raises(NotEnoughResourcesError, match="32 bits per weight.*save_low_bit"):
        check_ram_for_load(tmp_path, available_gb=0.1)
    with pytest.raises(FileNotFoundError):
        parameter_count(tmp_path / "nothing")


def test_bench_subprocess_reports_a_refused_format_as_an_error_row(tmp_path: Path):
    from labhelpers import lowbit_bench

    (tmp_path / "config.json").write_text(json.dumps(STANDIN | {"model_type": "qwen2"}))
    row = lowbit_bench.measure_in_subprocess(tmp_path, "q4_k", timeout_s=120)
    assert row["format"] == "q4_k"
    assert "exit code 1" in row["error"] and "GGML_ASSERT" in row["error"]


def test_bench_cli_arguments():
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "labhelpers.lowbit_bench", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for flag in ("--model", "--format", "--convert-to", "--low-bit-dir", "--eval-tokens"):
        assert flag in run.stdout
