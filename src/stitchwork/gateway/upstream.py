"""Upstream MCP servers as tool sources: their tools become Stitchwork tools named ``NAME.tool``.

Each ``[mcp.servers.NAME]`` of the config (:class:`~stitchwork.config.McpConfig`) is one server: a stdio
``command`` started in a sandbox (bubblewrap by default: only the granted ``dirs`` writable, no network unless
``egress`` is granted, uid nobody; ``env`` values may be ``secret://name``, resolved from the vault into that process's
environment only), or a Streamable HTTP ``url`` with a vault-held ``key`` sent as bearer.

Its tools get manifests generated from their MCP schema: the side-effect class and target come from the general
classification rule (:func:`stitchwork.tools.classify.classify`), overridable per tool
(``[mcp.servers.NAME.tools.TOOL] side_effect, target, destinations``). They are host-side tools (``host =
"mcp:NAME"``) behind every gateway stage; :class:`Upstream` is their execute step: the output is labelled untrusted
(``mcp:NAME``), a tool error, a crash, a hang (``call_timeout_s``) or an oversized answer (``max_response_bytes``) is a
clear tool error the door audits, and the next call starts a new connection. When the server announces
``notifications/tools/list_changed`` its tools are listed again (:attr:`Upstream.on_tools`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shlex
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stitchwork.config import McpConfig
from stitchwork.errors import ConfigError, SecretError, ToolError
from stitchwork.isolation.stdio import bwrap_argv, bwrap_available
from stitchwork.security.policy import SideEffect
from stitchwork.security.taint import Label
from stitchwork.security.vault import Vault
from stitchwork.tools.classify import classify
from stitchwork.tools.host import HostCall, HostResult
from stitchwork.tools.manifest import ToolManifest

log = logging.getLogger(__name__)

SERVER_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
SECRET = re.compile(r"^secret://([A-Za-z0-9_.-]{1,128})$")
SERVER_KEYS = frozenset({"command", "url", "key", "dirs", "egress", "env", "tools", "sandbox", "cwd"})
OVERRIDE_KEYS = frozenset({"side_effect", "target", "destinations"})


@dataclass(frozen=True)
class ToolOverride:
    """The operator's correction of one upstream tool's classification."""

    side_effect: SideEffect | None = None
    target: str | None = None
    destinations: tuple[str, ...] = ()


@dataclass(frozen=True)
class UpstreamSpec:
    """One ``[mcp.servers.NAME]`` table, checked."""

    name: str
    command: tuple[str, ...] = ()
    url: str = ""
    key: str = ""
    dirs: tuple[str, ...] = ()
    egress: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    tools: Mapping[str, ToolOverride] = field(default_factory=dict)
    sandbox: str = "bwrap://"

    @classmethod
    def parse(cls, name: str, table: Mapping[str, Any], *, default_sandbox: str = "") -> UpstreamSpec:
        """Checks one server table.

        Raises:
            ConfigError: a bad name, an unknown key, neither or both of ``command`` and ``url``, a value of the
                wrong type, or a secret that is not a ``secret://name`` reference.
        """
        where = f"[mcp.servers.{name}]"
        if not SERVER_NAME.match(name):
            raise ConfigError(f"{where}: the server name must match {SERVER_NAME.pattern} (its tools are NAME.tool)")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table")
        if unknown := sorted(set(table) - SERVER_KEYS):
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(SERVER_KEYS))}")
        raw_command = table.get("command", ())
        command = tuple(shlex.split(raw_command)) if isinstance(raw_command, str) else tuple(raw_command)
        if not all(isinstance(part, str) and part for part in command):
            raise ConfigError(f"{where}: command must be a list of strings")
        url = str(table.get("url", ""))
        if bool(command) == bool(url):
            raise ConfigError(f"{where}: give exactly one of command = [...] (stdio) or url = \"https://.../mcp\"")
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}: url must be http(s)://..., got {url!r}")
        key = str(table.get("key", ""))
        if key and not SECRET.match(key):
            raise ConfigError(f"{where}: key must be a vault reference secret://name, not the key itself")
        env = table.get("env", {})
        if not isinstance(env, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ConfigError(f"{where}: env must be a table of strings")
        sandbox = str(table.get("sandbox", "") or default_sandbox or "bwrap://")
        if sandbox not in {"bwrap://", "inline://"}:
            raise ConfigError(f"{where}: sandbox must be bwrap:// or inline:// (no isolation), got {sandbox!r}")
        return cls(name=name, command=command, url=url, key=key, dirs=_strings(table, "dirs", where),
                   egress=_strings(table, "egress", where), env=dict(env),
                   tools=_overrides(table.get("tools", {}), where), sandbox=sandbox)


def _strings(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table.get(key, ())
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key} must be a list of strings")
    return tuple(value)


def _overrides(tools: Any, where: str) -> dict[str, ToolOverride]:
    if not isinstance(tools, Mapping):
        raise ConfigError(f"{where}.tools: expected a table of tools")
    out: dict[str, ToolOverride] = {}
    for tool, table in tools.items():
        if not isinstance(table, Mapping) or set(table) - OVERRIDE_KEYS:
            raise ConfigError(f"{where}.tools.{tool}: expected a table of {', '.join(sorted(OVERRIDE_KEYS))}")
        effect = table.get("side_effect")
        try:
            side_effect = SideEffect(effect) if effect is not None else None
        except ValueError as exc:
            choices = ", ".join(e.value for e in SideEffect)
            raise ConfigError(f"{where}.tools.{tool}: side_effect must be one of {choices}") from exc
        target = table.get("target")
        out[str(tool)] = ToolOverride(side_effect, str(target) if target is not None else None,
                                      _strings(table, "destinations", f"{where}.tools.{tool}"))
    return out


def parse_servers(config: McpConfig) -> dict[str, UpstreamSpec]:
    """Every configured upstream server, checked (see :meth:`UpstreamSpec.parse`)."""
    return {name: UpstreamSpec.parse(name, table, default_sandbox=config.sandbox)
            for name, table in config.servers.items()}


def manifest_for(spec: UpstreamSpec, tool: Any) -> ToolManifest | None:
    """The Stitchwork manifest of an upstream MCP tool, or ``None`` when its name or schema is unusable."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    name = str(getattr(tool, "name", ""))
    if not TOOL_NAME.match(name):
        log.warning("mcp server %s: tool name %r skipped (not a usable name)", spec.name, name)
        return None
    schema = getattr(tool, "input_schema", None)
    schema = dict(schema) if isinstance(schema, Mapping) and schema.get("type", "object") == "object" else None
    if schema is None:
        log.warning("mcp server %s: tool %s skipped (its input schema is not an object schema)", spec.name, name)
        return None
    schema.setdefault("type", "object")
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        log.warning("mcp server %s: tool %s skipped (invalid input schema: %s)", spec.name, name, exc.message)
        return None
    found = classify(name, schema)
    override = spec.tools.get(name, ToolOverride())
    target = override.target if override.target is not None else found.target
    properties = schema.get("properties") if isinstance(schema.get("properties"), Mapping) else {}
    if target and target not in (properties or {}):
        target = ""
    return ToolManifest(
        name=f"{spec.name}.{name}", description=str(getattr(tool, "description", "") or "")[:4000],
        side_effect=override.side_effect or found.side_effect, entry_file=Path(), entry_function="",
        args_schema=schema, target=target or "", egress=override.destinations, trusted_output=False,
        host=f"mcp:{spec.name}",
    )


class Upstream:
    """One upstream MCP server: a live connection (started on first use, restarted after a failure) and the
    execute step of its tools.

    Args:
        spec: The server's configuration.
        limits: ``[mcp]``: call and connect timeouts, the response size cap.
        vault: Where ``secret://`` references of ``env`` and ``key`` resolve.
        log_dir: Where the server's stderr goes (``<log_dir>/<name>.stderr.log``).
        on_tools: Called with the server's tools after it announced that its list changed.
    """

    def __init__(self, spec: UpstreamSpec, limits: McpConfig, vault: Vault, *, log_dir: Path | None = None,
                 on_tools: Callable[[Upstream, list[Any]], Awaitable[None]] | None = None) -> None:
        self.spec = spec
        self.limits = limits
        self.vault = vault
        self.log_dir = log_dir
        self.on_tools = on_tools
        self._client: Any = None
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock: asyncio.Lock | None = None
        self._failure: BaseException | None = None

    # -- connecting ---------------------------------------------------------------------------------------------

    def _secret(self, reference: str, what: str) -> str:
        match = SECRET.match(reference)
        if match is None:
            return reference
        try:
            return self.vault.get(match.group(1))
        except SecretError as exc:
            raise ToolError(f"mcp server {self.spec.name}: {what} names a secret the vault lacks: {exc}") from exc

    def stdio_params(self) -> Any:
        """The stdio server's process: its command inside the sandbox, and its environment (secrets resolved)."""
        from mcp import StdioServerParameters

        spec = self.spec
        env = {key: self._secret(value, f"env {key}") for key, value in spec.env.items()}
        argv = list(spec.command)
        if spec.sandbox == "bwrap://":
            argv = bwrap_argv(argv, dirs=spec.dirs, network=bool(spec.egress))
        return StdioServerParameters(command=argv[0], args=argv[1:], env=env or None)

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[Any]:
        from mcp import Client

        async def on_message(message: Any) -> None:
            if getattr(message, "method", "") == "notifications/tools/list_changed" and self.on_tools is not None:
                asyncio.get_running_loop().create_task(self._relist())

        timeout = self.limits.call_timeout_s
        if self.spec.url:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            headers = {"Authorization": f"Bearer {self._secret(self.spec.key, 'key')}"} if self.spec.key else {}
            http = httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(timeout, read=timeout))
            async with http, Client(streamable_http_client(self.spec.url, http_client=http),
                                    read_timeout_seconds=timeout, message_handler=on_message) as client:
                yield client
            return
        from mcp import stdio_client

        errlog: Any = sys.stderr
        with contextlib.ExitStack() as stack:
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                errlog = stack.enter_context((self.log_dir / f"{self.spec.name}.stderr.log").open("a"))
            async with Client(stdio_client(self.stdio_params(), errlog=errlog), read_timeout_seconds=timeout,
                              message_handler=on_message) as client:
                yield client

    async def _hold(self, ready: asyncio.Event, stop: asyncio.Event) -> None:
        import anyio

        try:
            async with self._session() as client:
                self._client = client
                ready.set()
                async with anyio.create_task_group() as group:
                    group.start_soon(self._listen, client)
                    await stop.wait()
                    group.cancel_scope.cancel()
        except BaseException as exc:  # the connection failed or the server died: the next call reconnects
            self._failure = exc
        finally:
            self._client = None
            ready.set()

    async def client(self) -> Any:
        """The live client (connecting now if there is none).

        Raises:
            ToolError: the server did not start or answer within ``connect_timeout_s``.
        """
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests, a restarted server): connections do not cross loops
            self._loop, self._lock, self._client, self._task = loop, asyncio.Lock(), None, None
        assert self._lock is not None
        async with self._lock:
            if self._client is not None and self._task is not None and not self._task.done():
                return self._client
            await self._drop()
            ready, self._stop, self._failure = asyncio.Event(), asyncio.Event(), None
            self._task = loop.create_task(self._hold(ready, self._stop))
            try:
                await asyncio.wait_for(ready.wait(), self.limits.connect_timeout_s)
            except TimeoutError:
                await self._drop()
                raise ToolError(f"mcp server {self.spec.name} did not start within "
                                f"{self.limits.connect_timeout_s:g}s") from None
            if self._client is None:
                raise ToolError(f"mcp server {self.spec.name} could not be reached: {_reason(self._failure)}")
            return self._client

    async def _drop(self) -> None:
        """Ends the current connection (the server process is stopped)."""
        task, stop = self._task, self._stop
        self._task, self._client = None, None
        if task is None:
            return
        if stop is not None:
            stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 5)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _listen(self, client: Any) -> None:
        """On the 2026-07-28 protocol list changes come only over ``subscriptions/listen`` (older servers announce
        them as notifications, handled in :meth:`_session`)."""
        if self.on_tools is None or str(getattr(client, "protocol_version", "")) < "2026":
            return
        with contextlib.suppress(Exception):
            async with client.listen(tools_list_changed=True) as events:
                async for _ in events:
                    asyncio.get_running_loop().create_task(self._relist())

    async def _relist(self) -> None:
        with contextlib.suppress(Exception):
            tools = await self.list_tools()
            if self.on_tools is not None:
                await self.on_tools(self, tools)

    # -- the server's tools --------------------------------------------------------------------------------------

    async def list_tools(self) -> list[Any]:
        """The server's tools (all pages)."""
        client = await self.client()
        tools: list[Any] = []
        cursor: str | None = None
        for _ in range(100):
            page = await client.list_tools(cursor=cursor, cache_mode="refresh")
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        return tools

    def manifests(self, tools: Sequence[Any]) -> list[ToolManifest]:
        return [m for m in (manifest_for(self.spec, t) for t in tools) if m is not None]

    async def __call__(self, call: HostCall) -> HostResult:
        """The execute step of ``NAME.tool``: one ``tools/call``, its answer labelled ``mcp:NAME`` (untrusted).

        Raises:
            ToolError: the tool reported an error, or the server crashed, hung, or answered too much.
        """
        name = call.tool.split(".", 1)[1] if "." in call.tool else call.tool
        client = await self.client()
        limit = self.limits.call_timeout_s
        try:
            result = await asyncio.wait_for(client.call_tool(name, dict(call.arguments), read_timeout_seconds=limit),
                                            limit + 1)
        except TimeoutError:
            await self._drop()
            raise ToolError(f"mcp server {self.spec.name} did not answer {name} within {limit:g}s; "
                            "its connection was reset") from None
        except Exception as exc:
            reason = _reason(exc)
            if "timed out" in reason:
                await self._drop()
                raise ToolError(f"mcp server {self.spec.name} did not answer {name} within {limit:g}s; "
                                "its connection was reset") from exc
            await self._drop()
            raise ToolError(f"mcp server {self.spec.name} failed on {name}: {reason}; it is restarted on the "
                            "next call") from exc
        return self.result(name, result)

    def result(self, name: str, result: Any) -> HostResult:
        """A ``CallToolResult`` as the tool's value (structured content, else the text), or an error."""
        size = len(result.model_dump_json(by_alias=True, exclude_none=True))
        if size > self.limits.max_response_bytes:
            raise ToolError(f"mcp server {self.spec.name}: the answer of {name} is {size} bytes, over the limit of "
                            f"{self.limits.max_response_bytes} ([mcp] max_response_bytes)")
        texts: list[str] = []
        for part in result.content or ():
            kind = getattr(part, "type", "")
            if kind == "text":
                texts.append(str(part.text))
            else:
                texts.append(json.dumps({"type": kind, "omitted": "non-text content"}))
        text = "\n".join(texts)
        if result.is_error:
            raise ToolError(f"{self.spec.name}.{name}: {text[:4000] or 'the tool reported an error'}")
        value: Any = result.structured_content if result.structured_content is not None else text
        return HostResult(value, (Label(f"mcp:{self.spec.name}", False),))

    async def aclose(self) -> None:
        if self._loop is asyncio.get_running_loop():
            await self._drop()


def _reason(exc: BaseException | None) -> str:
    """The innermost message of an exception (the SDK wraps transport errors in exception groups)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if exc is None:
        return "no reason given"
    text = str(exc) or type(exc).__name__
    return text[:500]


def discover(specs: Mapping[str, UpstreamSpec], limits: McpConfig, vault: Vault, *,
             log_dir: Path | None = None) -> tuple[dict[str, list[ToolManifest]], dict[str, str]]:
    """Starts each server once, lists its tools and stops it (in a thread with its own event loop, so it works
    from synchronous and asynchronous callers alike).

    Returns:
        The manifests by server, and why each server that could not be listed failed.
    """
    import concurrent.futures

    async def one(spec: UpstreamSpec) -> list[ToolManifest]:
        upstream = Upstream(spec, limits, vault, log_dir=log_dir)
        try:
            return upstream.manifests(await upstream.list_tools())
        finally:
            await upstream.aclose()

    async def every() -> tuple[dict[str, list[ToolManifest]], dict[str, str]]:
        found: dict[str, list[ToolManifest]] = {}
        failed: dict[str, str] = {}
        results = await asyncio.gather(*(one(s) for s in specs.values()), return_exceptions=True)
        for spec, result in zip(specs.values(), results, strict=True):
            if isinstance(result, BaseException):
                failed[spec.name] = _reason(result)
            else:
                found[spec.name] = result
        return found, failed

    if not specs:
        return {}, {}
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="stitchwork-mcp") as pool:
        return pool.submit(asyncio.run, every()).result()


def check_sandbox(specs: Mapping[str, UpstreamSpec]) -> None:
    """Raises ConfigError when a stdio server asks for bwrap and it is not installed."""
    for spec in specs.values():
        if spec.command and spec.sandbox == "bwrap://" and not bwrap_available():
            raise ConfigError(f"[mcp.servers.{spec.name}] runs in bwrap://, which is not installed (apt-get install "
                              "bubblewrap); set sandbox = \"inline://\" to run it without isolation")


CACHE_FILE = "tools.json"
"""The upstream tools last listed, in ``<state>/mcp/``: commands that do not serve (the CLI) start no servers."""


def expand_grants(granted: Sequence[str], names: Sequence[str]) -> frozenset[str]:
    """An agent's tools with ``NAME.*`` (every tool of upstream server NAME) expanded against ``names``."""
    out: set[str] = set()
    for tool in granted:
        if tool.endswith(".*"):
            out.update(n for n in names if n.startswith(tool[:-1]))
        else:
            out.add(tool)
    return frozenset(out)


class UpstreamTools:
    """Every configured upstream server: their manifests at start-up, their execute steps, and the refresh of
    the tool registry, the agents' grants and the policy engine when a server's tool list changes.

    Args:
        config: ``[mcp]``.
        vault: The platform's vault.
        state_dir: The platform's state directory (``mcp/`` in it keeps the listed tools and servers' stderr).
        fresh: List every server now (``stitchwork up``); otherwise the last listing is used when there is one.
    """

    def __init__(self, config: McpConfig, vault: Vault, state_dir: Path, *, fresh: bool = False) -> None:
        self.config = config
        self.specs = parse_servers(config)
        check_sandbox(self.specs)
        self.dir = state_dir / "mcp"
        self.failed: dict[str, str] = {}
        self.servers = {name: Upstream(spec, config, vault, log_dir=self.dir, on_tools=self._changed)
                        for name, spec in self.specs.items()}
        self.manifests = self._load(vault, fresh)
        self._install: Callable[[str, list[ToolManifest]], Awaitable[None]] | None = None

    def _load(self, vault: Vault, fresh: bool) -> dict[str, list[ToolManifest]]:
        if not self.specs:
            return {}
        cache = self.dir / CACHE_FILE
        listed: dict[str, list[dict[str, Any]]] = {}
        if not fresh:
            with contextlib.suppress(OSError, ValueError):
                loaded = json.loads(cache.read_text())
                listed = {k: v for k, v in loaded.items() if k in self.specs and isinstance(v, list)}
        missing = {name: spec for name, spec in self.specs.items() if name not in listed}
        if missing:
            found, self.failed = discover(missing, self.config, vault, log_dir=self.dir)
            for name, manifests in found.items():
                listed[name] = [{"name": m.name.split(".", 1)[1], "description": m.description,
                                 "input_schema": dict(m.args_schema)} for m in manifests]
            for name, reason in self.failed.items():
                log.error("mcp server %s: its tools could not be listed: %s", name, reason)
            self.dir.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(listed))
        return {name: self.servers[name].manifests([_Listed(**t) for t in tools]) for name, tools in listed.items()}

    def all_manifests(self) -> list[ToolManifest]:
        return [m for manifests in self.manifests.values() for m in manifests]

    def prefixes(self) -> tuple[str, ...]:
        """``NAME.`` of every configured server: names an agent may be given before the server lists them."""
        return tuple(f"{name}." for name in self.specs)

    def on_change(self, install: Callable[[str, list[ToolManifest]], Awaitable[None]]) -> None:
        """Sets what applies a server's new manifests (the platform: registry, grants, policy, audit)."""
        self._install = install

    async def _changed(self, upstream: Upstream, tools: list[Any]) -> None:
        manifests = upstream.manifests(tools)
        self.manifests[upstream.spec.name] = manifests
        with contextlib.suppress(OSError):
            listed = {name: [{"name": m.name.split(".", 1)[1], "description": m.description,
                              "input_schema": dict(m.args_schema)} for m in ms] for name, ms in self.manifests.items()}
            (self.dir / CACHE_FILE).write_text(json.dumps(listed))
        if self._install is not None:
            await self._install(upstream.spec.name, manifests)

    async def aclose(self) -> None:
        for upstream in self.servers.values():
            with contextlib.suppress(Exception):
                await upstream.aclose()


@dataclass(frozen=True)
class _Listed:
    """A tool as cached (the fields :func:`manifest_for` reads)."""

    name: str
    description: str = ""
    input_schema: Mapping[str, Any] = field(default_factory=dict)


__all__ = ["ToolOverride", "Upstream", "UpstreamSpec", "UpstreamTools", "check_sandbox", "discover", "expand_grants",
           "manifest_for", "parse_servers"]
