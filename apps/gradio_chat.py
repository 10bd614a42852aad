"""A gradio chat page for any OpenAI-compatible server (vLLM, llama.cpp, trtllm-serve, ...).

Start the model server first, then:

    python apps/gradio_chat.py --port 7860 --base-url http://127.0.0.1:8000/v1

and open http://127.0.0.1:7860 (it listens on 127.0.0.1 only; ``--host 0.0.0.0`` exposes it).
Flags and environment variables: ``python apps/gradio_chat.py --help``. Written for Gradio 6
(``pip install gradio openai``); needs ``openai_chat.py`` next to this file.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gradio as gr
import openai
from openai_chat import (
    Reply,
    Settings,
    build_messages,
    build_request,
    check_port_free,
    explain_error,
    make_client,
    parse_settings,
    pick_model,
    served_models,
    stream_chat,
)

DEFAULT_PORT = 7860


def make_respond(settings: Settings) -> Callable[..., Iterator[tuple[str, str]]]:
    """The function ``gr.ChatInterface`` calls for each message: it receives the message, the
    history (a list of ``{"role", "content"}`` dicts) and the values of the extra inputs, and
    yields (answer so far, statistics line) - the yielding is what streams the answer."""
    client = make_client(settings.base_url, settings.api_key)
    model_cache: list[str] = []

    def respond(
        message: str,
        history: list[dict[str, Any]],
        system_prompt: str,
        temperature: float,
        max_tokens: float,
    ) -> Iterator[tuple[str, str]]:
        reply = Reply()
        try:
            if not model_cache:
                model_cache.append(pick_model(settings.model, served_models(client)))
            request = build_request(
                model_cache[0],
                build_messages(system_prompt, history, message),
                temperature=temperature,
                max_tokens=int(max_tokens),
            )
            for _piece in stream_chat(client, request, reply):
                yield reply.text, "…"
        except (openai.OpenAIError, ValueError) as exc:
            raise gr.Error(explain_error(exc, settings.base_url), duration=None) from exc
        yield reply.text, reply.summary()

    return respond


def build_demo(settings: Settings) -> gr.Blocks:
    """The page: a header, the chat, its settings (an open accordion under the chat; created
    with ``render=False`` so that ChatInterface places them), and the statistics line."""
    with gr.Blocks(title="Qwen chat", analytics_enabled=False) as demo:  # no usage reports
        gr.Markdown(f"## Qwen chat · 聊天\nserver · 服务: `{settings.base_url}`")
        settings_inputs = [
            gr.Textbox(settings.system_prompt, label="系统提示 · system prompt", render=False),
            gr.Slider(0.0, 2.0, settings.temperature, step=0.05, label="temperature", render=False),
            gr.Slider(1, 4096, settings.max_tokens, step=1, label="max_tokens", render=False),
        ]
        stats = gr.Markdown(elem_id="reply-stats", render=False)
        gr.ChatInterface(
            make_respond(settings),
            additional_inputs=settings_inputs,
            additional_inputs_accordion=gr.Accordion("设置 · settings", open=True, render=False),
            additional_outputs=[stats],
            textbox=gr.Textbox(
                placeholder="输入问题 · your message",
                submit_btn=True,
                elem_id="message",
                render=False,
            ),
            api_name="chat",  # gradio_client: Client(url).predict(..., api_name="/chat")
            concurrency_limit=16,  # gradio's default, 1, makes a whole class wait in one queue
            analytics_enabled=False,
            fill_height=False,
        )
        stats.render()  # the statistics line of the last answer, under the chat
    return demo


def main(argv: Sequence[str]) -> None:
    settings = parse_settings(argv, default_port=DEFAULT_PORT)
    check_port_free(settings.host, settings.port)
    try:
        models = served_models(make_client(settings.base_url, settings.api_key))
        print(f"server {settings.base_url} serves: {', '.join(models)}", flush=True)
    except openai.OpenAIError as exc:  # not fatal: the server may come up later
        print(f"warning: {explain_error(exc, settings.base_url)}", file=sys.stderr, flush=True)
    demo = build_demo(settings)
    print(f"chat page: http://{settings.host}:{settings.port}  ->  {settings.base_url}", flush=True)
    demo.queue().launch(server_name=settings.host, server_port=settings.port, share=False)


if __name__ == "__main__":
    main(sys.argv[1:])
