"""A local model: ``llamacpp:///abs/path/model.gguf?ctx=4096`` runs llama.cpp's ``llama-server`` (with ``--jinja``,
so tool calls use the model's chat template) on a free loopback port and talks to it with the ``llamacpp``
profile of the OpenAI client. Needs ``llama-server`` on ``PATH`` (or ``?binary=``); the server is started on the
first call and stopped by :meth:`aclose`."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx

from stitchwork.compute._base import Model, ModelTurn
from stitchwork.compute.openai import OpenAICompatModel
from stitchwork.errors import ConfigError, ModelUnavailable


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LlamaCppModel(Model):
    """llama.cpp's OpenAI-compatible server, spawned for one GGUF file."""

    def __init__(self, uri: str, **_: Any) -> None:
        self.uri = uri
        parts = urlsplit(uri)
        self.path = Path(parts.netloc + parts.path)
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        binary = options.get("binary") or shutil.which("llama-server")
        if not binary:
            raise ConfigError("llamacpp:// needs llama.cpp's llama-server on PATH (build llama.cpp, or pass "
                              "?binary=/path/to/llama-server)")
        if not self.path.is_file():
            raise ConfigError(f"llamacpp:// model file {self.path} does not exist")
        self.binary = binary
        self.ctx = options.get("ctx", "4096")
        self.start_timeout_s = float(options.get("start_timeout", 120))
        self._process: asyncio.subprocess.Process | None = None
        self._client: OpenAICompatModel | None = None
        self._lock = asyncio.Lock()

    async def _ensure(self) -> OpenAICompatModel:
        async with self._lock:
            if self._client is not None and self._process is not None and self._process.returncode is None:
                return self._client
            port = _free_port()
            self._process = await asyncio.create_subprocess_exec(
                self.binary, "-m", str(self.path), "--jinja", "--host", "127.0.0.1", "--port", str(port),
                "-c", self.ctx, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(timeout=2) as http:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + self.start_timeout_s
                while loop.time() < deadline:
                    if self._process.returncode is not None:
                        raise ModelUnavailable(f"llama-server exited with code {self._process.returncode}")
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get(url + "/health")).status_code == 200:
                            break
                    await asyncio.sleep(0.2)
                else:
                    await self.aclose()
                    raise ModelUnavailable(f"llama-server did not become healthy in {self.start_timeout_s:g}s")
            self._client = OpenAICompatModel(f"openai+{url}/v1?profile=llamacpp&model={self.path.name}")
            return self._client

    async def chat(self, request: Mapping[str, Any]) -> dict[str, Any]:
        return await (await self._ensure()).chat(request)

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> ModelTurn:
        return await (await self._ensure()).complete(messages, tools)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            try:
                await asyncio.wait_for(self._process.wait(), 5)
            except TimeoutError:
                self._process.kill()
                await self._process.wait()
        self._process = None


__all__ = ["LlamaCppModel"]
