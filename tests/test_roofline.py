"""labhelpers.roofline: bandwidth, bytes read per decoded token, the decode bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from labhelpers import roofline

torch = pytest.importorskip("torch")

# A tiny Qwen2 whose bytes are counted by hand (float32): hidden 16, 2 heads of 8, 1 KV head.
TINY = dict(
    vocab_size=100,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)
# Per layer: q 16x16+16, k 16x8+8, v 16x8+8, o 16x16, gate/up 16x32 x2, down 32x16, 2 norms x 16.
PER_LAYER = 256 + 16 + 128 + 8 + 128 + 8 + 256 + 3 * 512 + 2 * 16
TABLE = 100 * 16  # the embedding table; an untied LM head is as big again
STREAMED = 4 * (2 * PER_LAYER + 16 + TABLE)  # layers, final norm, LM head (or the shared table)


def tiny_qwen2(tied: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**TINY, tie_word_embeddings=tied)
    return Qwen2ForCausalLM(config).to(torch.float32).eval()


# --------------------------------------------------------------------------- the bound


def test_roofline_arithmetic():
    assert roofline.roofline_tokens_per_s(100.0, 1e9) == 100.0  # 100 GB/s over 1 GB a token
    assert roofline.percent_of_roofline(25.0, 100.0) == 25.0
    with pytest.raises(ValueError):
        roofline.roofline_tokens_per_s(100.0, 0)
    with pytest.raises(ValueError):
        roofline.percent_of_roofline(1.0, 0.0)


# --------------------------------------------------------------------------- bytes per token


@pytest.mark.parametrize("tied", [True, False])
def test_a_decode_step_reads_the_lm_head_but_only_one_row_of_a_separate_input_table(tied: bool):
    model = tiny_qwen2(tied)
    rotary = sum(
        b.numel() * b.element_size() for n, b in model.named_buffers() if "rotary_emb" in n
    )
    assert rotary > 0, "the rotary tables are buffers (one row read per step: not counted)"
    stored = roofline.model_weight_bytes(model)
    assert stored == STREAMED + (0 if tied else 4 * TABLE) + rotary
    assert roofline.bytes_per_token(model) == STREAMED
    kv = 2 * 2 * 1 * 8 * 10 * 4  # K and V x 2 layers x 1 KV head x 8 dims x 10 tokens x fp32
    assert roofline.bytes_per_token(model, context_tokens=10) == STREAMED + kv
    assert (
        roofline.bytes_per_token(model, context_tokens=10, kv_bytes_per_elem=1)
        == STREAMED + kv // 4
    )


@pytest.mark.parametrize("tied", [True, False])
def test_a_checkpoint_folder_gives_the_same_bytes_as_the_loaded_model(tied: bool, tmp_path: Path):
    model = tiny_qwen2(tied)
    model.save_pretrained(tmp_path)
    assert roofline.bytes_per_token(tmp_path, context_tokens=10) == STREAMED + 2 * 2 * 8 * 10 * 2
    assert roofline.bytes_per_token(str(tmp_path)) == STREAMED


def test_a_byte_count_needs_the_config():
    config = {"model_type": "qwen2", **TINY}
    assert roofline.bytes_per_token(1000, config, context_tokens=4) == 1000 + 2 * 2 * 8 * 4 * 2
    with pytest.raises(ValueError, match="config"):
        roofline.bytes_per_token(1000)


def test_model_weight_bytes_counts_buffers_and_dedups_tied():
    from torch import nn

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)  # 40 fp32 = 160 B
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight  # tied: counted once
            self.proj = nn.Linear(4, 4)  # 16 + 4 fp32 = 80 B
            # GPTQ-like packed weight kept as a buffer: 8 int32 = 32 B
            self.register_buffer("qweight", torch.zeros(2, 4, dtype=torch.int32))
            self.alias = nn.Module()  # another module sharing the same buffer: counted once
            self.alias.register_buffer("qweight", self.qweight)

    assert roofline.model_weight_bytes(Tiny()) == 160 + 80 + 32


# --------------------------------------------------------------------------- bandwidth


def test_cpu_bandwidth_is_measured_at_the_asked_thread_count():
    before = torch.get_num_threads()
    bw = roofline.memory_bandwidth_gbps("cpu", size_mb=64, repeats=2, threads=1)
    assert torch.get_num_threads() == before, "the thread count is restored"
    assert (bw.device, bw.threads, bw.size_mb, bw.datasheet_gbps) == ("cpu", 1, 64, None)
    assert 0 < bw.read_gbps < 2000 and 0 < bw.copy_gbps < 2000


@pytest.mark.gpu
def test_gpu_bandwidth_is_the_gpus_and_sits_below_its_datasheet():
    bw = roofline.memory_bandwidth_gbps("cuda", size_mb=1024, repeats=3)
    assert bw.device == "cuda" and bw.threads is None
    assert bw.read_gbps > 100
    if bw.datasheet_gbps:
        assert bw.read_gbps < 1.05 * bw.datasheet_gbps
