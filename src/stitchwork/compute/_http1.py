"""A small HTTP/1.1 client for plain ``http://`` model servers: keep-alive connections on asyncio streams.

The model gateway sends every model request through here when the deployment is ``openai+http://`` (no TLS) and
no proxy is configured in the environment; ``https://``, proxies and injected clients keep using httpx. httpx
(with httpcore, anyio and h11) cost about half of the gateway's CPU per model request (py-spy, bench/compute.py):
a request here is one write and, for a JSON answer, two reads (head, then body by ``Content-Length`` or chunks).

What it does: ``POST``/``GET`` with a byte body and ``Content-Length``; answers with ``Content-Length``, ``chunked``
or read-to-close bodies; idle connections reused (LIFO, at most ``max_idle``); a request on a reused connection
that the server had closed meanwhile (nothing at all came back) is sent once more on a new connection, before any
byte of an answer. Timeouts: ``connect_s`` to connect, ``read_s`` for each read and write (like httpx's per
operation timeouts: a long stream is fine as long as bytes keep coming). Errors are :class:`HttpError` (and
:class:`HttpTimeout`); the caller maps them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable

MAX_HEAD = 64 * 1024
"""Longest status line and headers accepted."""
MAX_BODY = 256 * 1024 * 1024
"""Longest answer body read whole."""


class HttpError(Exception):
    """The request failed: connection refused or cut, or an answer that is not HTTP/1.1."""


class HttpTimeout(HttpError):
    """Connecting, sending or reading took longer than allowed."""


class Headers(dict[str, str]):
    """Answer headers, names lower-cased (a repeated header keeps its last value)."""


class Response:
    """An answer whose head has been read; its body is read with :meth:`read` or :meth:`lines`, then
    :meth:`aclose` returns the connection to the pool (or closes it if the body was not read to its end)."""

    def __init__(self, pool: Http1Pool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int,
                 headers: Headers, *, head_only: bool = False) -> None:
        self._pool = pool
        self._reader = reader
        self._writer: asyncio.StreamWriter | None = writer
        self.status_code = status
        self.headers = headers
        self._keep = headers.get("connection", "").lower() != "close"
        encoding = headers.get("transfer-encoding", "").lower()
        self._chunked = "chunked" in encoding
        length = headers.get("content-length")
        self._length: int | None = None
        if head_only or status in {204, 304} or 100 <= status < 200:
            self._length = 0
        elif not self._chunked and length is not None:
            try:
                self._length = int(length)
            except ValueError:
                raise HttpError(f"invalid Content-Length {length!r}") from None
            if self._length < 0:
                raise HttpError(f"invalid Content-Length {length!r}")
        elif not self._chunked:
            self._keep = False  # read to close
        self._done = self._length == 0

    async def _read(self, pending: Awaitable[bytes]) -> bytes:
        try:
            async with asyncio.timeout(self._pool.read_s):
                return await pending
        except TimeoutError as exc:
            raise HttpTimeout(f"no answer from {self._pool.where} within {self._pool.read_s:g}s") from exc
        except asyncio.IncompleteReadError as exc:
            raise HttpError(f"{self._pool.where} closed the connection mid-answer") from exc
        except (OSError, asyncio.LimitOverrunError, ValueError) as exc:
            raise HttpError(f"{self._pool.where}: {type(exc).__name__} {exc}") from exc

    async def _more(self, buffer: bytearray) -> None:
        """Appends what the server sends next to ``buffer`` (one read, under the read timeout)."""
        piece = await self._read(self._reader.read(65536))
        if not piece:
            raise HttpError(f"{self._pool.where} closed the connection mid-answer")
        buffer += piece

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked encoding undone)."""
        reader = self._reader
        if self._done:
            return
        if self._length is not None:
            left = self._length
            while left:
                piece = await self._read(reader.read(min(left, 65536)))
                if not piece:
                    raise HttpError(f"{self._pool.where} closed the connection mid-answer")
                left -= len(piece)
                yield piece
        elif self._chunked:
            # Framing is parsed from this buffer, filled by plain reads: one read (and one timer) per arrival of
            # bytes rather than two per chunk (size line, then data).
            buffer = bytearray()
            while True:
                while (end := buffer.find(b"\r\n")) < 0:
                    if len(buffer) > MAX_HEAD:
                        raise HttpError(f"{self._pool.where} sent a chunk size line longer than {MAX_HEAD} bytes")
                    await self._more(buffer)
                line = bytes(buffer[:end])
                try:
                    size = int(line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    raise HttpError(f"{self._pool.where} sent a bad chunk size {line[:40]!r}") from None
                if size < 0:
                    raise HttpError(f"{self._pool.where} sent a bad chunk size {line[:40]!r}")
                if size == 0:
                    del buffer[:end + 2]
                    while (end := buffer.find(b"\r\n")) != 0:  # trailers, up to an empty line
                        if end > 0:
                            del buffer[:end + 2]
                        elif len(buffer) > MAX_HEAD:
                            raise HttpError(f"{self._pool.where} sent trailers longer than {MAX_HEAD} bytes")
                        else:
                            await self._more(buffer)
                    del buffer[:2]
                    if buffer:
                        self._keep = False  # bytes nobody asked for: do not reuse the connection
                    break
                while len(buffer) < end + 2 + size + 2:
                    await self._more(buffer)
                if buffer[end + 2 + size:end + 4 + size] != b"\r\n":
                    raise HttpError(f"{self._pool.where} sent a chunk without its line end")
                piece = bytes(buffer[end + 2:end + 2 + size])
                del buffer[:end + 4 + size]
                yield piece
        else:
            while piece := await self._read(reader.read(65536)):
                yield piece
        self._done = True

    async def read(self) -> bytes:
        """The whole body."""
        if self._length is not None and self._length > MAX_BODY:
            raise HttpError(f"{self._pool.where} answered more than {MAX_BODY} bytes")
        if self._length is not None and not self._done:
            body = await self._read(self._reader.readexactly(self._length)) if self._length else b""
            self._done = True
            return body
        parts: list[bytes] = []
        size = 0
        async for piece in self.chunks():
            size += len(piece)
            if size > MAX_BODY:
                raise HttpError(f"{self._pool.where} answered more than {MAX_BODY} bytes")
            parts.append(piece)
        return b"".join(parts)

    async def lines(self) -> AsyncIterator[str]:
        """The body as text lines (``\\n`` or ``\\r\\n``; UTF-8, bad bytes replaced), as they arrive."""
        rest = b""
        async for piece in self.chunks():
            rest += piece
            if b"\n" not in piece:
                if len(rest) > MAX_BODY:
                    raise HttpError(f"{self._pool.where} sent a line longer than {MAX_BODY} bytes")
                continue
            *complete, rest = rest.split(b"\n")
            for line in complete:
                yield line.rstrip(b"\r").decode("utf-8", "replace")
        if rest:
            yield rest.rstrip(b"\r").decode("utf-8", "replace")

    async def aread(self) -> bytes:
        """:meth:`read` (httpx's name)."""
        return await self.read()

    def aiter_lines(self) -> AsyncIterator[str]:
        """:meth:`lines` (httpx's name)."""
        return self.lines()

    async def aclose(self) -> None:
        """Back to the pool if the body was read to its end and the server keeps the connection; else closed."""
        writer, self._writer = self._writer, None
        if writer is None:
            return
        if self._done and self._keep and not self._reader.at_eof() and not writer.is_closing():
            self._pool._release(self._reader, writer)
        else:
            _close(writer)


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


class Http1Pool:
    """Keep-alive HTTP/1.1 connections to one ``host:port``.

    Args:
        host: Server host name or address.
        port: Server port.
        connect_s: Seconds to connect.
        read_s: Seconds for each read or write.
        max_idle: Idle connections kept.
    """

    def __init__(self, host: str, port: int, *, connect_s: float = 5.0, read_s: float = 120.0,
                 max_idle: int = 256) -> None:
        self.host, self.port = host, port
        self.connect_s, self.read_s, self.max_idle = connect_s, read_s, max_idle
        self.where = f"{host}:{port}"
        self._host_header = host if port == 80 else f"{host}:{port}"
        if ":" in host and not host.startswith("["):
            self._host_header = f"[{host}]" if port == 80 else f"[{host}]:{port}"
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop the idle connections belong to (a CLI may run several loops, one after another)."""
        self.opened = 0
        """Connections opened (tests and benches check reuse)."""

    def _release(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._idle) < self.max_idle and not writer.is_closing():
            self._idle.append((reader, writer))
        else:
            _close(writer)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.connect_s):
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_HEAD)
        except TimeoutError as exc:
            raise HttpTimeout(f"connecting to {self.where} took longer than {self.connect_s:g}s") from exc
        except OSError as exc:
            raise HttpError(f"cannot connect to {self.where}: {exc}") from exc
        self.opened += 1
        return reader, writer

    def _reusable(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # connections of another (likely closed) loop cannot be used on this one
            idle, self._idle, self._loop = self._idle, [], loop
            for _, writer in idle:
                _close(writer)
        while self._idle:
            reader, writer = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof() and not reader._buffer:  # type: ignore[attr-defined]
                return reader, writer
            _close(writer)  # closed by the server, or it sent something unasked
        return None

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> Response:
        """Sends one request and reads the answer's head; the caller reads the body and closes the response."""
        head = [f"{method} {path} HTTP/1.1\r\nhost: {self._host_header}\r\n"]
        for name, value in headers.items():
            if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                raise HttpError(f"header {name!r} holds a line break")
            head.append(f"{name}: {value}\r\n")
        if body or method in {"POST", "PUT", "PATCH"}:
            head.append(f"content-length: {len(body)}\r\n")
        head.append("\r\n")
        data = "".join(head).encode("latin-1") + body
        while True:
            reused = self._reusable()
            reader, writer = reused or await self._connect()
            try:
                return await self._exchange(reader, writer, data, head_only=method == "HEAD")
            except _NothingBack as exc:
                _close(writer)
                if reused is None:
                    raise HttpError(f"{self.where} closed the connection without answering") from exc.__cause__
                # a kept connection the server had closed meanwhile: once more on a new connection
            except BaseException:
                _close(writer)
                raise

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, *,
                        head_only: bool) -> Response:
        try:
            async with asyncio.timeout(self.read_s):
                writer.write(data)
                await writer.drain()
                try:
                    raw = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if not exc.partial:
                        raise _NothingBack from exc
                    raise
        except _NothingBack:
            raise
        except ConnectionError as exc:  # reset, or a broken pipe while sending
            raise _NothingBack from exc
        except TimeoutError as exc:
            raise HttpTimeout(f"no answer from {self.where} within {self.read_s:g}s") from exc
        except asyncio.LimitOverrunError as exc:
            raise HttpError(f"{self.where} sent a head longer than {MAX_HEAD} bytes") from exc
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise HttpError(f"{self.where}: {type(exc).__name__} {exc}") from exc
        status, headers = _parse_head(raw, self.where)
        while 100 <= status < 200 and status != 101:  # 100 Continue and the like: the real answer follows
            try:
                async with asyncio.timeout(self.read_s):
                    raw = await reader.readuntil(b"\r\n\r\n")
            except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                raise HttpError(f"{self.where}: {type(exc).__name__} {exc}") from exc
            status, headers = _parse_head(raw, self.where)
        return Response(self, reader, writer, status, headers, head_only=head_only)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, writer in idle:
            _close(writer)


class _NothingBack(Exception):
    """The connection was closed before any byte of an answer."""


def _parse_head(raw: bytes, where: str) -> tuple[int, Headers]:
    try:
        text = raw.decode("latin-1")
        status_line, _, rest = text.partition("\r\n")
        version, _, status_rest = status_line.partition(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError(status_line[:60])
        status = int(status_rest[:3])
        headers = Headers()
        for line in rest.split("\r\n"):
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(line[:60])
            headers[name.strip().lower()] = value.strip()
    except ValueError as exc:
        raise HttpError(f"{where} did not answer in HTTP/1.1: {exc}") from exc
    return status, headers


__all__ = ["Headers", "Http1Pool", "HttpError", "HttpTimeout", "Response"]
