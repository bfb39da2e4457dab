"""The OpenAI-compatible client keeps its upstream connections: a finished stream leaves its connection in the pool.

A raw HTTP/1.1 server here counts the connections it accepts; it answers each request with a chunked SSE stream
(one chunk, ``[DONE]``, the end of the body), or, in ``hold`` mode, keeps the body open after ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from stitchwork.compute._base import open_model

CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]}


class SSEServer:
    def __init__(self, *, hold: bool) -> None:
        self.hold = hold
        self.connections = 0
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                await reader.readexactly(length)
                self.requests += 1
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                for event in (b"data: " + json.dumps(CHUNK).encode() + b"\n\n", b"data: [DONE]\n\n"):
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                if self.hold:
                    await asyncio.sleep(3600)  # the body never ends
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> SSEServer:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def _stream(port: int) -> AsyncIterator[list[dict[str, object]]]:
    model = open_model(f"openai+http://127.0.0.1:{port}/v1?profile=generic&model=m&stream=1&timeout=30")
    try:
        while True:
            yield [c async for c in model.chat_stream({"messages": [{"role": "user", "content": "x"}]})]
    finally:
        await model.aclose()


@pytest.mark.parametrize("hold", [False, True])
async def test_streams_reuse_one_connection_unless_the_server_keeps_the_body_open(hold: bool) -> None:
    async with SSEServer(hold=hold) as server:
        streams = _stream(server.port)
        for _ in range(3):
            chunks = await anext(streams)
            assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["hi"]  # type: ignore[index]
        await streams.aclose()
    assert server.requests == 3
    # A finished body goes back to the pool; a body held open past [DONE] costs its connection (and only that).
    assert server.connections == (3 if hold else 1)
