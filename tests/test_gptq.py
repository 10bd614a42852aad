"""labhelpers.gptq: calibration data, the checks before a GPTQ run, RTN, GPTQModel's conditions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from labhelpers import gptq
from labhelpers.machine import NotEnoughResourcesError
from labhelpers.measure import heldout_text

torch = pytest.importorskip("torch")


# --------------------------------------------------------------------------- calibration data


class CharTokenizer:
    """A toy tokenizer: ChatML rendering, one token per character."""

    def apply_chat_template(self, conv, tokenize=False, add_generation_prompt=False):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv)

    def __call__(self, text, truncation=False, max_length=None):
        ids = [ord(c) for c in text]
        return {"input_ids": ids[:max_length] if truncation else ids}


def test_builtin_set_is_varied_and_well_formed():
    convs = gptq.load_conversations()
    assert len(convs) == 64
    text = json.dumps(convs, ensure_ascii=False)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # some Chinese
    assert all(conv[-1]["role"] == "assistant" for conv in convs)


def test_templating_and_truncation():
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 100}]
    (example,) = gptq.build_calibration_set(CharTokenizer(), [conv], max_length=50)
    assert len(example["input_ids"]) == 50 and example["attention_mask"] == [1] * 50
    assert "".join(map(chr, example["input_ids"])).startswith("<|im_start|>user\nhi<|im_end|>\n")


def test_short_conversations_are_dropped_and_all_short_is_an_error():
    short = [{"role": "user", "content": ""}]
    long = [{"role": "user", "content": "a long enough question"}]
    assert len(gptq.build_calibration_set(CharTokenizer(), [short, long], min_tokens=30)) == 1
    with pytest.raises(ValueError, match=r"shorter than 500 tokens.*load_conversations\(\)"):
        gptq.build_calibration_set(CharTokenizer(), [short, long], min_tokens=500, max_length=1000)


def test_jsonl_loading(tmp_path: Path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "你好"}]}\n\n'
        '[{"role": "user", "content": "bare list"}]\n',
        encoding="utf-8",
    )
    assert [c[0]["content"] for c in gptq.load_conversations(path)] == ["你好", "bare list"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json\n", "line 1: not valid JSON"),
        ('\n{"messages": []}\n', "line 2: expected a non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', "role in"),
        ('{"messages": [{"role": "user", "content": 3}]}\n', "content string"),
        ("\n\n", "holds no conversations"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path: Path, content: str, message: str):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        gptq.load_conversations(path)


def test_missing_file_explains_the_format(tmp_path: Path):
    with pytest.raises(ValueError, match="one conversation per line"):
        gptq.load_conversations(tmp_path / "missing.jsonl")


def test_python_doc_conversations_avoid_the_evaluation_text():
    heldout = heldout_text()
    convs = gptq.python_doc_conversations(20, avoid=heldout)
    assert len(convs) == 20 and convs == gptq.python_doc_conversations(20, avoid=heldout)
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in convs)
    answers = [c[1]["content"] for c in convs]
    assert all(0 < len(a) <= 2000 for a in answers)
    assert gptq.ngram_overlap(answers, heldout) == 0.0
    unfiltered = gptq.python_doc_conversations(10_000)
    assert gptq.ngram_overlap([c[1]["content"] for c in unfiltered], heldout) > 0.5


def test_heldout_text_does_not_overlap_the_builtin_calibration_set():
    convs = gptq.load_conversations()
    assert (
        gptq.ngram_overlap([json.dumps(c, ensure_ascii=False) for c in convs], heldout_text())
        == 0.0
    )


def test_ngram_overlap():
    ref = "one two three four five six seven eight nine ten"
    assert gptq.ngram_overlap([ref], ref) == 1.0
    assert gptq.ngram_overlap(["something else entirely"], ref) == 0.0
    assert gptq.ngram_overlap(["x one two three four five six seven eight y"], ref) == 1 / 3
    with pytest.raises(ValueError, match="fewer than 8 words"):
        gptq.ngram_overlap([], "too short")


# --------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_rtn_round_trip_error_is_at_most_half_a_step(bits: int, group_size: int):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    w[3, 7] = 25.0  # an outlier only widens its own group's step
    gs = 128 if group_size == -1 else group_size
    groups = w.reshape(48, 128 // gs, gs)
    step = 2 * groups.abs().amax(-1) / (2**bits - 1)  # GPTQ's symmetric grid
    got = gptq._rtn_fake_quantize(w, bits=bits, group_size=group_size)
    err = (got - w).abs().reshape(48, 128 // gs, gs).amax(-1)
    slack = 2**bits * 1e-7  # float32 rounding of w / step
    assert bool((err <= step * (0.5 + slack)).all())
    codes = torch.round(got.reshape(48, -1, gs) / step.unsqueeze(-1))
    assert int(codes.max()) <= 2 ** (bits - 1) - 1 and int(codes.min()) >= -(2 ** (bits - 1))
    assert got.dtype == w.dtype and got.shape == w.shape


def test_rtn_keeps_zeros_and_8_bit_is_closer_than_4_bit():
    zeros = torch.zeros(4, 64)
    assert torch.equal(gptq._rtn_fake_quantize(zeros, group_size=32), zeros)  # no NaN
    torch.manual_seed(2)
    w = torch.randn(32, 64)
    e4 = (gptq._rtn_fake_quantize(w, bits=4) - w).pow(2).mean()
    e8 = (gptq._rtn_fake_quantize(w, bits=8) - w).pow(2).mean()
    assert e8 < e4 / 100
    with pytest.raises(ValueError, match="bits must be"):
        gptq._rtn_fake_quantize(w, bits=5)


def test_group_size_must_divide_the_width_and_the_error_suggests_divisors():
    with pytest.raises(ValueError, match=r"576 % 128 != 0.*\[16, 32, 64\]"):
        gptq.check_group_size([576, 1536], 128)
    assert gptq.check_group_size([576, 1536], 64) == [16, 32, 64], "the sizes that work"
    assert gptq.check_group_size(576, -1) == [16, 32, 64]
    with pytest.raises(ValueError):
        gptq.check_group_size(576, 0)
    assert gptq.check_group_size([3584, 18944], 128) == [16, 32, 64, 128, 256, 512]


def toy_decoder():
    torch.manual_seed(3)
    model = torch.nn.Module()
    model.layers = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 64))
    model.lm_head = torch.nn.Linear(64, 10, bias=False)
    return model


def test_rtn_quantize_changes_every_linear_but_lm_head():
    model = toy_decoder()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert gptq.rtn_quantize_(model, bits=4, group_size=32) == 2
    after = dict(model.named_parameters())
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert torch.equal(after["layers.0.bias"], before["layers.0.bias"])
    for name in ("layers.0.weight", "layers.1.weight"):
        assert torch.equal(
            after[name], gptq._rtn_fake_quantize(before[name], bits=4, group_size=32)
        )


def test_rtn_quantize_checks_all_layers_before_changing_any():
    model = toy_decoder()  # widths 64 and 96: 64 divides 64 but not 96
    before = model.layers[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"96 % 64.*\[16, 32\]"):
        gptq.rtn_quantize_(model, group_size=64)
    assert torch.equal(model.layers[0].weight, before)


def test_layer_widths_from_config_and_model():
    assert gptq.layer_widths("Qwen2.5-0.5B-Instruct") == {
        "q_proj": 896,
        "k_proj": 896,
        "v_proj": 896,
        "o_proj": 896,
        "gate_proj": 896,
        "up_proj": 896,
        "down_proj": 4864,
    }
    assert gptq.layer_widths("Qwen3-8B")["o_proj"] == 32 * 128, "o_proj reads heads x head_dim"
    assert gptq.layer_widths(toy_decoder()) == {"layers.0": 64, "layers.1": 96}
    with pytest.raises(ValueError, match="num_attention_heads"):
        gptq.layer_widths({"model_type": "qwen2", "hidden_size": 8})


def test_packed_size_counts_int4_codes_scales_and_the_rest_in_bf16():
    got = gptq.packed_size_bytes(toy_decoder(), bits=4, group_size=32)
    layer0 = 96 * 64 // 2 + (64 // 32) * 96 * 2 + (64 // 32) * 96 // 2 + 64 * 4
    layer1 = 64 * 96 // 2 + (96 // 32) * 64 * 2 + (96 // 32) * 64 // 2 + 96 * 4
    rest = (96 + 64 + 640) * 2  # two biases and lm_head in bf16
    assert got == layer0 + layer1 + rest


# --------------------------------------------------------------------------- before a run


def test_output_dir_is_refused_unless_overwrite(tmp_path: Path):
    out = tmp_path / "my-gptq"
    assert gptq.check_output_dir(out) == out
    out.mkdir()
    with pytest.raises(FileExistsError, match="OVERWRITE = True"):
        gptq.check_output_dir(out)
    assert gptq.check_output_dir(out, overwrite=True) == out
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match="already exists"):
        gptq.check_output_dir(afile, overwrite=True)


def write_checkpoint(folder: Path, tensors: dict, config: dict | None = None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "qwen2"}))
    return folder


def test_ram_check_before_quantizing(tmp_path: Path):
    folder = write_checkpoint(
        tmp_path / "m", {"a": torch.zeros(1000, 1000, dtype=torch.bfloat16), "b": torch.zeros(10)}
    )
    fp32 = 1_000_010 / 1e9 * 4 * 2 + 0.8
    assert gptq.check_quantization_fits(folder, available_gb=100) == pytest.approx(fp32)
    assert gptq.check_quantization_fits(folder, dtype="bfloat16", available_gb=100) < fp32
    with pytest.raises(
        NotEnoughResourcesError, match="quantizing in float32 needs about.*bfloat16"
    ):
        gptq.check_quantization_fits(folder, available_gb=0.1)
    with pytest.raises(ValueError, match="dtype"):
        gptq.check_quantization_fits(folder, dtype="int4")


def test_store_unquantized_as_bf16_keeps_int_tensors(tmp_path: Path):
    from safetensors.torch import load_file

    folder = write_checkpoint(
        tmp_path / "q",
        {"norm": torch.ones(4), "qweight": torch.arange(8, dtype=torch.int32)},
        {"model_type": "qwen2", "dtype": "float32"},
    )
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    gptq.store_unquantized_as_bf16(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    assert tensors["norm"].dtype == torch.bfloat16 and tensors["qweight"].dtype == torch.int32
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4 * 2 + 8 * 4


def test_logs_in_restores_the_working_directory(tmp_path: Path):
    cwd = os.getcwd()
    with pytest.raises(RuntimeError), gptq.logs_in(tmp_path / "work", 30):
        assert Path.cwd() == (tmp_path / "work").resolve()
        raise RuntimeError("crash mid-quantization")
    assert os.getcwd() == cwd


def test_logs_in_reports_the_layer_gptqmodels_newest_log_reached(tmp_path: Path):
    with gptq.logs_in(tmp_path, 30) as progress:
        assert progress() == ""
        Path("logs").mkdir()  # GPTQModel writes ./logs/gptq_log_<time>.log
        old = Path("logs/gptq_log_a.log")
        old.write_text('{"layer": 29}')
        os.utime(old, (1, 1))
        Path("logs/gptq_log_b.log").write_text('{\n "layer": 0\n}\n{\n "layer": 4\n}')
        assert progress() == "; layer 5 of 30 done"


PREPARE = textwrap.dedent(
    """
    import logging, os, sys
    from labhelpers import gptq
    log = gptq.prepare_gptqmodel(sys.argv[1])
    import gptqmodel
    print("workers", os.environ["GPTQMODEL_CPU_WORKERS"])
    print("level", logging.getLogger("gptqmodel").level == logging.WARNING)
    """
)


@pytest.mark.slow
def test_prepare_gptqmodel_sizes_its_pool_and_keeps_its_banner_in_the_log(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != "GPTQMODEL_CPU_WORKERS"}
    log = tmp_path / "gptqmodel.log"
    run = subprocess.run(
        [sys.executable, "-c", PREPARE, str(log)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected = str(max(2, os.cpu_count() or 2))
    shown = [line for line in run.stdout.splitlines() if not line.lstrip().startswith("… still")]
    assert shown == [f"workers {expected}", "level True"], "nothing but the heartbeat is printed"
    assert "Failed to load" not in run.stderr and "register_constant" not in run.stderr
    assert log.stat().st_size > 0, "the banner and warnings are kept in the log"
