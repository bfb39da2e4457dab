"""Scripted model: replays a file of assistant turns. The test and demo double; it does not think.

``scripted:///abs/path/turns.jsonl`` or ``scripted://relative/path.jsonl``. Each line is one turn::

    {"content": "Reading your inbox.", "tool_calls": [{"name": "read_inbox", "arguments": {}}]}
    {"content": "Done."}

``arguments`` may be an object or a raw string (sent as is, to exercise malformed input). The turn used is the
number of assistant messages already in the conversation, so a resumed run continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stitchwork.compute._base import Model, ModelTurn, ToolCall, Usage
from stitchwork.errors import ConfigError, ModelError


def _path(uri: str) -> Path:
    parts = urlsplit(uri)
    return Path(parts.netloc + parts.path) if parts.netloc else Path(parts.path)


class ScriptedModel(Model):
    """Replays scripted turns in order (by count of assistant messages so far)."""

    def __init__(self, uri: str, *, base_dir: Path | None = None) -> None:
        self.uri = uri
        path = _path(uri)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        self.path = path
        self.turns = self._load(path)

    @staticmethod
    def _load(path: Path) -> list[ModelTurn]:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"scripted model file {path}: {exc.strerror or exc}") from exc
        turns: list[ModelTurn] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            try:
                data = json.loads(line)
                calls = tuple(
                    ToolCall(
                        id=str(c.get("id") or f"call_{len(turns)}_{i}"),
                        name=str(c["name"]),
                        arguments=c["arguments"] if isinstance(c.get("arguments"), str)
                        else json.dumps(c.get("arguments", {})),
                    )
                    for i, c in enumerate(data.get("tool_calls", ()))
                )
                turns.append(ModelTurn(content=data.get("content"), tool_calls=calls, model="scripted"))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise ConfigError(f"scripted model file {path}:{number}: not a valid turn: {exc}") from exc
        if not turns:
            raise ConfigError(f"scripted model file {path} has no turns")
        return turns

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> ModelTurn:
        index = sum(1 for m in messages if m.get("role") == "assistant")
        if index >= len(self.turns):
            raise ModelError(f"scripted model {self.path} has only {len(self.turns)} turns; turn {index + 1} asked")
        turn = self.turns[index]
        prompt = sum(len(str(m.get("content") or "")) for m in messages) // 4
        completion = len(turn.content or "") // 4 + sum(len(c.arguments) for c in turn.tool_calls) // 4
        return ModelTurn(turn.content, turn.tool_calls, Usage(prompt, completion), model="scripted")
