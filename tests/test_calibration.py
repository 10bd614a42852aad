"""labhelpers.calibration: ChatML calibration sets for GPTQ."""

from __future__ import annotations

import json

import pytest

from labhelpers import calibration
from labhelpers.calibration import CalibrationDataError


class CharTokenizer:
    """A toy tokenizer: ChatML rendering, one token per character."""

    def apply_chat_template(self, conv, tokenize=False, add_generation_prompt=False):
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in conv)

    def __call__(self, text, truncation=False, max_length=None):
        ids = [ord(c) for c in text]
        return {"input_ids": ids[:max_length] if truncation else ids}


def test_builtin_set_is_varied_and_well_formed():
    convs = calibration.builtin_conversations()
    assert len(convs) == 64
    text = json.dumps(convs, ensure_ascii=False)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text)  # some Chinese
    assert all(conv[-1]["role"] == "assistant" for conv in convs)


def test_templating_and_truncation():
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x" * 100}]
    examples = calibration.build_calibration_set(CharTokenizer(), [conv], max_length=50)
    assert len(examples) == 1
    ids = examples[0]["input_ids"]
    assert len(ids) == 50 and examples[0]["attention_mask"] == [1] * 50
    assert "".join(map(chr, ids)).startswith("<|im_start|>user\nhi<|im_end|>\n")


def test_short_conversations_are_dropped_and_all_short_is_an_error():
    short = [{"role": "user", "content": ""}]
    long = [{"role": "user", "content": "a long enough question"}]
    got = calibration.build_calibration_set(CharTokenizer(), [short, long], min_tokens=30)
    assert len(got) == 1
    with pytest.raises(CalibrationDataError, match="shorter than 500 tokens"):
        calibration.build_calibration_set(
            CharTokenizer(), [short, long], min_tokens=500, max_length=1000
        )


def test_jsonl_loading(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "你好"}]}\n\n'
        '[{"role": "user", "content": "bare list"}]\n',
        encoding="utf-8",
    )
    convs = calibration.load_conversations(path)
    assert [c[0]["content"] for c in convs] == ["你好", "bare list"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json\n", "line 1: not valid JSON"),
        ('{"messages": []}\n', "non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', "role"),
        ('{"messages": [{"role": "user", "content": 3}]}\n', "content must be a string"),
        ("\n\n", "holds no conversations"),
    ],
)
def test_jsonl_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CalibrationDataError, match=message):
        calibration.load_conversations(path)


def test_missing_file_explains_the_format(tmp_path):
    with pytest.raises(CalibrationDataError, match="one conversation per line"):
        calibration.load_conversations(tmp_path / "missing.jsonl")


def test_python_doc_conversations_avoid_the_evaluation_text():
    from labhelpers import quant

    heldout = quant.heldout_text()
    convs = calibration.python_doc_conversations(20, avoid=heldout)
    assert len(convs) == 20 and convs == calibration.python_doc_conversations(20, avoid=heldout)
    assert all([m["role"] for m in c] == ["user", "assistant"] for c in convs)
    answers = [c[1]["content"] for c in convs]
    assert all(0 < len(a) <= 2000 for a in answers)
    assert quant.ngram_overlap(answers, heldout) == 0.0
    unfiltered = calibration.python_doc_conversations(10_000)
    assert quant.ngram_overlap([c[1]["content"] for c in unfiltered], heldout) > 0.5
