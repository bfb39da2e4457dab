"""The lean HTTP/1.1 client of the model gateway (stitchwork.compute._http1) against a scripted loopback server:
bodies by length, chunks and close; connection reuse; a kept connection the server closed; timeouts; bad answers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from stitchwork.compute._http1 import Http1Pool, HttpError, HttpTimeout
from stitchwork.compute.openai import OpenAICompatModel

Handler = Callable[[bytes, asyncio.StreamWriter, int], Any]
"""Gets each request's head + body, the connection's writer and the connection's number; writes the answer."""


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                result = self.handler(request, writer, number)
                if asyncio.iscoroutine(result):
                    result = await result
                await writer.drain()
                if result == "close":
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def __aenter__(self) -> Http1Pool:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.pool = Http1Pool("127.0.0.1", port, connect_s=2, read_s=2)
        return self.pool

    async def __aexit__(self, *_: Any) -> None:
        await self.pool.aclose()
        assert self.server is not None
        self.server.close()


def ok(body: bytes, *extra: str) -> bytes:
    return (f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n" + "".join(e + "\r\n" for e in extra)
            + "\r\n").encode() + body


async def test_a_body_by_length_and_the_connection_is_kept() -> None:
    server = Server(lambda request, writer, _: writer.write(ok(b'{"n": 1}')))
    async with server as pool:
        for _ in range(3):
            answer = await pool.request("POST", "/v1/chat/completions", {"content-type": "application/json"}, b"{}")
            assert (answer.status_code, await answer.read()) == (200, b'{"n": 1}')
            await answer.aclose()
    assert server.connections == 1 and pool.opened == 1
    first = server.requests[0]
    assert first.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"content-length: 2\r\n" in first and first.endswith(b"\r\n\r\n{}")


async def test_chunked_lines_across_chunks_with_extensions_and_trailers() -> None:
    def answer(request: bytes, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n")
        for piece in (b"data: {\"a\"", b": 1}\r\n\r\nda", b"ta: [DONE]\n\n", b"tail"):
            writer.write(f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n")
        writer.write(b"0\r\nx-trailer: 1\r\n\r\n")

    server = Server(answer)
    async with server as pool:
        for _ in range(2):
            response = await pool.request("POST", "/s", {})
            assert response.headers["content-type"] == "text/event-stream"
            assert [line async for line in response.aiter_lines()] == ['data: {"a": 1}', "", "data: [DONE]", "",
                                                                        "tail"]
            await response.aclose()
    assert server.connections == 1  # read to its end: reused


async def test_a_body_read_to_close_is_not_reused() -> None:
    def answer(request: bytes, writer: asyncio.StreamWriter, _: int) -> str:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        return "close"

    server = Server(answer)
    async with server as pool:
        for _ in range(2):
            response = await pool.request("GET", "/", {})
            assert await response.aread() == b"all of it"
            await response.aclose()
    assert server.connections == 2


async def test_a_stream_left_half_read_closes_its_connection() -> None:
    def answer(request: bytes, writer: asyncio.StreamWriter, _: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")  # and then nothing

    server = Server(answer)
    async with server as pool:
        response = await pool.request("POST", "/", {})
        assert await anext(aiter(response.chunks())) == b"hello"
        await response.aclose()
        response = await pool.request("POST", "/", {})
        await response.aclose()
    assert server.connections == 2


async def test_a_kept_connection_the_server_closed_is_replaced_once() -> None:
    def answer(request: bytes, writer: asyncio.StreamWriter, number: int) -> str | None:
        writer.write(ok(f"conn {number}".encode()))
        return "close" if number == 1 else None  # closes after answering, without saying so

    server = Server(answer)
    async with server as pool:
        first = await pool.request("POST", "/", {}, b"1")
        assert await first.read() == b"conn 1"
        await first.aclose()
        await asyncio.sleep(0.05)
        stale = list(pool._idle)
        second = await pool.request("POST", "/", {}, b"2")  # seen closed while idle: not used
        assert await second.read() == b"conn 2"
        await second.aclose()
        pool._idle = stale + pool._idle
        pool._reusable = lambda: pool._idle.pop(0) if pool._idle else None  # type: ignore[method-assign]
        third = await pool.request("POST", "/", {}, b"3")  # closed under it: sent again on the next one
        assert await third.read() == b"conn 2"
        await third.aclose()
    assert [r[-1:] for r in server.requests] == [b"1", b"2", b"3"]  # each received once


async def test_a_new_connection_closed_without_an_answer_fails() -> None:
    server = Server(lambda request, writer, _: "close")
    async with server as pool:
        with pytest.raises(HttpError, match="closed the connection without answering"):
            await pool.request("POST", "/", {}, b"x")
    assert server.connections == 1  # not retried on a new connection


async def test_timeouts_and_refused_connections() -> None:
    async def slow(request: bytes, writer: asyncio.StreamWriter, _: int) -> None:
        await asyncio.sleep(5)

    server = Server(slow)
    async with server as pool:
        pool.read_s = 0.05
        with pytest.raises(HttpTimeout, match="no answer"):
            await pool.request("POST", "/", {}, b"x")
    port = pool.port
    with pytest.raises(HttpError, match="cannot connect"):
        await Http1Pool("127.0.0.1", port, connect_s=1).request("GET", "/", {})


@pytest.mark.parametrize("head", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\ncontent-length: -4\r\n\r\n",
                                  b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
                                  b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcXY"])
async def test_answers_that_are_not_http_fail_cleanly(head: bytes) -> None:
    server = Server(lambda request, writer, _: writer.write(head))
    async with server as pool:
        with pytest.raises(HttpError):
            response = await pool.request("GET", "/", {})
            await response.read()


async def test_a_header_with_a_line_break_is_refused_before_sending() -> None:
    server = Server(lambda request, writer, _: writer.write(ok(b"")))
    async with server as pool:
        with pytest.raises(HttpError, match="line break"):
            await pool.request("POST", "/", {"authorization": "Bearer x\r\nx-injected: 1"})
    assert server.requests == []


async def test_the_openai_client_uses_it_for_plain_http_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("http_proxy", raising=False)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    assert OpenAICompatModel("openai+http://gpu:8000/v1?model=m")._pool is not None
    assert OpenAICompatModel("openai+https://gpu/v1?model=m")._pool is None
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert OpenAICompatModel("openai+http://gpu:8000/v1?model=m")._pool is None  # httpx honours the proxy


async def test_the_openai_client_over_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    completion = (b'{"choices": [{"message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}], '
                  b'"usage": {"prompt_tokens": 1, "completion_tokens": 1}}')
    stream = (b"data: {\"choices\": [{\"delta\": {\"content\": \"h\"}}]}\n\ndata: {\"choices\": [{\"delta\": "
              b"{\"content\": \"i\"}, \"finish_reason\": \"stop\"}]}\n\ndata: [DONE]\n\n")

    def answer(request: bytes, writer: asyncio.StreamWriter, _: int) -> None:
        if b'"stream":true' in request:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(f"{len(stream):x}\r\n".encode() + stream + b"\r\n0\r\n\r\n")
        elif b"too-long" in request:
            body = b'{"error": {"message": "maximum context length is 8 tokens", "code": 400}}'
            writer.write(b"HTTP/1.1 400 Bad\r\n" + f"content-length: {len(body)}\r\n\r\n".encode() + body)
        else:
            writer.write(ok(completion))

    server = Server(answer)
    async with server as pool:
        model = OpenAICompatModel(f"openai+http://127.0.0.1:{pool.port}/v1?model=m")
        assert model._pool is not None
        model._pool = pool
        out = await model.chat({"messages": [{"role": "user", "content": "x"}]})
        assert out["choices"][0]["message"]["content"] == "hi"
        chunks = [c async for c in model.chat_stream({"messages": [{"role": "user", "content": "x"}]})]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == "hi"
        from stitchwork.errors import ContextLengthExceeded

        with pytest.raises(ContextLengthExceeded):
            await model.chat({"messages": [{"role": "user", "content": "too-long"}]})
    assert server.connections == 1
    assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")



def test_connections_of_a_finished_event_loop_are_not_reused() -> None:
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(conn)
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    def answer(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(ok(b"x"))

    threading.Thread(target=serve, daemon=True).start()
    pool = Http1Pool("127.0.0.1", listener.getsockname()[1], connect_s=2, read_s=2)

    async def two() -> list[bytes]:
        out = []
        for _ in range(2):
            answer = await pool.request("GET", "/", {})
            out.append(await answer.read())
            await answer.aclose()
        return out

    try:
        assert asyncio.run(two()) == [b"x", b"x"]
        assert pool.opened == 1 and len(pool._idle) == 1
        assert asyncio.run(two()) == [b"x", b"x"]  # a new loop: a new connection, then kept on this loop
        assert pool.opened == 2
    finally:
        listener.close()
