"""labhelpers.quant: perplexity, RTN, and the checks before a GPTQ run."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from labhelpers import quant
from labhelpers.models import NotEnoughResourcesError

torch = pytest.importorskip("torch")


# --------------------------------------------------------------------------- toy models


class FixedDistribution(torch.nn.Module):
    """Ignores its input: every position predicts the same distribution ``probs``."""

    def __init__(self, probs):
        super().__init__()
        self.log_probs = torch.nn.Parameter(torch.log(torch.tensor(probs)), requires_grad=False)

    def forward(self, ids):
        return self.log_probs.expand(ids.shape[0], ids.shape[1], -1)


class NextIsPlusOne(torch.nn.Module):
    """Predicts ``(token + 1) % V`` with probability ``p``; the rest spread evenly.
    Records every window it is called with."""

    def __init__(self, vocab: int, p: float):
        super().__init__()
        self.vocab, self.p = vocab, p
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.calls: list[tuple[int, int]] = []

    def forward(self, ids):
        self.calls.append((int(ids[0, 0]), ids.shape[1]))
        other = (1 - self.p) / (self.vocab - 1)
        probs = torch.full((*ids.shape, self.vocab), other)
        probs.scatter_(-1, ((ids + 1) % self.vocab).unsqueeze(-1), self.p)

        class Out:
            logits = torch.log(probs)

        return Out()


# --------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize(("window", "stride"), [(8, 8), (8, 3), (16, 16), (100, 50)])
def test_uniform_model_has_perplexity_equal_to_vocab_size(window, stride):
    vocab = 7
    ids = torch.randint(0, vocab, (50,))
    got = quant.perplexity(
        FixedDistribution([1 / vocab] * vocab), ids, window=window, stride=stride
    )
    assert got == pytest.approx(vocab, rel=1e-6)


def test_fixed_distribution_matches_the_analytic_cross_entropy():
    probs = [0.5, 0.25, 0.125, 0.125]
    ids = [0, 1, 2, 3, 0, 0, 1, 3, 2, 0, 1]
    expected = math.exp(-sum(math.log(probs[t]) for t in ids[1:]) / (len(ids) - 1))
    got = quant.perplexity(FixedDistribution(probs), torch.tensor([ids]), window=4, stride=2)
    assert got == pytest.approx(expected, rel=1e-6)


def test_sliding_window_scores_every_token_once_with_context():
    vocab, p = 10, 0.9
    ids = torch.arange(23) % vocab  # every next token is the previous + 1
    model = NextIsPlusOne(vocab, p)
    got = quant.perplexity(model, ids, window=8, stride=5)
    assert got == pytest.approx(1 / p, rel=1e-6)  # each of the 22 targets scored once at p
    assert model.calls == [(0, 8), (5, 8), (0, 8), (5, 8)]  # starts 0, 5, 10, 15 (to the end)


def test_perplexity_rejects_bad_arguments():
    model = FixedDistribution([0.5, 0.5])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        quant.perplexity(model, [1])
    with pytest.raises(ValueError, match="stride"):
        quant.perplexity(model, [0, 1, 0], window=4, stride=8)


# --------------------------------------------------------------------------- RTN


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_rtn_round_trip_error_is_at_most_half_a_step(bits, group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 128)
    w[3, 7] = 25.0  # an outlier only widens its own group's step
    scale = quant.group_scales(w, bits=bits, group_size=group_size)
    got = quant.rtn_fake_quantize(w, bits=bits, group_size=group_size)
    gs = 128 if group_size == -1 else group_size
    err = (got - w).abs().reshape(48, 128 // gs, gs).amax(-1)
    slack = 2**bits * 1e-7  # float32 rounding of w / scale (up to 2**(bits-1) steps)
    assert bool((err <= scale * (0.5 + slack)).all())
    codes = torch.round(got.reshape(48, -1, gs) / scale.unsqueeze(-1))
    assert int(codes.max()) <= 2 ** (bits - 1) - 1 and int(codes.min()) >= -(2 ** (bits - 1))


def test_rtn_is_exact_on_values_already_on_the_grid():
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    scale = quant.group_scales(w, bits=4, group_size=32)
    on_grid = quant.fake_quantize(w, scale, bits=4)
    assert torch.equal(quant.fake_quantize(on_grid, scale, bits=4), on_grid)
    assert torch.unique(torch.round(on_grid[:, :32] / scale[:, :1])).numel() <= 16
    zeros = torch.zeros(4, 64)
    assert torch.equal(quant.rtn_fake_quantize(zeros, group_size=32), zeros)  # no NaN


def test_rtn_8_bit_is_closer_than_4_bit():
    torch.manual_seed(2)
    w = torch.randn(32, 64)
    e4 = (quant.rtn_fake_quantize(w, bits=4) - w).pow(2).mean()
    e8 = (quant.rtn_fake_quantize(w, bits=8) - w).pow(2).mean()
    assert e8 < e4 / 100


def test_group_size_must_divide_the_width_and_the_error_suggests_divisors():
    with pytest.raises(quant.GroupSizeError, match=r"576 % 128 != 0.*\[16, 32, 64\]"):
        quant.check_group_size([576, 1536], 128)
    quant.check_group_size([576, 1536], 64)
    quant.check_group_size(576, -1)
    with pytest.raises(quant.GroupSizeError, match="positive"):
        quant.check_group_size(576, 0)
    assert quant.suggest_group_sizes([576, 1536]) == [16, 32, 64]
    assert quant.suggest_group_sizes([3584, 18944]) == [16, 32, 64, 128, 256, 512]


def _toy_decoder():
    torch.manual_seed(3)
    model = torch.nn.Module()
    model.layers = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 64))
    model.lm_head = torch.nn.Linear(64, 10, bias=False)
    return model


def test_rtn_quantize_changes_every_linear_but_lm_head():
    model = _toy_decoder()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert quant.rtn_quantize_(model, bits=4, group_size=32) == 2
    after = dict(model.named_parameters())
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert torch.equal(after["layers.0.bias"], before["layers.0.bias"])
    for name in ("layers.0.weight", "layers.1.weight"):
        assert not torch.equal(after[name], before[name])
        expected = quant.rtn_fake_quantize(before[name], bits=4, group_size=32)
        assert torch.equal(after[name], expected)


def test_rtn_quantize_checks_all_layers_before_changing_any():
    model = _toy_decoder()  # widths 64 and 96: 64 divides 64 but not 96
    before = model.layers[0].weight.detach().clone()
    with pytest.raises(quant.GroupSizeError, match=r"96 % 64.*\[16, 32\]"):
        quant.rtn_quantize_(model, group_size=64)
    assert torch.equal(model.layers[0].weight, before)


def test_layer_widths_from_config_and_model():
    config = {"hidden_size": 576, "num_attention_heads": 9, "intermediate_size": 1536}
    assert quant.layer_widths(config) == {
        "q/k/v/gate/up_proj": 576,
        "o_proj": 576,
        "down_proj": 1536,
    }
    assert quant.layer_widths({**config, "head_dim": 128})["o_proj"] == 9 * 128
    assert quant.layer_widths(_toy_decoder()) == {"layers.0": 64, "layers.1": 96}
    with pytest.raises(ValueError, match="hidden_size"):
        quant.layer_widths({"hidden_size": 8})


def test_packed_size_counts_int4_codes_scales_and_the_rest_in_bf16():
    model = _toy_decoder()
    got = quant.packed_size_bytes(model, bits=4, group_size=32)
    layer0 = 96 * 64 // 2 + (64 // 32) * 96 * 2 + (64 // 32) * 96 // 2 + 64 * 4
    layer1 = 64 * 96 // 2 + (96 // 32) * 64 * 2 + (96 // 32) * 64 // 2 + 96 * 4
    rest = (96 + 64 + 640) * 2  # two biases and lm_head in bf16
    assert got == layer0 + layer1 + rest


# --------------------------------------------------------------------------- before a run


def test_output_dir_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "my-gptq"
    assert quant.check_output_dir(out) == out
    out.mkdir()
    with pytest.raises(FileExistsError, match="OVERWRITE = True"):
        quant.check_output_dir(out)
    assert quant.check_output_dir(out, overwrite=True) == out
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        quant.check_output_dir(afile, overwrite=True)


def _write_checkpoint(folder, tensors, config=None):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"model_type": "qwen2"}))
    return folder


def test_ram_estimate_from_safetensors_headers(tmp_path):
    folder = _write_checkpoint(
        tmp_path / "m", {"a": torch.zeros(1000, 1000, dtype=torch.bfloat16), "b": torch.zeros(10)}
    )
    assert quant.count_parameters(folder) == 1_000_010
    fp32 = quant.estimate_quantization_ram_gb(folder, dtype="float32")
    assert fp32 == pytest.approx(1_000_010 * 4 * 2 / 1024**3 + 0.8)
    assert quant.estimate_quantization_ram_gb(folder, dtype="bfloat16") < fp32
    assert quant.check_quantization_fits(folder, available_gb=100) == pytest.approx(fp32)
    with pytest.raises(NotEnoughResourcesError, match="needs about .* GB of RAM"):
        quant.check_quantization_fits(folder, available_gb=0.1)
    with pytest.raises(ValueError, match="dtype"):
        quant.estimate_quantization_ram_gb(folder, dtype="int4")
    with pytest.raises(FileNotFoundError):
        quant.count_parameters(tmp_path)


def test_store_unquantized_as_bf16_keeps_int_tensors(tmp_path):
    from safetensors.torch import load_file

    folder = _write_checkpoint(
        tmp_path / "q",
        {"norm": torch.ones(4), "qweight": torch.arange(8, dtype=torch.int32)},
        {"model_type": "qwen2", "dtype": "float32"},
    )
    quant.store_unquantized_as_bf16(folder)
    tensors = load_file(str(folder / "model.safetensors"))
    assert tensors["norm"].dtype == torch.bfloat16 and tensors["qweight"].dtype == torch.int32
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"


def test_logs_in_restores_the_working_directory(tmp_path):
    import os

    cwd = os.getcwd()
    with pytest.raises(RuntimeError), quant.logs_in(tmp_path / "logs") as here:
        assert os.getcwd() == str(here.resolve())
        raise RuntimeError("crash mid-quantization")
    assert os.getcwd() == cwd


def test_prepare_gptqmodel_cpu_keeps_a_user_setting(monkeypatch):
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "7")
    quant.prepare_gptqmodel_cpu()
    assert quant.os.environ["GPTQMODEL_CPU_WORKERS"] == "7"
    monkeypatch.delenv("GPTQMODEL_CPU_WORKERS")
    quant.prepare_gptqmodel_cpu()
    assert int(quant.os.environ["GPTQMODEL_CPU_WORKERS"]) >= 2


# --------------------------------------------------------------------------- held-out text


def test_heldout_text_does_not_overlap_the_builtin_calibration_set():
    from labhelpers import calibration

    text = quant.heldout_text()
    assert len(text) > 15_000 and text == quant.heldout_text()
    convs = calibration.builtin_conversations()
    assert quant.ngram_overlap([json.dumps(c, ensure_ascii=False) for c in convs], text) == 0.0
    with pytest.raises(KeyError, match="unknown pydoc topics"):
        quant.heldout_text(["no-such-topic"])


def test_ngram_overlap():
    ref = "one two three four five six seven eight nine ten"
    assert quant.ngram_overlap([ref], ref) == 1.0
    assert quant.ngram_overlap(["something else entirely"], ref) == 0.0
    assert quant.ngram_overlap(["x one two three four five six seven eight y"], ref) == 1 / 3
    with pytest.raises(ValueError, match="fewer than 8 words"):
        quant.ngram_overlap([], "too short")


def test_import_is_instant():
    code = "import sys, labhelpers.quant; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
