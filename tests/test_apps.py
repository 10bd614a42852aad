"""The chat pages in apps/ (openai_chat.py, streamlit_chat.py, gradio_chat.py) against the fake
OpenAI-compatible server (tests/fake_openai_server.py): what the request carries, streaming,
history, errors (server down, wrong key, unknown model), the page's own port already taken.

The fake server records the last request body (GET /debug/last-request), so these tests check
what reached the wire, not what the page meant to send. The streamlit page itself runs in
streamlit's headless AppTest; the gradio page's chat function is called directly. The real
browser test (tests/test_apps_browser.py) does the same against vLLM.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from conftest import fake_openai_server

from labhelpers.serve import Server, free_port

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "apps"
sys.path.insert(0, str(APPS))  # the pages import openai_chat from their own folder

import openai_chat as chat  # noqa: E402


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = fake_openai_server(tmp_path_factory.mktemp("fake"))
    server.start(timeout_s=30, log=lambda _m: None)
    yield server
    server.stop(log=lambda _m: None)


@pytest.fixture(scope="module")
def fake_keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = fake_openai_server(tmp_path_factory.mktemp("fake-keyed"), "--api-key", "right-key")
    server.start(timeout_s=30, log=lambda _m: None)
    yield server
    server.stop(log=lambda _m: None)


def last_request(server: Server) -> dict[str, Any]:
    with urllib.request.urlopen(server.base_url + "/debug/last-request", timeout=5) as resp:
        return json.loads(resp.read())


def dead_url() -> str:
    """An OpenAI base URL on a loopback port nothing listens on."""
    return f"http://127.0.0.1:{free_port()}/v1"


# ---- settings and request building (pure) ---------------------------------------------------


def test_normalize_base_url_adds_v1_only_when_the_path_is_empty() -> None:
    assert chat.normalize_base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert chat.normalize_base_url(" http://h:8000/ ") == "http://h:8000/v1"
    assert chat.normalize_base_url("http://h:8000/v1/") == "http://h:8000/v1"
    assert chat.normalize_base_url("https://api.example.com/openai/v1") == (
        "https://api.example.com/openai/v1"
    )


def test_settings_come_from_flags_then_environment_then_defaults(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OPENAI_BASE_URL", "OPENAI_API_KEY", "CHAT_MODEL", "CHAT_SYSTEM_PROMPT"):
        monkeypatch.delenv(name, raising=False)
    s = chat.parse_settings([], default_port=7860)
    assert (s.base_url, s.api_key, s.model, s.host, s.port) == (
        "http://127.0.0.1:8000/v1",
        "EMPTY",
        "",
        "127.0.0.1",
        7860,
    )
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8080")
    monkeypatch.setenv("OPENAI_API_KEY", "from-env")
    monkeypatch.setenv("CHAT_MODEL", "qwen")
    s = chat.parse_settings(["--server.port", "1", "--api-key", "from-flag"])  # unknown: ignored
    assert (s.base_url, s.api_key, s.model) == ("http://127.0.0.1:8080/v1", "from-flag", "qwen")
    s = chat.parse_settings(["--temperature", "0.2", "--max-tokens", "9", "--port", "6006"])
    assert (s.temperature, s.max_tokens, s.port) == (0.2, 9, 6006)


def test_messages_start_with_the_system_prompt_and_carry_only_role_and_text() -> None:
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "stats": "3 tokens"},  # streamlit page
        {"role": "user", "content": [{"type": "text", "text": "and "}, {"text": "you?"}]},
        {"role": "assistant", "content": "…", "metadata": {"title": "thinking"}},  # gradio
    ]
    messages = chat.build_messages("Be brief.", history, "bye")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and you?"},
        {"role": "user", "content": "bye"},
    ]
    assert chat.build_messages("  ", [], "x") == [{"role": "user", "content": "x"}]


def test_request_carries_every_control() -> None:
    msgs = [{"role": "user", "content": "x"}]
    req = chat.build_request("m", msgs, temperature=0, max_tokens=12.0)  # type: ignore[arg-type]
    assert req == {
        "model": "m",
        "messages": msgs,
        "temperature": 0.0,
        "max_tokens": 12,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert isinstance(req["max_tokens"], int) and isinstance(req["temperature"], float)


def test_pick_model_prefers_the_configured_one_else_the_first_served() -> None:
    assert chat.pick_model("mine", ["a", "b"]) == "mine"
    assert chat.pick_model("", ["a", "b"]) == "a"
    with pytest.raises(ValueError, match="--model"):
        chat.pick_model("", [])


# ---- against the fake server ------------------------------------------------------------------


def test_stream_reaches_the_server_with_the_page_s_settings(fake: Server) -> None:
    client = chat.make_client(fake.openai_base_url, "EMPTY")
    model = chat.pick_model("", chat.served_models(client))
    assert model == "fake-model"
    for max_tokens, temperature in ((3, 0.0), (7, 1.3)):
        msgs = chat.build_messages("You are terse.", [], "Count.")
        request = chat.build_request(model, msgs, temperature=temperature, max_tokens=max_tokens)
        reply = chat.Reply()
        pieces = list(chat.stream_chat(client, request, reply))
        assert len(pieces) == max_tokens  # streamed: one piece per token
        assert reply.text == "".join(f"tok{i} " for i in range(max_tokens))
        assert (reply.completion_tokens, reply.finish_reason) == (max_tokens, "length")
        assert f"{max_tokens} completion tokens" in reply.summary()
        sent = last_request(fake)
        assert sent["max_tokens"] == max_tokens and sent["temperature"] == temperature
        assert sent["messages"][0] == {"role": "system", "content": "You are terse."}
        assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_second_turn_sends_the_whole_history(fake: Server) -> None:
    client = chat.make_client(fake.openai_base_url, "EMPTY")
    history: list[dict[str, Any]] = []
    for question in ("first?", "second?"):
        request = chat.build_request(
            "fake-model", chat.build_messages("", history, question), temperature=0, max_tokens=2
        )
        reply = chat.Reply()
        list(chat.stream_chat(client, request, reply))
        history += [
            {"role": "user", "content": question},
            {"role": "assistant", "content": reply.text},
        ]
    sent = last_request(fake)["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "user"]
    assert sent[1]["content"] == "tok0 tok1 " and sent[2]["content"] == "second?"


def test_wrong_key_is_explained(fake_keyed: Server) -> None:
    url = fake_keyed.openai_base_url
    with pytest.raises(openai.AuthenticationError) as err:
        chat.served_models(chat.make_client(url, "wrong-key"))
    message = chat.explain_error(err.value, url)
    assert "refused the API key (HTTP 401)" in message and "--api-key" in message
    assert chat.served_models(chat.make_client(url, "right-key")) == ["fake-model"]


def test_server_down_is_explained_at_once() -> None:
    url = dead_url()
    t0 = time.monotonic()
    with pytest.raises(openai.APIConnectionError) as err:
        chat.served_models(chat.make_client(url, "EMPTY"))
    assert time.monotonic() - t0 < 5, "no retries: a refused connection must fail at once"
    message = chat.explain_error(err.value, url)
    assert f"Cannot reach the server at {url}" in message and "Is it running?" in message


def test_unknown_model_is_explained(fake: Server) -> None:
    client = chat.make_client(fake.openai_base_url, "EMPTY")
    request = chat.build_request(
        "gpt-4", [{"role": "user", "content": "x"}], temperature=0, max_tokens=1
    )
    with pytest.raises(openai.NotFoundError) as err:
        list(chat.stream_chat(client, request, chat.Reply()))
    message = chat.explain_error(err.value, fake.openai_base_url)
    assert "The model `gpt-4` does not exist." in message and "/v1/models" in message


# ---- the page's own port -----------------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_check_port_free(busy_port: int) -> None:
    with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{busy_port}"):
        chat.check_port_free("127.0.0.1", busy_port)
    chat.check_port_free("127.0.0.1", free_port())  # no error


def test_streamlit_launcher_refuses_a_busy_port_and_leaves_nothing_running(busy_port: int) -> None:
    pytest.importorskip("streamlit")
    argv = ["--port", str(busy_port), "--base-url", dead_url()]
    proc = subprocess.Popen(
        [sys.executable, str(APPS / "streamlit_chat.py"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert proc.returncode == 1, out + err
    assert f"cannot listen on 127.0.0.1:{busy_port}" in err and "--port" in err
    with pytest.raises(ProcessLookupError):  # the whole process group is gone
        os.killpg(proc.pid, 0)


def test_gradio_page_refuses_a_busy_port_before_launching(busy_port: int) -> None:
    pytest.importorskip("gradio")
    import gradio_chat

    threads = threading.active_count()
    with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{busy_port}"):
        gradio_chat.main(["--port", str(busy_port), "--base-url", dead_url()])
    assert threading.active_count() == threads, "a server thread was started"


# ---- the streamlit page, headless ---------------------------------------------------------------


def streamlit_page(monkeypatch: pytest.MonkeyPatch, base_url: str, key: str = "EMPTY") -> Any:
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    monkeypatch.setattr(sys, "argv", ["streamlit_chat.py"])
    monkeypatch.setenv("OPENAI_BASE_URL", base_url)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.delenv("CHAT_MODEL", raising=False)
    return AppTest.from_file(str(APPS / "streamlit_chat.py"), default_timeout=30).run()


def test_streamlit_page_streams_and_sends_its_controls(
    fake: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = streamlit_page(monkeypatch, fake.openai_base_url)
    assert not at.exception and not at.error
    assert any("fake-model" in c.value for c in at.caption)
    at.number_input[0].set_value(5)
    at.slider[0].set_value(0.25)
    at.text_area[0].input("Answer in one word.")
    at.chat_input[0].set_value("Count to ten.").run()
    assert not at.exception and not at.error
    assistant = [m for m in at.chat_message if m.name == "assistant"]
    assert assistant and assistant[-1].markdown[0].value.strip() == "tok0 tok1 tok2 tok3 tok4"
    assert "5 completion tokens" in assistant[-1].caption[0].value
    sent = last_request(fake)
    assert (sent["max_tokens"], sent["temperature"]) == (5, 0.25)
    assert sent["messages"][0] == {"role": "system", "content": "Answer in one word."}
    # second turn: the history goes with it, the page's statistics do not
    at.chat_input[0].set_value("Again.").run()
    sent = last_request(fake)["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "user"]
    assert all(set(m) == {"role", "content"} for m in sent)


def test_streamlit_page_says_when_the_server_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    url = dead_url()
    at = streamlit_page(monkeypatch, url)
    assert not at.exception
    assert at.error and f"Cannot reach the server at {url}" in at.error[0].value
    assert at.chat_input[0].disabled


def test_streamlit_page_says_when_the_key_is_wrong(
    fake_keyed: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    at = streamlit_page(monkeypatch, fake_keyed.openai_base_url, key="wrong-key")
    assert at.error and "refused the API key (HTTP 401)" in at.error[0].value


# ---- the gradio page ---------------------------------------------------------------------------


def test_gradio_page_builds_and_its_chat_function_streams(fake: Server) -> None:
    pytest.importorskip("gradio")
    import gradio as gr
    import gradio_chat

    settings = chat.parse_settings(["--base-url", fake.openai_base_url])
    assert isinstance(gradio_chat.build_demo(settings), gr.Blocks)  # Gradio 6 API
    respond = gradio_chat.make_respond(settings)
    history = [  # Gradio 6 hands the history over like this
        {"role": "user", "content": [{"type": "text", "text": "hi"}], "metadata": None},
        {"role": "assistant", "content": [{"type": "text", "text": "tok0 "}], "metadata": None},
    ]
    outputs = list(respond("Count.", history, "Be brief.", 0.5, 4))
    assert len(outputs) >= 4  # one update per streamed piece, then the statistics
    text, stats = outputs[-1]
    assert text == "tok0 tok1 tok2 tok3 " and "4 completion tokens" in stats
    sent = last_request(fake)
    assert (sent["max_tokens"], sent["temperature"]) == (4, 0.5)
    assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
    assert sent["messages"][1]["content"] == "hi"


@pytest.mark.parametrize("problem", ["down", "wrong key"])
def test_gradio_page_shows_errors_in_the_page(problem: str, fake_keyed: Server) -> None:
    pytest.importorskip("gradio")
    import gradio as gr
    import gradio_chat

    url = dead_url() if problem == "down" else fake_keyed.openai_base_url
    settings = chat.parse_settings(["--base-url", url, "--api-key", "wrong-key"])
    respond = gradio_chat.make_respond(settings)
    with pytest.raises(gr.Error) as err:
        list(respond("hi", [], "", 0.7, 8))
    expected = "Cannot reach the server" if problem == "down" else "refused the API key"
    assert expected in err.value.message
