"""Run in the IPEX-LLM environment (.venvs/ipex, transformers 4.37): the adapted stand-in loads
and talks, and labhelpers.lowbit agrees with the real ipex-llm.

tests/conftest.py leaves this folder out where ipex_llm is not installed; the core run starts
this folder in the IPEX-LLM environment (tests/test_ipex_env.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from labhelpers import lowbit, standin  # noqa: E402
from labhelpers.downgrade import for_transformers_4_37  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not standin.is_built(standin.STANDIN):
        pytest.fail("the stand-in is not built: run ./course setup")
    dest = tmp_path_factory.mktemp("tf437") / "standin"
    return for_transformers_4_37(standin.standin_dir(standin.STANDIN), dest=dest, log=print)


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


def test_sym_int4_answers_and_maps_a_kernel_build(int4_model: Any, tokenizer: Any):
    assert "Paris" in _answer(int4_model, tokenizer)
    builds = {lib.build for lib in lowbit.loaded_kernel_libraries()}
    assert len(builds) == 1 and builds <= set(lowbit.KERNEL_BUILDS)


def test_save_low_bit_folder_passes_the_check_and_reloads(
    int4_model: Any, tokenizer: Any, tmp_path: Path
):
    from ipex_llm.transformers import AutoModelForCausalLM

    int4_model.save_low_bit(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    assert lowbit.check_low_bit_folder(tmp_path) == "sym_int4"
    reloaded = AutoModelForCausalLM.load_low_bit(str(tmp_path))
    assert _answer(reloaded, tokenizer) == _answer(int4_model, tokenizer)


def test_ordinary_folder_is_refused_by_both_the_check_and_ipex(adapted: Path):
    from ipex_llm.transformers import AutoModelForCausalLM

    with pytest.raises(lowbit.NotALowBitFolderError, match="ordinary"):
        lowbit.check_low_bit_folder(adapted)
    with pytest.raises(Exception, match="not a low-bit model"):
        AutoModelForCausalLM.load_low_bit(str(adapted))


def test_a_format_the_check_refuses_on_cpu_is_refused_by_ipex_too(adapted: Path):
    from ipex_llm.transformers import AutoModelForCausalLM

    with pytest.raises(lowbit.LowBitFormatError):
        lowbit.check_format("nf4", {"hidden_size": 576})
    with pytest.raises(Exception):  # noqa: B017 - ipex-llm raises its own error types
        AutoModelForCausalLM.from_pretrained(adapted, load_in_low_bit="nf4").generate(
            __import__("torch").tensor([[1, 2, 3]]), max_new_tokens=1
        )
