"""GPTQ calibration data: chat conversations rendered with the model's own chat template.

GPTQ chooses each layer's rounding by looking at real activations, so the calibration
texts should look like what the model will see in use: for a chat model, conversations
formatted with its ChatML template, as the Qwen docs do. Used by the stand-in builder
(``standin-gptq-int4``) and by notebook 02_gptq_calibration.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

Conversation = list[dict[str, str]]

MIN_TOKENS = 8
_ROLES = {"system", "user", "assistant"}


class CalibrationDataError(ValueError):
    """Calibration data that cannot be used, with a message that says how to fix it."""


def builtin_conversations() -> list[Conversation]:
    """The course's own 64 conversations (Chinese and English, varied topics)."""
    text = (
        resources.files("labhelpers")
        .joinpath("data/calibration_chats.jsonl")
        .read_text(encoding="utf-8")
    )
    return _parse_jsonl(text.splitlines(), source="built-in calibration_chats.jsonl")


def python_doc_conversations(
    n: int, *, avoid: str | None = None, chars: int = 2000, per_section: int = 3
) -> list[Conversation]:
    """Up to ``n`` English technical conversations made from the Python Language Reference
    that ships with Python (``pydoc_data.topics``): the user asks about a section, the
    assistant answers with a chunk of its text (``chars`` characters, at most
    ``per_section`` chunks per section; shuffled with a fixed seed).

    Sections sharing any 8-word sequence with ``avoid`` (the held-out evaluation text) are
    left out, so the evaluation stays honest. Used by notebook 02_gptq_calibration to test
    calibration data closer to the evaluation domain.
    """
    import random
    from pydoc_data.topics import topics

    from labhelpers.quant import ngram_overlap

    convs: list[Conversation] = []
    for name in sorted(topics):
        text = topics[name].strip()
        if avoid is not None and ngram_overlap([text], avoid) > 0:
            continue
        for start in range(0, min(len(text), per_section * chars), chars):
            question = f"Explain this part of the Python reference: {name}."
            convs.append(
                [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": text[start : start + chars]},
                ]
            )
    random.Random(0).shuffle(convs)
    return convs[:n]


def load_conversations(path: str | os.PathLike[str]) -> list[Conversation]:
    """Load a JSONL file: one ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line.

    A line may also be a bare list of messages. Blank lines are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(
            f"Calibration file {path} does not exist. Give the path of a JSONL file with one "
            'conversation per line, e.g. {"messages": [{"role": "user", "content": "..."}, '
            '{"role": "assistant", "content": "..."}]}'
        )
    with path.open(encoding="utf-8") as fh:
        return _parse_jsonl(fh, source=str(path))


def _parse_jsonl(lines: Any, *, source: str) -> list[Conversation]:
    conversations: list[Conversation] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationDataError(f"{source}, line {lineno}: not valid JSON ({exc})") from exc
        messages = item.get("messages") if isinstance(item, dict) else item
        conversations.append(_check_messages(messages, where=f"{source}, line {lineno}"))
    if not conversations:
        raise CalibrationDataError(f"{source} holds no conversations.")
    return conversations


def _check_messages(messages: Any, *, where: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise CalibrationDataError(f"{where}: expected a non-empty list of messages")
    for msg in messages:
        if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
            raise CalibrationDataError(
                f"{where}: each message needs a role in {sorted(_ROLES)} and a content string; "
                f"got {msg!r}"
            )
        if not isinstance(msg.get("content"), str):
            raise CalibrationDataError(f"{where}: message content must be a string; got {msg!r}")
    return messages


def build_calibration_set(
    tokenizer: Any,
    conversations: list[Conversation],
    *,
    max_length: int = 512,
    min_tokens: int = MIN_TOKENS,
) -> list[dict[str, Any]]:
    """Render each conversation with ``tokenizer.apply_chat_template(..., tokenize=False)``,
    tokenize it, truncate to ``max_length`` tokens and return GPTQ calibration examples:
    a list of ``{"input_ids": list[int], "attention_mask": list[int]}``.

    Conversations shorter than ``min_tokens`` after templating are dropped; if none is
    left, :class:`CalibrationDataError` says so.
    """
    if max_length < min_tokens:
        raise CalibrationDataError(f"max_length={max_length} is below min_tokens={min_tokens}")
    examples = []
    for conv in conversations:
        text = tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= min_tokens:
            examples.append({"input_ids": list(ids), "attention_mask": [1] * len(ids)})
    if not examples:
        raise CalibrationDataError(
            f"All {len(conversations)} calibration conversations are shorter than {min_tokens} "
            "tokens after templating (or empty). GPTQ needs real text to calibrate: use longer "
            "conversations, e.g. labhelpers.calibration.builtin_conversations()."
        )
    return examples
