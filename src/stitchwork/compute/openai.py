"""One client for every OpenAI-compatible chat server: ``openai+http(s)://host:port/v1?profile=vllm&model=NAME``.

Query parameters:
    profile: ``vllm`` | ``sglang`` | ``llamacpp`` | ``ollama`` | ``generic`` (default), see
        :mod:`stitchwork.compute.profiles` for the quirks each one works around.
    model: The model name the server knows. Without it the client asks ``GET /v1/models`` once: a server that
        serves one model gets that one; one that serves several gets the request's model name if it is among
        them, else the call fails with :class:`ModelNotFound` listing what the server serves.
    key: ``secret://NAME``, the provider key in the vault; injected by the model gateway, never a raw key.
    timeout: Seconds for the whole request (default 120); ``connect_timeout`` for the connection (default 5).
    stream: ``1`` to have :meth:`chat` and :meth:`complete` stream and assemble (default: unstreamed).

Errors: 429, 5xx, timeouts, refused connections and cut streams raise :class:`ModelUnavailable` (a router tries
elsewhere; ``retry_after_s`` from a ``Retry-After`` header); other 4xx raise :class:`ModelRejected` (with the server
flag to add when the profile knows it), :class:`ModelNotFound` for an unknown model (404, ``model_not_found``) and
:class:`ContextLengthExceeded` for a prompt longer than the model's context, whichever of the documented error
bodies the backend sends (``{"error": {...}}`` or vLLM/SGLang's top-level ``{"object": "error", ...}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import string
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import orjson

from stitchwork.compute._base import ChatCompletionsModel
from stitchwork.compute._http1 import Http1Pool, HttpError, HttpTimeout
from stitchwork.compute._keys import parse_key_ref, resolve_key
from stitchwork.compute._wire import StreamAssembler, chunks_from_completion
from stitchwork.compute.profiles import Profile, get_profile
from stitchwork.errors import (
    ConfigError,
    ContextLengthExceeded,
    ModelError,
    ModelNotFound,
    ModelRejected,
    ModelUnavailable,
)

_ALNUM = string.ascii_letters + string.digits
DRAIN_AFTER_DONE_S = 0.05
"""How long a stream is read past ``[DONE]`` to keep its connection for the next request."""
_TOOL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)
_PARSER_WORDS = ("tool-call-parser", "tool_call_parser", "enable-auto-tool-choice", "--jinja", "jinja")
_CONTEXT = re.compile(r"context[ _-]?(length|size|window)|maximum context|too many tokens|prompt is too long|"
                      r"exceeds? the (available )?context|longer than the model", re.I)
_NOT_FOUND = re.compile(r"model.{0,200}(not found|does not exist|not exist|unknown|not loaded)|"
                        r"(unknown|no such) model", re.I | re.S)


_PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY")


class _Answer(Protocol):
    """What error mapping reads of an answer (httpx's response, or :class:`stitchwork.compute._http1.Response`)."""

    @property
    def status_code(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...


def _json_body(body: Mapping[str, Any]) -> bytes:
    """The request body as JSON (orjson; the standard library for what orjson refuses, e.g. integers over 64 bits)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body).encode()


def _loads(data: str | bytes) -> Any:
    """JSON from a model server: orjson, else the standard library (NaN, integers over 64 bits)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def _retry_after(value: str) -> float | None:
    """Seconds from a ``Retry-After`` header (a number; an HTTP date is not used by model servers)."""
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds == seconds and seconds != float("inf") else None


def _query(uri: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(uri)
    scheme = parts.scheme.partition("+")[2]
    if scheme not in {"http", "https"} or not parts.netloc:
        raise ConfigError(f"model URI {uri!r}: expected openai+http://host:port/v1 or openai+https://...")
    options = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    base = urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    return base, options


def _number(options: Mapping[str, str], name: str, default: float) -> float:
    try:
        return float(options.get(name, default))
    except ValueError as exc:
        raise ConfigError(f"model URI option {name}={options[name]!r} is not a number") from exc


def synthesize_id(length: int) -> str:
    """A tool-call id for a call that arrived without one (``length`` 9: alphanumerics only, Mistral style)."""
    if length <= 9:
        return "".join(secrets.choice(_ALNUM) for _ in range(max(length, 1)))
    return "call_" + secrets.token_hex(max((length - 5) // 2, 4))


def tool_calls_from_content(content: str, offered: Sequence[str]) -> list[dict[str, Any]] | None:
    """Tool calls a model wrote as JSON text (llama.cpp templates), if ``content`` is only that.

    Accepts ``{"name", "arguments"|"parameters"}``, a list of those, ``{"tool_calls": [...]}``, optionally in
    ``<tool_call>`` tags or a fenced block; every name must be an offered tool.
    """
    text = content.strip()
    if fence := _FENCE.match(text):
        text = fence.group(1)
    tagged = _TOOL_TAG.findall(text)
    if tagged and not _TOOL_TAG.sub("", text).strip():
        candidates: list[Any] = []
        for piece in tagged:
            try:
                candidates.append(json.loads(piece))
            except ValueError:
                return None
    else:
        if not text.startswith(("{", "[")):
            return None
        try:
            parsed = json.loads(text)
        except ValueError:
            return None
        if isinstance(parsed, dict) and isinstance(parsed.get("tool_calls"), list):
            parsed = parsed["tool_calls"]
        candidates = parsed if isinstance(parsed, list) else [parsed]
    calls: list[dict[str, Any]] = []
    for item in candidates:
        if isinstance(item, dict) and isinstance(item.get("function"), dict):
            item = item["function"]
        if not isinstance(item, dict) or item.get("name") not in offered:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append({"name": item["name"],
                      "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)})
    return calls or None


def _could_be_tool_json(text: str) -> bool:
    """Whether streamed content so far may still turn out to be a tool call written as text."""
    head = text.lstrip()
    if not head:
        return True
    return head.startswith(("{", "[", "```")) or "<tool_call>".startswith(head[:11]) or head.startswith("<tool_call>")


class OpenAICompatModel(ChatCompletionsModel):
    """Chat completions over HTTP against any OpenAI-compatible server, with the profile's workarounds."""

    def __init__(self, uri: str, *, http: httpx.AsyncClient | None = None, **_: Any) -> None:
        self.uri = uri
        self.base_url, options = _query(uri)
        self.profile: Profile = get_profile(options.get("profile", "generic"))
        self.model_name = options.get("model", "")
        self.key_name = parse_key_ref(options["key"]) if options.get("key") else ""
        self.stream = options.get("stream", "0") in {"1", "true", "yes"}
        self.timeout = httpx.Timeout(_number(options, "timeout", 120.0),
                                     connect=_number(options, "connect_timeout", 5.0))
        self._http = http
        self._own_http = http is None
        self._pool: Http1Pool | None = None
        """Chat requests to a plain ``http://`` server without a proxy or an injected client go through this lean
        keep-alive client (:mod:`stitchwork.compute._http1`) instead of httpx."""
        parts = urlsplit(self.base_url)
        if (http is None and parts.scheme == "http" and parts.hostname
                and not any(os.environ.get(name) for name in _PROXY_VARIABLES)):
            self._pool = Http1Pool(parts.hostname, parts.port or 80, connect_s=self.timeout.connect or 5.0,
                                   read_s=self.timeout.read or 120.0)
        self._path = (parts.path or "") + "/chat/completions"
        self._served: list[str] | None = None
        """The model ids ``GET /models`` answered (asked once, when the URI names no model)."""

    def __repr__(self) -> str:
        return f"OpenAICompatModel({self.base_url!r}, profile={self.profile.name!r})"

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self.timeout, limits=httpx.Limits(max_connections=1000, max_keepalive_connections=256)
            )
        return self._http

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
        if self._http is not None and self._own_http:
            await self._http.aclose()
            self._http = None

    # -- requests ---------------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.key_name:
            headers["authorization"] = "Bearer " + resolve_key(self.key_name)
        return headers

    async def served_models(self) -> list[str]:
        """The model ids the server lists at ``GET /models`` (asked once; ``[]`` if it has no such route).

        Raises:
            ModelUnavailable: the server could not be reached or answered 429/5xx.
            ModelRejected: it refused the listing (401, 403).
        """
        if self._served is not None:
            return self._served
        try:
            response = await self.http.get(self.base_url + "/models", headers=self._headers())
        except httpx.HTTPError as exc:
            raise self._unavailable(exc) from exc
        if response.status_code in {404, 405, 501}:
            self._served = []
            return self._served
        if response.status_code >= 400:
            raise self._error(response, response.text)
        try:
            data = response.json()
            items = data.get("data", data.get("models")) if isinstance(data, dict) else data
            if not isinstance(items, list):
                raise TypeError("no list of models")
            served = [str(m.get("id") or m.get("name") or m.get("model")) for m in items if isinstance(m, dict)]
        except (ValueError, TypeError, AttributeError) as exc:
            raise ModelError(f"{self.profile.name} server at {self.base_url} listed its models in an unknown "
                             f"shape: {response.text[:200]}") from exc
        self._served = [name for name in served if name and name != "None"]
        return self._served

    async def resolve_model(self, requested: str = "") -> str:
        """The model name to send: ``model=`` of the URI, else the one the server serves (see the module doc).

        Raises:
            ModelNotFound: the server serves several models and ``requested`` is not one of them, or none.
        """
        if self.model_name:
            return self.model_name
        served = await self.served_models()
        if len(served) == 1:
            return served[0]
        if requested and requested in served:
            return requested
        if not served:
            if requested and "://" not in requested:
                return requested  # the server lists nothing: send the name the caller asked for
            raise ModelNotFound(f"{self.profile.name} server at {self.base_url} lists no models at GET /models; "
                                f"name one with ?model=NAME in the URI {self._redacted_uri()}", status=404)
        raise ModelNotFound(
            f"{self.profile.name} server at {self.base_url} serves {len(served)} models: {', '.join(served[:20])}"
            f"{' ...' if len(served) > 20 else ''}; choose one with ?model=NAME in the URI", status=404)

    def _redacted_uri(self) -> str:
        return self.uri.split("?", 1)[0]

    def prepare(self, request: Mapping[str, Any], *, stream: bool, model: str = "") -> tuple[dict[str, Any], bool]:
        """The body to send for ``request`` under this profile (``model``: the resolved name, see
        :meth:`resolve_model`), and whether a tool call is required."""
        body = {k: v for k, v in request.items() if k not in {"stream", "stream_options"}}
        body["model"] = model or self.model_name or str(body.get("model") or "default")
        required = False
        if not body.get("tools"):
            body.pop("tools", None)
            body.pop("tool_choice", None)
            body.pop("parallel_tool_calls", None)
        elif "tool_choice" in body:
            choice = body["tool_choice"]
            if choice == "auto" and not self.profile.send_auto_tool_choice:
                del body["tool_choice"]
            elif not self.profile.honours_tool_choice:
                del body["tool_choice"]
                if choice == "none":
                    body.pop("tools", None)
                elif choice == "required":
                    required = True
                elif isinstance(choice, Mapping):
                    wanted = (choice.get("function") or {}).get("name")
                    body["tools"] = [t for t in body["tools"] if (t.get("function") or {}).get("name") == wanted]
                    required = True
        if stream:
            body["stream"] = True
            if self.profile.stream_usage:
                body["stream_options"] = {"include_usage": True}
        return body, required

    def _error(self, response: _Answer, text: str) -> ModelError:
        message = text.strip()[:500]
        code = ""
        try:
            data = json.loads(text)
            error = data.get("error", data) if isinstance(data, dict) else data
            if isinstance(error, str) and isinstance(data, dict) and "message" in data:
                error = data  # {"error": "kind", "message": "..."}
            message = str(error.get("message", error) if isinstance(error, dict) else error)[:500]
            if isinstance(error, dict):
                code = f"{error.get('code') or ''} {error.get('type') or ''}".lower()
        except ValueError:
            pass
        if self.key_name:
            with contextlib.suppress(ModelError):
                message = message.replace(resolve_key(self.key_name), f"[secret:{self.key_name}]")
        where = f"{self.profile.name} server at {self.base_url}"
        status = response.status_code
        if (status in {400, 413, 422} and (_CONTEXT.search(message) or "context_length" in code
                                          or "exceed_context" in code)):
            return ContextLengthExceeded(f"{where}: the conversation does not fit the model's context "
                                         f"(HTTP {status}): {message}", status=status)
        if status == 429 or status >= 500:
            return ModelUnavailable(f"{where} answered HTTP {status}: {message}", status=status,
                                    retry_after_s=_retry_after(response.headers.get("retry-after", "")))
        if status == 404 or "model_not_found" in code or (status == 400 and _NOT_FOUND.search(message)):
            served = f"; it serves: {', '.join(self._served)}" if self._served else ""
            return ModelNotFound(f"{where} does not serve the model asked for (HTTP {status}): {message}{served}",
                                 status=404)
        hint = ""
        if any(word in message.lower() for word in _PARSER_WORDS) and self.profile.parser_hint:
            hint = f" ({self.profile.parser_hint})"
        if status in {401, 403}:
            hint = f" (check the provider key secret://{self.key_name})" if self.key_name else " (no key configured)"
        return ModelRejected(f"{where} refused the request, HTTP {status}: {message}{hint}", status=status)

    async def _aerror(self, response: _Answer, text: str) -> ModelError:
        """:meth:`_error`; an unknown model also names the models the server lists (asked once)."""
        error = self._error(response, text)
        if isinstance(error, ModelNotFound) and self._served is None:
            try:
                served = await self.served_models()
            except ModelError:
                served = []
            if served:
                error = ModelNotFound(f"{error}; it serves: {', '.join(served[:20])}", status=404)
        return error

    def _unavailable(self, exc: httpx.HTTPError | HttpError) -> ModelUnavailable:
        kind = "timed out" if isinstance(exc, httpx.TimeoutException | HttpTimeout) else "failed"
        return ModelUnavailable(f"{self.profile.name} server at {self.base_url} {kind}: {type(exc).__name__} {exc}")

    def _fix(self, completion: dict[str, Any], offered: Sequence[str], required: bool) -> dict[str, Any]:
        """Applies the profile's repairs to a complete response: content-as-tool-call, missing ids."""
        choices = completion.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            raise ModelError(f"{self.profile.name} server at {self.base_url} returned no choices")
        message = choices[0].get("message") or {}
        if (self.profile.tool_calls_in_content and offered and not message.get("tool_calls")
                and isinstance(message.get("content"), str)):
            parsed = tool_calls_from_content(message["content"], offered)
            if parsed:
                message["content"] = None
                message["tool_calls"] = [{"id": "", "type": "function", "function": c} for c in parsed]
                choices[0]["finish_reason"] = "tool_calls"
        for call in message.get("tool_calls") or ():
            if not call.get("id"):
                call["id"] = synthesize_id(self.profile.synthesized_id_length)
            call.setdefault("type", "function")
        if required and not message.get("tool_calls"):
            raise ModelRejected(f"{self.profile.name} server ignores tool_choice and answered without the required "
                                "tool call")
        choices[0]["message"] = message
        return completion

    @contextlib.asynccontextmanager
    async def _stream(self, body: Mapping[str, Any]) -> AsyncIterator[Any]:
        """A streamed ``POST /chat/completions``: the answer (``status_code``, ``headers``, ``aread``,
        ``aiter_lines``), closed on the way out."""
        if self._pool is None:
            async with self.http.stream("POST", self.base_url + "/chat/completions", json=body,
                                        headers=self._headers()) as response:
                yield response
            return
        answer = await self._pool.request("POST", self._path, self._headers(), _json_body(body))
        try:
            yield answer
        finally:
            await answer.aclose()

    async def chat(self, request: Mapping[str, Any]) -> dict[str, Any]:
        if self.stream:  # stream=1: ask for a stream and assemble it (servers that cut long unstreamed requests)
            assembler = StreamAssembler()
            async for chunk in self.chat_stream(request):
                assembler.feed(chunk)
            return assembler.completion()
        return await self._chat_once(request)

    async def _chat_once(self, request: Mapping[str, Any]) -> dict[str, Any]:
        model = await self.resolve_model(str(request.get("model") or ""))
        body, required = self.prepare(request, stream=False, model=model)
        offered = [(t.get("function") or {}).get("name", "") for t in body.get("tools") or ()]
        headers = self._headers()
        if self._pool is not None:
            try:
                answer = await self._pool.request("POST", self._path, headers, _json_body(body))
                try:
                    raw = await answer.read()
                finally:
                    await answer.aclose()
            except HttpError as exc:
                raise self._unavailable(exc) from exc
            if answer.status_code >= 400:
                raise await self._aerror(answer, raw.decode("utf-8", "replace"))
            try:
                completion = _loads(raw)
            except ValueError as exc:
                raise ModelUnavailable(f"{self.profile.name} server at {self.base_url} returned invalid JSON") from exc
            if not isinstance(completion, dict):
                raise ModelError(f"{self.profile.name} server at {self.base_url} returned {type(completion).__name__}")
            return self._fix(completion, offered, required)
        try:
            response = await self.http.post(self.base_url + "/chat/completions", json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise self._unavailable(exc) from exc
        if response.status_code >= 400:
            raise await self._aerror(response, response.text)
        try:
            completion = response.json()
        except ValueError as exc:
            raise ModelUnavailable(f"{self.profile.name} server at {self.base_url} returned invalid JSON") from exc
        if not isinstance(completion, dict):
            raise ModelError(f"{self.profile.name} server at {self.base_url} returned {type(completion).__name__}")
        return self._fix(completion, offered, required)

    async def chat_stream(self, request: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if request.get("tools") and not self.profile.stream_tool_calls:
            for chunk in chunks_from_completion(await self._chat_once(request)):
                yield chunk
            return
        model = await self.resolve_model(str(request.get("model") or ""))
        body, required = self.prepare(request, stream=True, model=model)
        offered = [(t.get("function") or {}).get("name", "") for t in body.get("tools") or ()]
        held = _ContentHold(self, offered) if self.profile.tool_calls_in_content and offered else None
        ids: dict[int, str] = {}
        saw_call = False
        done = finished = False
        try:
            async with self._stream(body) as response:
                if response.status_code >= 400:
                    raise await self._aerror(response, (await response.aread()).decode("utf-8", "replace"))
                lines = response.aiter_lines()
                async for line in lines:
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        await _drain(lines)
                        break
                    try:
                        chunk = _loads(data)
                    except ValueError as exc:
                        raise ModelUnavailable(f"{self.profile.name} stream sent invalid JSON: {data[:100]}") from exc
                    if isinstance(chunk, dict) and "error" in chunk and not chunk.get("choices"):
                        raise self._error(response, json.dumps(chunk))
                    for choice in chunk.get("choices") or ():
                        finished = finished or bool(choice.get("finish_reason"))
                        for position, call in enumerate((choice.get("delta") or {}).get("tool_calls") or ()):
                            saw_call = True
                            index = call.get("index", position)
                            if call.get("id"):
                                ids[index] = call["id"]
                            elif index not in ids:
                                ids[index] = call["id"] = synthesize_id(self.profile.synthesized_id_length)
                    if held is not None:
                        for out in held.feed(chunk):
                            yield out
                    else:
                        yield chunk
        except (httpx.HTTPError, HttpError) as exc:
            raise self._unavailable(exc) from exc
        if not (done or finished):
            raise ModelUnavailable(f"{self.profile.name} server at {self.base_url} cut the stream short")
        if held is not None:
            for out in held.finish():
                saw_call = saw_call or bool(out["choices"] and out["choices"][0]["delta"].get("tool_calls"))
                yield out
        if required and not saw_call:
            raise ModelRejected(f"{self.profile.name} server answered without the required tool call")


async def _drain(lines: AsyncIterator[str]) -> None:
    """Reads what follows ``[DONE]`` (normally only the end of the chunked body) for a moment, so the connection
    goes back to the pool instead of being closed and reopened for the next request; a server that keeps the
    stream open after ``[DONE]`` only loses its connection, as before."""
    with contextlib.suppress(TimeoutError, httpx.HTTPError, HttpError):
        async with asyncio.timeout(DRAIN_AFTER_DONE_S):
            async for _ in lines:
                pass


class _ContentHold:
    """Holds streamed content back while it may still be a tool call written as JSON text (llama.cpp)."""

    def __init__(self, model: OpenAICompatModel, offered: Sequence[str]) -> None:
        self.model = model
        self.offered = offered
        self.text: list[str] = []
        self.template: dict[str, Any] | None = None
        self.holding = True
        self._pending_finish: dict[str, Any] | None = None

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        if not self.holding:
            return [chunk]
        self.template = self.template or {k: v for k, v in chunk.items() if k != "choices"}
        choices = chunk.get("choices") or []
        delta = (choices[0].get("delta") or {}) if choices else {}
        if delta.get("tool_calls"):
            return [*self._release(), chunk]
        content = delta.get("content")
        if isinstance(content, str) and content:
            self.text.append(content)
            if not _could_be_tool_json("".join(self.text)):
                released = self._release()
                delta.pop("content", None)
                return released + ([chunk] if delta or choices[0].get("finish_reason") else [])
            delta.pop("content")
        if choices and choices[0].get("finish_reason"):
            self._pending_finish = chunk
            return []
        return [chunk] if (delta or not choices) else []

    def _release(self) -> list[dict[str, Any]]:
        self.holding = False
        if not self.text:
            return []
        out = {**(self.template or {}), "choices": [{"index": 0, "delta": {"content": "".join(self.text)},
                                                      "finish_reason": None}]}
        self.text = []
        return [out]

    def finish(self) -> list[dict[str, Any]]:
        finish = self._pending_finish
        if not self.holding:
            return [finish] if finish is not None else []
        self.holding = False
        text = "".join(self.text)
        parsed = tool_calls_from_content(text, self.offered) if text else None
        base = self.template or {}
        out: list[dict[str, Any]] = []
        if parsed:
            for index, call in enumerate(parsed):
                out.append({**base, "choices": [{"index": 0, "finish_reason": None, "delta": {"tool_calls": [{
                    "index": index, "id": synthesize_id(self.model.profile.synthesized_id_length),
                    "type": "function", "function": call}]}}]})
            out.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
            return out
        if text:
            out.append({**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})
        if finish is not None:
            out.append(finish)
        return out


__all__ = ["OpenAICompatModel", "synthesize_id", "tool_calls_from_content"]
