"""A streamlit chat page for any OpenAI-compatible server (vLLM, llama.cpp, trtllm-serve, ...).

Start the model server first, then either of (both listen on 127.0.0.1 only):

    python apps/streamlit_chat.py --port 8501 --base-url http://127.0.0.1:8000/v1
    streamlit run apps/streamlit_chat.py --server.address 127.0.0.1 --server.port 8501 \
        -- --base-url http://127.0.0.1:8000/v1

and open http://127.0.0.1:8501. Flags and environment variables: see ``python
apps/streamlit_chat.py --help`` and ``openai_chat.parse_settings``. Needs ``pip install
streamlit openai`` and ``openai_chat.py`` next to this file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import openai
import streamlit as st
from openai_chat import (
    Reply,
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

DEFAULT_PORT = 8501


def launch(argv: Sequence[str]) -> None:
    """``python streamlit_chat.py [flags]``: check the port, then replace this process with
    ``streamlit run`` listening on ``--host`` (127.0.0.1 by default) and ``--port``."""
    settings = parse_settings(argv, default_port=DEFAULT_PORT)
    check_port_free(settings.host, settings.port)
    command = [
        sys.executable, "-m", "streamlit", "run", os.path.abspath(__file__),
        "--server.address", settings.host,
        "--server.port", str(settings.port),
        "--server.headless", "true",  # no browser window, no e-mail prompt
        "--browser.gatherUsageStats", "false",
        "--", *argv,
    ]  # fmt: skip
    print(f"chat page: http://{settings.host}:{settings.port}  ->  {settings.base_url}", flush=True)
    os.execv(sys.executable, command)


@st.cache_resource
def client_for(base_url: str, api_key: str) -> openai.OpenAI:
    return make_client(base_url, api_key)


def page() -> None:
    """The page. Streamlit runs this whole file again after every interaction; what must
    survive a rerun (the conversation) lives in ``st.session_state``."""
    settings = parse_settings(sys.argv[1:], default_port=DEFAULT_PORT)
    st.set_page_config(page_title="Qwen chat", page_icon="💬")
    client = client_for(settings.base_url, settings.api_key)

    with st.sidebar:
        st.markdown("## Qwen chat")
        st.caption(f"server · 服务: `{settings.base_url}`")
        system_prompt = st.text_area("系统提示 · system prompt", settings.system_prompt)
        temperature = st.slider("temperature", 0.0, 2.0, settings.temperature, step=0.05)
        max_tokens = st.number_input("max_tokens", 1, 32768, settings.max_tokens, step=1)
        if st.button("清空对话 · clear"):
            st.session_state.messages = []
        address = st.get_option("server.address")
        if address not in ("127.0.0.1", "localhost", "::1"):
            st.warning(f"This page listens on {address or 'every interface'}: others can use it.")

    st.title("Qwen chat · 聊天")
    if "messages" not in st.session_state:
        st.session_state.messages = []  # {"role", "content"}, plus "stats" on answers

    try:
        model = pick_model(settings.model, served_models(client))
        st.caption(f"model · 模型: `{model}`")
    except (openai.OpenAIError, ValueError) as exc:
        st.error(explain_error(exc, settings.base_url))
        model = ""

    for msg in st.session_state.messages:
        with st.chat_message(msg["role"]):
            st.markdown(msg["content"])
            if msg.get("stats"):
                st.caption(msg["stats"])

    if prompt := st.chat_input("输入问题 · your message", disabled=not model):
        history = st.session_state.messages
        request = build_request(
            model,
            build_messages(system_prompt, history, prompt),
            temperature=temperature,
            max_tokens=max_tokens,
        )
        with st.chat_message("user"):
            st.markdown(prompt)
        with st.chat_message("assistant"):
            reply = Reply()
            try:
                st.write_stream(stream_chat(client, request, reply))
            except openai.OpenAIError as exc:
                st.error(explain_error(exc, settings.base_url))
                return  # the failed turn is not added to the history
            st.caption(reply.summary())
        history.append({"role": "user", "content": prompt})
        history.append({"role": "assistant", "content": reply.text, "stats": reply.summary()})


if __name__ == "__main__":
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    if get_script_run_ctx(suppress_warning=True) is None:  # `python streamlit_chat.py ...`
        launch(sys.argv[1:])
    else:  # `streamlit run streamlit_chat.py`: draw the page
        page()
