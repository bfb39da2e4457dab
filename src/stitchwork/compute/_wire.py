"""The OpenAI chat-completions wire format: turns ↔ completions, completions ↔ stream chunks, and the assembly of
streamed tool-call deltas (by ``index``, else by ``id``, else onto the last call)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from stitchwork.compute._turns import ModelTurn, ToolCall, Usage
from stitchwork.errors import ModelError


def new_id(prefix: str = "chatcmpl-") -> str:
    return prefix + secrets.token_hex(12)


def completion_from_turn(turn: ModelTurn, model: str) -> dict[str, Any]:
    """A ``chat.completion`` object for one turn."""
    message = turn.as_message()
    return {
        "id": new_id(), "object": "chat.completion", "created": int(time.time()), "model": model or turn.model,
        "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if turn.tool_calls else "stop"}],
        "usage": usage_dict(turn.usage),
    }


def usage_dict(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from(body: Mapping[str, Any] | None) -> Usage:
    if not isinstance(body, Mapping):
        return Usage()
    return Usage(_int(body.get("prompt_tokens")), _int(body.get("completion_tokens")))


def _arguments_text(value: Any) -> str:
    if value is None:
        return "{}"
    return value if isinstance(value, str) else json.dumps(value)


def turn_from_completion(body: Mapping[str, Any]) -> ModelTurn:
    """The first choice of a ``chat.completion`` as a :class:`ModelTurn`.

    Raises:
        ModelError: the body has no choice or message.
    """
    try:
        choice = body["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ModelError(f"model response has no choices[0].message: {str(body)[:200]}") from exc
    calls: list[ToolCall] = []
    for i, raw in enumerate(message.get("tool_calls") or ()):
        function = raw.get("function") or {}
        calls.append(ToolCall(id=str(raw.get("id") or ""), name=str(function.get("name") or ""),
                              arguments=_arguments_text(function.get("arguments"))))
        if not calls[-1].name:
            raise ModelError(f"model returned tool call {i} without a function name")
    content = message.get("content")
    return ModelTurn(content=content if isinstance(content, str) else None, tool_calls=tuple(calls),
                     usage=usage_from(body.get("usage")), model=str(body.get("model") or ""))


_TEXT_PARTS = {"text", "input_text", "output_text"}
_FLATTENED_ROLES = {"tool", "system", "developer", "function"}


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Checks a request's ``messages`` and gives tool results (and system text) as one string.

    The OpenAI API lets ``content`` be a string or a list of content parts; clients such as the OpenAI Agents
    SDK send tool results as ``[{"type": "text", "text": ...}]``, which several servers refuse for the ``tool``
    role. Text parts of ``tool``, ``system`` and ``developer`` messages are joined into one string; user and
    assistant content parts (images, audio) pass unchanged.

    Raises:
        ModelError: ``messages`` is not a non-empty list of objects with a string ``role``, or a content part
            of a tool or system message is not text.
    """
    if not isinstance(messages, list) or not messages:
        raise ModelError("messages must be a non-empty list")
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ModelError(f"messages[{index}] must be an object with a string role")
        content = message.get("content")
        if isinstance(content, list) and message["role"] in _FLATTENED_ROLES:
            texts: list[str] = []
            for position, part in enumerate(content):
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, Mapping) and part.get("type") in _TEXT_PARTS and isinstance(part.get("text"),
                                                                                                  str):
                    texts.append(part["text"])
                else:
                    kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                    raise ModelError(f"messages[{index}].content[{position}]: a {message['role']} message may hold "
                                     f"text parts only, not {kind!r}")
            message = {**message, "content": "".join(texts)}
        elif content is not None and not isinstance(content, str | list):
            raise ModelError(f"messages[{index}].content must be a string, a list of content parts or null")
        out.append(dict(message))
    return out


def chunks_from_completion(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A complete ``chat.completion`` as the chunks a streaming server would send (the last carries usage)."""
    base = {"id": body.get("id") or new_id(), "object": "chat.completion.chunk",
            "created": body.get("created") or int(time.time()), "model": body.get("model", "")}
    choice = (body.get("choices") or [{}])[0]
    message = choice.get("message") or {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    out = [chunk({"role": "assistant", "content": ""})]
    if message.get("content"):
        out.append(chunk({"content": message["content"]}))
    for index, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        out.append(chunk({"tool_calls": [{"index": index, "id": call.get("id"), "type": "function",
                                          "function": {"name": function.get("name"), "arguments": ""}}]}))
        out.append(chunk({"tool_calls": [{"index": index,
                                          "function": {"arguments": _arguments_text(function.get("arguments"))}}]}))
    out.append(chunk({}, choice.get("finish_reason") or "stop"))
    if body.get("usage"):
        out.append({**base, "choices": [], "usage": body["usage"]})
    return out


@dataclass
class _Slot:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


class StreamAssembler:
    """Rebuilds a ``chat.completion`` from streamed chunks.

    Tool-call deltas are matched to a call by ``index`` when present (a new ``id`` at a used index starts a new
    call: some servers number every parallel call 0), else by ``id``, else continue the last call.
    """

    def __init__(self) -> None:
        self.id = ""
        self.model = ""
        self.created = 0
        self.content: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.chunks = 0
        self._slots: list[_Slot] = []
        self._by_index: dict[int, _Slot] = {}
        self._by_id: dict[str, _Slot] = {}

    def feed(self, chunk: Mapping[str, Any]) -> None:
        self.chunks += 1
        self.id = self.id or str(chunk.get("id") or "")
        self.model = self.model or str(chunk.get("model") or "")
        self.created = self.created or _int(chunk.get("created"))
        if chunk.get("usage"):
            self.usage = dict(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if _int(choice.get("index")) != 0:
                continue
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self.content.append(delta["content"])
            for raw in delta.get("tool_calls") or ():
                self._feed_call(raw)
            if choice.get("finish_reason"):
                self.finish_reason = str(choice["finish_reason"])

    def _feed_call(self, raw: Mapping[str, Any]) -> None:
        index = raw.get("index")
        call_id = str(raw.get("id") or "")
        slot: _Slot | None = None
        if isinstance(index, int) and not isinstance(index, bool):
            slot = self._by_index.get(index)
            if slot is not None and call_id and slot.id and slot.id != call_id:
                slot = None  # a second call reusing the index
        elif call_id:
            slot = self._by_id.get(call_id)
        elif self._slots:
            slot = self._slots[-1]
        if slot is None:
            slot = _Slot()
            self._slots.append(slot)
        if isinstance(index, int) and not isinstance(index, bool):
            self._by_index[index] = slot
        if call_id:
            slot.id = slot.id or call_id
            self._by_id[call_id] = slot
        function = raw.get("function") or {}
        name = function.get("name")
        if isinstance(name, str) and name and name != slot.name:
            slot.name += name
        arguments = function.get("arguments")
        if arguments is not None:
            slot.arguments.append(_arguments_text(arguments))

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [{"id": s.id, "type": "function", "function": {"name": s.name, "arguments": "".join(s.arguments)}}
                for s in self._slots]

    def completion(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        if self._slots:
            message["tool_calls"] = self.tool_calls
        body: dict[str, Any] = {
            "id": self.id or new_id(), "object": "chat.completion", "created": self.created or int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": self.finish_reason or ("tool_calls" if self._slots else "stop")}],
        }
        if self.usage is not None:
            body["usage"] = self.usage
        return body


def assemble(chunks: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Chunks → one ``chat.completion``."""
    assembler = StreamAssembler()
    for chunk in chunks:
        assembler.feed(chunk)
    return assembler.completion()


__all__ = ["StreamAssembler", "assemble", "chunks_from_completion", "completion_from_turn", "normalize_messages",
           "turn_from_completion"]
