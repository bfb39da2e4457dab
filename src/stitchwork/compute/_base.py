"""Model port: one method, ``complete``, in OpenAI chat-completions terms."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stitchwork._registry import Registry


@dataclass(frozen=True)
class ToolCall:
    """A tool call the model proposes; ``arguments`` is the raw JSON text the model produced."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class ModelTurn:
    """One assistant turn: text, tool calls, or both."""

    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    usage: Usage = field(default_factory=Usage)
    model: str = ""

    def as_message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        return message


class Model(ABC):
    """A chat model. ``messages`` and ``tools`` are OpenAI chat-completions shaped."""

    uri: str

    @abstractmethod
    async def complete(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> ModelTurn:
        """Returns the model's next turn."""

    async def chat(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """One OpenAI ``chat.completion`` for a request body; by default built from :meth:`complete`."""
        from stitchwork.compute._wire import completion_from_turn

        turn = await self.complete(request.get("messages") or (), request.get("tools") or ())
        return completion_from_turn(turn, str(request.get("model") or turn.model))

    async def chat_stream(self, request: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """OpenAI ``chat.completion.chunk`` objects; by default the whole of :meth:`chat` as chunks."""
        from stitchwork.compute._wire import chunks_from_completion

        for chunk in chunks_from_completion(await self.chat(request)):
            yield chunk

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Releases connections."""


MODELS = Registry("model", {
    "scripted": ("stitchwork.compute.scripted:ScriptedModel", None),
    "openai+http": ("stitchwork.compute.openai:OpenAICompatModel", None),
    "openai+https": ("stitchwork.compute.openai:OpenAICompatModel", None),
    "runpod": ("stitchwork.compute.runpod:RunPodModel", None),
    "llamacpp": ("stitchwork.compute.llamacpp:LlamaCppModel", None),
    "router": ("stitchwork.compute.router:RoutedModel", None),
})


def open_model(uri: str, **options: Any) -> Model:
    """Opens the model named by ``uri`` (``scripted://path/turns.jsonl``)."""
    model: Model = MODELS.load(uri)(uri, **options)
    return model
