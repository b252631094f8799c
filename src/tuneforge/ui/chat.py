"""Chat through the serve engine: ``tuneforge serve`` started on a free loopback port for the chosen models.

The UI talks to the models exactly as any client of ``tuneforge serve`` does (its OpenAI-compatible API, its
continuous batching and limits), so it depends on serve's public command line only. One server holds every model
of a conversation (``tuned=runs/a base=runs/a/base`` side by side); the two most recent servers are kept warm and
older ones are stopped.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

from tuneforge.errors import UserError

KEEP_SERVERS = 2
START_TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, models: dict[str, str], log_path: Path):
        self.models = models
        self.port = free_port()
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the server
        argv = [sys.executable, "-m", "tuneforge", "serve", *(f"{n}={p}" for n, p in models.items()),
                "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while not self.ready.is_set():
            if self.proc.poll() is not None:
                raise UserError(f"the chat server exited (code {self.proc.returncode}): {self.tail()}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    self.ready.set()
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise UserError(f"the chat server did not start within {timeout:.0f} s: {self.tail()}")
            time.sleep(0.3)

    def tail(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-1500:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class ServePool:
    """Servers keyed by the set of models they hold."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.servers: OrderedDict[tuple, Server] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, models: dict[str, str]) -> Server:
        key = tuple(sorted(models.items()))
        with self.lock:
            server = self.servers.get(key)
            if server is not None and server.proc.poll() is not None:
                self.servers.pop(key).stop()
                server = None
            if server is None:
                while len(self.servers) >= KEEP_SERVERS:
                    self.servers.popitem(last=False)[1].stop()
                server = Server(models, self.log_dir / f"serve-{int(time.time())}.log")
                self.servers[key] = server
            self.servers.move_to_end(key)
        server.wait_ready()
        return server

    def close(self) -> None:
        with self.lock:
            for server in self.servers.values():
                server.stop()
            self.servers.clear()


async def stream_chat(server: Server, name: str, messages: list[dict], sampling: dict):
    """Text deltas of one streamed chat completion, as SSE ``data:`` lines for the page."""
    import httpx

    body = {"model": name, "messages": messages, "stream": True, **sampling}
    try:
        async with httpx.AsyncClient(timeout=None) as client, \
                client.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                try:
                    text = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                yield _sse({"error": text})
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data.strip() == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    yield _sse({"error": chunk["error"].get("message", str(chunk["error"]))})
                    return
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield _sse({"delta": text})
    except httpx.HTTPError as exc:
        yield _sse({"error": f"chat server: {exc}"})
        return
    yield _sse({"done": True})


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
