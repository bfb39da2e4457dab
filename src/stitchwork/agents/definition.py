"""Agent definitions (TOML): who the agent is, which model it uses, which tools it is given."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from stitchwork.errors import ConfigError, UnknownAgent

AGENT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class AgentSpec:
    """One agent::

        name = "inbox-assistant"
        model = "scripted://inbox.jsonl"      # relative paths are relative to this file
        tools = ["read_inbox", "send_email"]
        system = "You help the user with their mail."
        max_steps = 10
    """

    name: str
    model: str
    tools: tuple[str, ...]
    system: str = "You are a helpful assistant. Use the tools you are given."
    max_steps: int = 20
    source: Path | None = None

    @property
    def base_dir(self) -> Path | None:
        return self.source.parent if self.source else None


def parse_agent(path: Path) -> AgentSpec:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"agent file {path}: {exc}") from exc
    known = {"name", "model", "tools", "system", "max_steps"}
    if unknown := sorted(set(data) - known):
        raise ConfigError(f"agent file {path}: unknown key(s) {', '.join(unknown)}")
    name = str(data.get("name", ""))
    if not AGENT_NAME.match(name):
        raise ConfigError(f"agent file {path}: name {name!r} must match {AGENT_NAME.pattern}")
    tools = data.get("tools", [])
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        raise ConfigError(f"agent file {path}: tools must be a list of tool names")
    max_steps = data.get("max_steps", 20)
    if not isinstance(max_steps, int) or max_steps < 1:
        raise ConfigError(f"agent file {path}: max_steps must be a positive integer")
    return AgentSpec(
        name=name, model=str(data.get("model", "")), tools=tuple(tools),
        system=str(data.get("system", AgentSpec.system)), max_steps=max_steps, source=path,
    )


class AgentRegistry:
    """The agents the platform knows."""

    def __init__(self, agents: Iterable[AgentSpec]) -> None:
        self._agents: dict[str, AgentSpec] = {}
        for agent in agents:
            if agent.name in self._agents:
                raise ConfigError(f"agent {agent.name!r} is declared twice")
            self._agents[agent.name] = agent

    def get(self, name: str) -> AgentSpec:
        try:
            return self._agents[name]
        except KeyError:
            raise UnknownAgent(
                f"unknown agent {name!r}; known: {', '.join(sorted(self._agents)) or 'none'}"
            ) from None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._agents.values())

    def names(self) -> list[str]:
        return sorted(self._agents)


def load_agents(dirs: Iterable[str | Path]) -> AgentRegistry:
    specs: list[AgentSpec] = []
    for d in dirs:
        directory = Path(d)
        if not directory.is_dir():
            raise ConfigError(f"agent directory {directory} does not exist")
        specs.extend(parse_agent(p) for p in sorted(directory.glob("*.toml")))
    return AgentRegistry(specs)
