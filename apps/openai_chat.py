"""Talk to any OpenAI-compatible chat server: the part of the two chat pages that is not UI.

``streamlit_chat.py`` and ``gradio_chat.py`` import this file (keep the three together when
you copy them). It needs only ``pip install openai``; every function below is plain Python,
so it can be tried in a notebook or a test without a web page:

    settings = parse_settings(["--base-url", "http://127.0.0.1:8000/v1"])
    client = make_client(settings.base_url, settings.api_key)
    model = pick_model(settings.model, served_models(client))
    request = build_request(model, build_messages("Be brief.", [], "Hi!"),
                            temperature=0.7, max_tokens=64)
    reply = Reply()
    for piece in stream_chat(client, request, reply):
        print(piece, end="")
    print(reply.summary())

Works with vLLM (``vllm serve`` / ``python -m vllm.entrypoints.openai.api_server``),
llama.cpp's ``llama-server``, ``python -m llama_cpp.server``, ``trtllm-serve`` and the
OpenAI API itself.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import openai
from openai import OpenAI

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # vLLM's and trtllm-serve's default port
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
LOOPBACK = "127.0.0.1"


# ---- settings ---------------------------------------------------------------------------


@dataclass
class Settings:
    base_url: str = DEFAULT_BASE_URL
    api_key: str = "EMPTY"
    model: str = ""  # empty: the first model the server lists
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    temperature: float = 0.7
    max_tokens: int = 512
    host: str = LOOPBACK
    port: int = 8501


def normalize_base_url(url: str) -> str:
    """'http://host:8000' and 'http://host:8000/' become 'http://host:8000/v1': the openai
    client appends '/chat/completions' to whatever it is given."""
    url = url.strip().rstrip("/")
    if urlsplit(url).path in ("", "/"):
        url += "/v1"
    return url


def parse_settings(argv: Sequence[str] | None = None, *, default_port: int = 8501) -> Settings:
    """Command-line flags; the environment variables ``OPENAI_BASE_URL``, ``OPENAI_API_KEY``
    (the ones the openai library reads too), ``CHAT_MODEL`` and ``CHAT_SYSTEM_PROMPT`` are
    the defaults. Unknown arguments are ignored (``streamlit run`` passes its own)."""
    env = os.environ
    p = argparse.ArgumentParser(
        description="chat page for an OpenAI-compatible server", allow_abbrev=False
    )
    p.add_argument(
        "--base-url",
        default=env.get("OPENAI_BASE_URL", DEFAULT_BASE_URL),
        help="the server's OpenAI API root, ending in /v1",
    )
    p.add_argument(
        "--api-key",
        default=env.get("OPENAI_API_KEY", "EMPTY"),
        help="the key the server was started with (--api-key); EMPTY if none",
    )
    p.add_argument(
        "--model",
        default=env.get("CHAT_MODEL", ""),
        help="model id; default: the first one listed at /v1/models",
    )
    p.add_argument("--system-prompt", default=env.get("CHAT_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT))
    p.add_argument("--temperature", type=float, default=0.7, help="initial value in the page")
    p.add_argument("--max-tokens", type=int, default=512, help="initial value in the page")
    p.add_argument(
        "--host",
        default=LOOPBACK,
        help="address the page listens on; 0.0.0.0 exposes it to the network",
    )
    p.add_argument("--port", type=int, default=default_port)
    args, _unknown = p.parse_known_args(argv)
    return Settings(
        base_url=normalize_base_url(args.base_url),
        api_key=args.api_key,
        model=args.model,
        system_prompt=args.system_prompt,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        host=args.host,
        port=args.port,
    )


# ---- the request ------------------------------------------------------------------------


def text_of(content: Any) -> str:
    """Message content as text. Gradio 6 hands history content over as a list of blocks
    (``[{"type": "text", "text": "..."}]``); plain strings pass through."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(text_of(part) for part in content)
    return "" if content is None else str(content)


def build_messages(
    system_prompt: str, history: Sequence[dict[str, Any]], user_message: str
) -> list[dict[str, str]]:
    """The whole conversation, which the server needs on every turn (it keeps no history):
    the system prompt first (left out when empty), then each earlier turn's role and text
    (other keys a page stores, such as statistics, are not sent), then the new message."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    for m in history:
        if m.get("role") in ("user", "assistant") and not (m.get("metadata") or {}).get("title"):
            messages.append({"role": m["role"], "content": text_of(m.get("content"))})
    messages.append({"role": "user", "content": user_message})
    return messages


def build_request(
    model: str, messages: list[dict[str, str]], *, temperature: float, max_tokens: int
) -> dict[str, Any]:
    """Keyword arguments for ``client.chat.completions.create``. Every control of the page
    ends up here (the seed tutorial's ``max_length`` slider never reached ``generate``)."""
    return {
        "model": model,
        "messages": messages,
        "temperature": float(temperature),
        "max_tokens": int(max_tokens),
        "stream": True,
        "stream_options": {"include_usage": True},  # a last chunk with the token counts
    }


def make_client(base_url: str, api_key: str) -> OpenAI:
    """No retries and a 5 s connect timeout, so a server that is down is reported at once
    (the openai default retries twice with back-off)."""
    timeout = openai.Timeout(300.0, connect=5.0)
    return OpenAI(base_url=base_url, api_key=api_key or "EMPTY", timeout=timeout, max_retries=0)


def served_models(client: OpenAI) -> list[str]:
    """The model ids the server lists at /v1/models."""
    return [m.id for m in client.models.list()]


def pick_model(configured: str, available: Sequence[str]) -> str:
    """The configured model, else the first one the server serves."""
    if configured:
        return configured
    if not available:
        raise ValueError("the server lists no models at /v1/models: pass --model")
    return available[0]


@dataclass
class Reply:
    """What came back: the text, the token counts (if the server reports them), timing."""

    model: str = ""
    text: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str | None = None
    first_token_s: float | None = None
    total_s: float | None = None

    def summary(self) -> str:
        if self.completion_tokens is None:
            tokens = "token counts not reported by the server"
        else:
            tokens = f"{self.prompt_tokens} prompt + {self.completion_tokens} completion tokens"
        parts = [self.model, tokens, f"finish_reason={self.finish_reason}"]
        if self.first_token_s is not None:
            parts.append(f"first token {self.first_token_s:.2f} s")
        if self.total_s is not None:
            parts.append(f"total {self.total_s:.1f} s")
        return " · ".join(parts)


def stream_chat(client: OpenAI, request: dict[str, Any], reply: Reply) -> Iterator[str]:
    """Send ``request`` (from :func:`build_request`) and yield the answer piece by piece,
    filling ``reply`` as the stream goes. openai's exceptions propagate (see
    :func:`explain_error`)."""
    reply.model = request["model"]
    t0 = time.perf_counter()
    for chunk in client.chat.completions.create(**request):
        if chunk.usage is not None:
            reply.prompt_tokens = chunk.usage.prompt_tokens
            reply.completion_tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        reply.finish_reason = choice.finish_reason or reply.finish_reason
        piece = choice.delta.content or ""
        if piece:
            if reply.first_token_s is None:
                reply.first_token_s = time.perf_counter() - t0
            reply.text += piece
            yield piece
    reply.total_s = time.perf_counter() - t0


# ---- errors -----------------------------------------------------------------------------


def explain_error(exc: BaseException, base_url: str) -> str:
    """One sentence that says what went wrong and what to do about it."""
    if isinstance(exc, openai.APIConnectionError):  # also APITimeoutError
        why = exc.__cause__ or exc  # e.g. httpx.ConnectError: [Errno 111] Connection refused
        return (
            f"Cannot reach the server at {base_url} ({why}). Is it running? Start it first "
            "(notebooks 05 and 09 show how), or fix --base-url / OPENAI_BASE_URL; then send "
            "the message again."
        )
    if isinstance(exc, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return (
            f"The server at {base_url} refused the API key (HTTP {exc.status_code}). Use the "
            "key the server was started with (its --api-key): --api-key or OPENAI_API_KEY."
        )
    if isinstance(exc, openai.NotFoundError):
        return (
            f"HTTP 404 from {base_url}: {server_message(exc)}. Check that --base-url ends in "
            "/v1 and that --model is one of the ids the server lists at /v1/models."
        )
    if isinstance(exc, openai.APIStatusError):
        return f"The server at {base_url} answered HTTP {exc.status_code}: {server_message(exc)}"
    return f"{type(exc).__name__}: {exc}"


def server_message(exc: openai.APIStatusError) -> str:
    """The server's own words from an error answer (vLLM: ``{"error": {"message": ...}}``)."""
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(exc.message)


# ---- the page's own port ---------------------------------------------------------------------


def check_port_free(host: str, port: int) -> None:
    """Raise ``SystemExit`` with advice if something already listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise SystemExit(
                f"error: cannot listen on {host}:{port} ({exc.strerror}). Another program "
                f"(an earlier chat page?) uses that port: stop it (`ss -ltnp | grep :{port}` "
                "shows which) or choose another --port."
            ) from None
