"""Run in the IPEX-LLM environment (.venvs/ipex, transformers 4.37): the adapted stand-in loads
and talks, labhelpers.ipex agrees with the real ipex-llm, and notebook 03's measurement runs.

tests/conftest.py leaves this folder out where ipex_llm is not installed; the core run starts
this folder in the IPEX-LLM environment (tests/test_ipex_env.py).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("IPEX_LLM_LAST_LM_HEAD", "0")

from labhelpers import ipex, models  # noqa: E402
from labhelpers.files import models_dir  # noqa: E402
from labhelpers.measure import heldout_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# What a worker in this environment imports (ipex.measure_format_in_env: notebook 03 and
# whichbackend's IPEX row; whichbackend itself runs in the core environment).
NEEDED_HERE = ["files", "machine", "envs", "models", "measure", "roofline", "ipex"]


@pytest.mark.parametrize("module", NEEDED_HERE)
def test_labhelpers_imports_here(module: str):
    run = subprocess.run(
        [sys.executable, "-c", f"import labhelpers.{module}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not models.standin_built("standin"):
        pytest.fail("the stand-in is not built: run ./course setup")
    dest = tmp_path_factory.mktemp("tf437") / "standin"
    return ipex.for_transformers_4_37(models_dir() / "standin", dest=dest, log=print)


@pytest.fixture(scope="module")
def tokenizer(adapted: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(adapted)


def test_this_is_the_ipex_environment():
    import transformers

    assert transformers.__version__ == "4.37.0"


def test_adapted_config_and_chat_template_load_in_4_37(adapted: Path, tokenizer: Any):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(adapted)
    assert config.rope_theta == 100000.0  # not 4.37's default of 10000
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(tokenizer(text).input_ids) == text


def _answer(model: Any, tokenizer: Any) -> str:
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def int4_model(adapted: Path) -> Any:
    from ipex_llm.transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(adapted, load_in_low_bit="sym_int4")


def test_sym_int4_answers_and_maps_one_kernel_build(int4_model: Any, tokenizer: Any):
    assert "Paris" in _answer(int4_model, tokenizer)
    builds = ipex.loaded_kernel_builds()
    assert len(builds) == 1 and set(builds) <= set(ipex._KERNEL_BUILDS)


def test_all_position_logits_makes_perplexity_possible(int4_model: Any, tokenizer: Any):
    import torch

    ipex._all_position_logits(int4_model)
    with torch.inference_mode():
        logits = int4_model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert logits.shape[:2] == (1, 5)


def test_save_low_bit_folder_passes_the_check_and_reloads(int4_model, tokenizer, tmp_path: Path):
    from ipex_llm.transformers import AutoModelForCausalLM

    int4_model.save_low_bit(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    assert ipex.check_low_bit_folder(tmp_path) == "sym_int4"
    reloaded = AutoModelForCausalLM.load_low_bit(str(tmp_path))
    assert _answer(reloaded, tokenizer) == _answer(int4_model, tokenizer)


def test_ordinary_folder_is_refused_by_both_the_check_and_ipex(adapted: Path):
    from ipex_llm.transformers import AutoModelForCausalLM

    with pytest.raises(ipex.NotALowBitFolderError, match="ordinary"):
        ipex.check_low_bit_folder(adapted)
    with pytest.raises(Exception, match="not a low-bit model"):
        AutoModelForCausalLM.load_low_bit(str(adapted))


def test_a_format_the_check_refuses_on_cpu_is_refused_by_ipex_too(adapted: Path):
    import torch
    from ipex_llm.transformers import AutoModelForCausalLM

    with pytest.raises(ipex.LowBitFormatError):
        ipex.check_format("nf4")
    with pytest.raises(Exception):  # noqa: B017 - ipex-llm raises its own error types
        AutoModelForCausalLM.from_pretrained(adapted, load_in_low_bit="nf4").generate(
            torch.tensor([[1, 2, 3]]), max_new_tokens=1
        )


def test_measure_format_gives_notebook_03s_row(tmp_path: Path, tokenizer: Any, int4_model: Any):
    """The in-process measurement (the job measure_format_in_env runs in a fresh process)."""
    ids = tokenizer(heldout_text())["input_ids"][:160]
    int4_model.save_low_bit(str(tmp_path / "saved"))
    lines: list[str] = []
    row = ipex.measure_format(
        str(models_dir() / "standin"),
        "sym_int4",
        max_new_tokens=8,
        repeats=1,
        eval_ids=ids,
        window=64,
        stride=32,
        low_bit_dir=str(tmp_path / "saved"),
        batch_sizes=[2],
        log=lines.append,
    )
    assert row["format"] == "sym_int4" and row["threads"] == 1
    assert (
        row["new_tokens"] == 8 and row["decode_tokens_per_s"] > 0 and "Paris" in row["answers"][0]
    )
    assert 0 < row["streamed_bytes"] <= row["weights_bytes"]
    assert math.isfinite(row["perplexity"]) and 1 < row["perplexity"] < 1000
    assert row["kernel_build"] in ipex._KERNEL_BUILDS
    assert [lv["concurrency"] for lv in row["sweep"]] == [2]
    assert any("perplexity" in line for line in lines)
