"""Model port: one method, ``complete``, in OpenAI chat-completions terms."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from stitchwork._registry import Registry
from stitchwork.compute._turns import ModelTurn, ToolCall, Usage
from stitchwork.compute._wire import chunks_from_completion, completion_from_turn, turn_from_completion


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

        turn = await self.complete(request.get("messages") or (), request.get("tools") or ())
        return completion_from_turn(turn, str(request.get("model") or turn.model))

    async def chat_stream(self, request: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """OpenAI ``chat.completion.chunk`` objects; by default the whole of :meth:`chat` as chunks."""

        for chunk in chunks_from_completion(await self.chat(request)):
            yield chunk

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Releases connections."""


class ChatCompletionsModel(Model):
    """A model reached through one chat-completions request; ``complete`` is shared, ``chat`` is the transport."""

    @abstractmethod
    async def chat(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Sends one chat-completions request and returns the completion object."""

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> ModelTurn:
        request: dict[str, Any] = {"messages": list(messages)}
        if tools:
            request["tools"] = list(tools)
        return turn_from_completion(await self.chat(request))


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


__all__ = ["MODELS", "ChatCompletionsModel", "Model", "ModelTurn", "ToolCall", "Usage", "open_model"]
