"""llama-server on one GGUF, on a free 127.0.0.1 port, for as long as a check needs it.

The apps people load GGUFs in (llama-server, and the ones built on llama.cpp) render chat templates with
llama.cpp's own Jinja engine and parse tool calls with its own parsers; the way to know what they do with a file
is to ask that engine. The server comes from the same llama.cpp tree and flags as the bindings (./scripts/setup.sh)
and runs with only what the checks need: no web UI, no warm-up, one slot, a small context.
"""

from __future__ import annotations

import collections
import json
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ...errors import QuantkitError, ToolError
from ...procs import child_env, die_with_parent, stop
from .llamacpp import find_tool
from .shards import model_file

# Long enough for every check's prompt (a few hundred tokens) and a short reply.
SERVER_CTX = 2048
START_TIMEOUT = 300.0  # seconds to load the file: a 7B Q8_0 read from a cold disk
REQUEST_TIMEOUT = 120.0


class EngineError(QuantkitError):
    """llama-server refused the file's template when it started (status 0), or answered a request with an error
    (its HTTP status): `engine_message` is its own words."""

    def __init__(self, engine_message: str, status: int) -> None:
        super().__init__(f"llama-server: {engine_message}", "")
        self.engine_message = engine_message
        self.status = status


class LlamaServer:
    """`with LlamaServer(path) as server: server.post("/apply-template", {...})`. Leaving the block stops it."""

    def __init__(self, path: Path, threads: int = 2, ctx: int = SERVER_CTX, template_file: Path | None = None) -> None:
        """`template_file`: a chat template to run instead of the file's own (--chat-template-file)."""
        self.path, self.threads, self.ctx, self.template_file = path, threads, ctx, template_file
        self.port = 0
        self._proc: subprocess.Popen | None = None
        self._log = None

    def __enter__(self) -> "LlamaServer":
        for attempt in range(3):  # the port is free when picked; another process may take it before the server binds
            self.port = _free_port()
            self._start()
            if self._wait_ready():
                return self
            tail = self._tail()
            self.stop()
            if any("chat template is not supported" in line or "chat template parsing error" in line for line in tail):
                # The engine could not parse or run the template (the file's, or one given on the command line):
                # its own words are on an "Error:" line.
                why = next((l for l in tail if l.lstrip().startswith("Error:")), "the template is not supported")
                raise EngineError(why.strip().removeprefix("Error:").strip(), 0)
            if not any("bind" in line.lower() for line in tail) or attempt == 2:
                cause = next((l for l in reversed(tail) if "error" in l.lower()), tail[-1] if tail else "no output")
                raise ToolError(f"llama-server could not load {self.path.name}: {cause.strip()}",
                                "run the file with llama-server by hand to see its whole log")
        raise AssertionError("unreachable")

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        self._log = tempfile.TemporaryFile(mode="w+", errors="replace")
        args = [str(find_tool("llama-server")), "-m", str(model_file(self.path)), "--host", "127.0.0.1",
                "--port", str(self.port), "--jinja", "-c", str(self.ctx), "-np", "1", "-t", str(self.threads),
                "--no-webui", "--no-warmup", "--offline", "-ngl", "0"]
        if self.template_file is not None:
            args += ["--chat-template-file", str(self.template_file)]
        self._proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, env=child_env(),
                                      preexec_fn=die_with_parent())

    def _wait_ready(self) -> bool:
        """True once /health answers 200 (it answers 503 while the model loads); False if the server exited."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.05)
        return False

    def _tail(self) -> list[str]:
        if self._log is None:
            return []
        self._log.seek(0)
        return list(collections.deque(self._log, maxlen=20))

    def stop(self) -> None:
        if self._proc is not None:
            stop(self._proc, grace_s=10)
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def post(self, route: str, body: dict) -> dict:
        """POST JSON; an error answer raises EngineError with the server's own message."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{route}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raw = e.read().decode("utf-8", errors="replace")
            try:
                error = json.loads(raw).get("error", raw)
                message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
            except (ValueError, AttributeError):
                message = raw
            raise EngineError(message.strip() or f"HTTP {e.code}", e.code) from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
