"""A tiny OpenAI-compatible server for testing labhelpers.serve and labhelpers.loadtest.

Standard library only; starts in well under a second. Serves GET /health, GET /v1/models
and POST /v1/chat/completions (JSON or server-sent events with a final usage chunk). Each
answer is ``max_tokens`` words ("tok0 tok1 ..."), one every ``--token-delay`` seconds.
GET /debug/last-request returns the JSON body of the last chat request (null before the
first), so a test can check what a client really sent (tests/test_apps.py).

``--model NAME`` sets the one model it serves (default ``fake-model``).

Modes (``--mode``), to exercise failure handling:
  ok            serve normally
  crash         print a message to stderr and exit with code 3 during start-up
  never-ready   serve, but /health always answers 503
  ignore-term   ignore SIGTERM (only SIGKILL stops it)
  with-child    also start a child process (like vLLM's engine workers) in the same group
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "fake-model"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", default="ok")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--token-delay", type=float, default=0.0)
    args = parser.parse_args()

    print(f"fake server starting in mode {args.mode}", flush=True)
    if args.mode == "crash":
        time.sleep(0.2)
        print("RuntimeError: fake crash while loading the model", file=sys.stderr, flush=True)
        sys.exit(3)
    if args.mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.mode == "with-child":
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)  # fake-worker"]
        )
        print(f"worker pid {child.pid}", flush=True)
    time.sleep(args.startup_delay)
    last_request: list[object] = [None]

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *a: object) -> None:
            print(fmt % a, flush=True)

        def _json(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": {"message": message, "code": status}})

        def _authorized(self) -> bool:
            if args.api_key is None:
                return True
            return self.headers.get("Authorization") == f"Bearer {args.api_key}"

        def do_GET(self) -> None:
            if self.path == "/health":
                if args.mode == "never-ready":
                    self._error(503, "not ready")
                else:
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
            elif self.path == "/debug/last-request":
                self._json(200, last_request[0])
            elif not self._authorized():
                self._error(401, "Unauthorized")
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": args.model, "object": "model"}]})
            else:
                self._error(404, f"no route {self.path}")

        def do_POST(self) -> None:
            if not self._authorized():
                return self._error(401, "Unauthorized")
            if self.path != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}")
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                body = json.loads(raw)
            except ValueError as exc:
                return self._error(400, f"JSON decode error: {exc}")
            last_request[0] = body
            if not isinstance(body.get("messages"), list):
                return self._error(400, "messages: Input should be a valid list")
            if body.get("model") != args.model:
                return self._error(404, f"The model `{body.get('model')}` does not exist.")
            n = int(body.get("max_tokens") or 16)
            words = [f"tok{i} " for i in range(n)]
            usage = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
            if not body.get("stream"):
                time.sleep(args.token_delay * n)
                message = {"role": "assistant", "content": "".join(words)}
                return self._json(
                    200,
                    {
                        "id": "cmpl-1",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": args.model,
                        "choices": [{"index": 0, "message": message, "finish_reason": "length"}],
                        "usage": usage,
                    },
                )
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()

            def send(chunk: dict) -> None:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            base = {
                "id": "cmpl-1",
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": args.model,
            }
            for i, word in enumerate(words):
                time.sleep(args.token_delay)
                finish = "length" if i == n - 1 else None
                choice = {"index": 0, "delta": {"content": word}, "finish_reason": finish}
                send({**base, "choices": [choice]})
            if (body.get("stream_options") or {}).get("include_usage"):
                send({**base, "choices": [], "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    print(f"listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
