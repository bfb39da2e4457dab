"""Tool manifests (TOML) and argument validation.

A tool lives in a directory with a manifest ``<name>.toml`` and its code::

    name = "send_email"
    description = "Send an e-mail to one recipient."
    side_effect = "external"          # read | write | external | irreversible
    entry = "mail.py:send_email"      # file (relative to the manifest) and function
    sandbox = "bwrap://"              # optional; default: [isolation] default
    target = "to"                     # optional: the argument naming what the call acts on (Cedar resource)
    secrets = ["smtp_password"]       # vault secrets the tool may receive
    egress = []                       # hosts the tool may reach (empty: no network)
    undo = ""                         # optional: name of the tool that reverses this one
    trusted_output = false            # whether results are trusted content (default: untrusted)

    [limits]                          # optional overrides of [isolation] limits
    timeout_s = 5

    [args]                            # JSON Schema (2020-12) of the arguments object
    type = "object"
    required = ["to", "body"]
    additionalProperties = false
    properties.to = { type = "string", format = "email" }
    properties.body = { type = "string", maxLength = 20000 }

String arguments with ``format = "relative-path"`` must stay inside the tool's work directory: no absolute
paths, no ``..`` segments, no NUL bytes.

A *host-side* tool is trusted platform code that runs in the gateway's process instead of a sandbox: its manifest
says ``host = "<handler>"`` instead of ``entry`` (and has no ``sandbox``, ``secrets``, ``egress`` or ``limits``).
It takes the same gateway path (identity, policy, taint, approval, audit); see :mod:`stitchwork.tools.host`.

A *remote agent* is a tool too: ``a2a = "a2a+https://host/a2a/agent"`` instead of ``entry`` (optionally
``a2a_key = "secret://name"``, its bearer key) calls that A2A agent with the arguments ``message`` and ``task_id``
(:data:`~stitchwork.tools._remote.A2A_ARGS`); its side effect defaults to ``external`` and its Cedar resource is
the URL. Its answers are untrusted content labelled ``a2a:<tool name>``.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator, FormatChecker

from stitchwork.errors import ConfigError, InvalidArguments, UnknownTool
from stitchwork.isolation._base import Limits
from stitchwork.security.policy import SideEffect as SideEffect  # the classes are the policy's action groups
from stitchwork.tools._fastcheck import Check, compile_check
from stitchwork.tools._remote import A2A_ARGS, a2a_endpoint, secret_name

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


FORMATS = FormatChecker()


def _relative_path(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if "\x00" in value:
        raise ValueError("contains a NUL byte")
    if value.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", value):
        raise ValueError("is an absolute path; only paths inside the work directory are allowed")
    if ".." in PurePosixPath(value.replace("\\", "/")).parts:
        raise ValueError("contains '..'; only paths inside the work directory are allowed")
    return True


def _email(value: object) -> bool:
    if isinstance(value, str) and not EMAIL_RE.match(value):
        raise ValueError("is not an e-mail address")
    return True


FORMATS.checks("relative-path", raises=ValueError)(_relative_path)
FORMATS.checks("email", raises=ValueError)(_email)


@dataclass(frozen=True)
class ToolManifest:
    """One tool, as declared by its manifest."""

    name: str
    description: str
    side_effect: SideEffect
    entry_file: Path
    entry_function: str
    args_schema: Mapping[str, Any]
    sandbox: str = ""
    target: str = ""
    secrets: tuple[str, ...] = ()
    egress: tuple[str, ...] = ()
    undo: str = ""
    trusted_output: bool = False
    limits: Mapping[str, Any] = field(default_factory=dict)
    source: Path | None = None
    host: str = ""
    """Name of the registered host-side handler (``""``: the tool runs ``entry`` in a sandbox)."""
    remote: str = ""
    """A remote agent's endpoint (``https://…``) when the tool calls one; the call's Cedar resource (target)
    when the tool has no ``target`` argument."""
    remote_key: str = ""
    """The vault name of the bearer key sent to ``remote`` ("" for none)."""

    def openai_schema(self) -> dict[str, Any]:
        """The tool as an OpenAI chat-completions ``tools`` entry."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.args_schema)},
        }

    def limits_over(self, base: Limits) -> Limits:
        """``base`` with this tool's overrides applied."""
        values = {k: getattr(base, k) for k in Limits.__dataclass_fields__}
        values.update(self.limits)
        return Limits(**values)


def _parse_manifest(path: Path) -> ToolManifest:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"tool manifest {path}: {exc}") from exc
    known = {"name", "description", "side_effect", "entry", "sandbox", "target", "secrets", "egress", "undo",
             "trusted_output", "limits", "args", "host", "a2a", "a2a_key"}
    if unknown := sorted(set(data) - known):
        raise ConfigError(f"tool manifest {path}: unknown key(s) {', '.join(unknown)}")
    name = data.get("name", "")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"tool manifest {path}: name {name!r} must match {NAME_RE.pattern}")
    remote = remote_key = ""
    if "a2a" in data:
        if clash := sorted(k for k in ("entry", "host", "sandbox", "secrets", "egress", "limits") if k in data):
            raise ConfigError(f"tool manifest {path}: a remote agent (a2a) has no {', '.join(clash)}")
        remote = a2a_endpoint(data["a2a"], where=f"tool manifest {path}")
        remote_key = secret_name(data.get("a2a_key"), where=f"tool manifest {path}: a2a_key")
        data = {"side_effect": "external", "args": A2A_ARGS, **data, "host": "a2a"}
    elif "a2a_key" in data:
        raise ConfigError(f"tool manifest {path}: a2a_key without a2a")
    try:
        side_effect = SideEffect(data.get("side_effect", ""))
    except ValueError as exc:
        raise ConfigError(
            f"tool manifest {path}: side_effect must be one of {', '.join(s.value for s in SideEffect)}"
        ) from exc
    host = data.get("host", "")
    if host:
        if not isinstance(host, str) or not re.match(r"^[a-z][a-z0-9_.]{0,127}$", host):
            raise ConfigError(f"tool manifest {path}: host must name a handler (e.g. 'memory.get'), got {host!r}")
        if clash := sorted(k for k in ("entry", "sandbox", "secrets", "egress", "limits") if k in data):
            raise ConfigError(f"tool manifest {path}: a host-side tool has no {', '.join(clash)}")
        entry_file, function = path.resolve(), host.replace(".", "_")
    else:
        entry = data.get("entry", "")
        file_part, _, function = str(entry).partition(":")
        if not file_part.endswith(".py") or not function.isidentifier():
            raise ConfigError(f"tool manifest {path}: entry must look like 'file.py:function', got {entry!r}")
        entry_file = (path.parent / file_part).resolve()
        if not entry_file.is_file():
            raise ConfigError(f"tool manifest {path}: entry file {entry_file} does not exist")
    schema = data.get("args", {"type": "object", "properties": {}, "additionalProperties": False})
    try:
        Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"tool manifest {path}: args is not a valid JSON schema: {exc.message}") from exc
    if schema.get("type") != "object":
        raise ConfigError(f"tool manifest {path}: args must be a JSON schema of type object")
    target = str(data.get("target", ""))
    if target and target not in schema.get("properties", {}):
        raise ConfigError(f"tool manifest {path}: target {target!r} is not one of the tool's arguments")
    limits = dict(data.get("limits", {}))
    if unknown_limits := sorted(set(limits) - set(Limits.__dataclass_fields__)):
        raise ConfigError(f"tool manifest {path}: unknown limit(s) {', '.join(unknown_limits)}")
    return ToolManifest(
        name=name,
        description=str(data.get("description", "")),
        side_effect=side_effect,
        entry_file=entry_file,
        entry_function=function,
        args_schema=schema,
        sandbox=str(data.get("sandbox", "")),
        target=target,
        secrets=tuple(str(s) for s in data.get("secrets", ())),
        egress=tuple(str(h) for h in data.get("egress", ())),
        undo=str(data.get("undo", "")),
        trusted_output=bool(data.get("trusted_output", False)),
        limits=limits,
        source=path,
        host=str(host),
        remote=remote,
        remote_key=remote_key,
    )


class ToolRegistry:
    """The tools known to the platform, with compiled argument validators."""

    def __init__(self, tools: Iterable[ToolManifest], *, max_arg_bytes: int = 65_536) -> None:
        self._tools: dict[str, ToolManifest] = {}
        self._validators: dict[str, Draft202012Validator] = {}
        self._quick: dict[str, Check | None] = {}  # certainly-valid checks in front of jsonschema (_fastcheck)
        self.max_arg_bytes = max_arg_bytes
        for tool in tools:
            if tool.name in self._tools:
                raise ConfigError(
                    f"tool {tool.name!r} is declared twice ({self._tools[tool.name].source} and {tool.source})"
                )
            self._tools[tool.name] = tool
            self._validators[tool.name] = Draft202012Validator(tool.args_schema, format_checker=FORMATS)
            self._quick[tool.name] = compile_check(tool.args_schema)
        for tool in self._tools.values():
            if tool.undo and tool.undo not in self._tools:
                raise ConfigError(f"tool {tool.name!r}: undo tool {tool.undo!r} is not declared")

    def __iter__(self) -> Iterator[ToolManifest]:
        return iter(list(self._tools.values()))

    def register(self, tool: ToolManifest) -> None:
        """Adds ``tool``, or replaces the tool of that name (an upstream MCP server's tools change at run time)."""
        validator = Draft202012Validator(tool.args_schema, format_checker=FORMATS)
        self._tools[tool.name] = tool
        self._validators[tool.name] = validator
        self._quick[tool.name] = compile_check(tool.args_schema)

    def remove(self, name: str) -> None:
        """Forgets the tool ``name`` (no error when it is unknown)."""
        self._tools.pop(name, None)
        self._validators.pop(name, None)
        self._quick.pop(name, None)

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def get(self, name: str) -> ToolManifest:
        try:
            return self._tools[name]
        except KeyError:
            raise UnknownTool(
                f"unknown tool {name!r}; available: {', '.join(sorted(self._tools)) or 'none'}"
            ) from None

    def parse_arguments(self, tool: ToolManifest, raw: str | bytes | Mapping[str, Any] | None) -> dict[str, Any]:
        """Decodes and validates one call's arguments.

        Raises:
            InvalidArguments: not UTF-8, not JSON, too large, too deep, not an object, or against the schema.
        """
        if raw is None or raw == "" or raw == b"":
            raw = "{}"
        if isinstance(raw, bytes | bytearray):
            if len(raw) > self.max_arg_bytes:
                raise InvalidArguments(
                    f"{tool.name}: arguments are {len(raw)} bytes; the limit is {self.max_arg_bytes}"
                )
            try:
                raw = bytes(raw).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidArguments(
                    f"{tool.name}: arguments are not valid UTF-8 (byte {exc.start}: {exc.reason})"
                ) from exc
        if isinstance(raw, str):
            if len(raw.encode("utf-8", "surrogatepass")) > self.max_arg_bytes:
                raise InvalidArguments(f"{tool.name}: arguments exceed the limit of {self.max_arg_bytes} bytes")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise InvalidArguments(f"{tool.name}: arguments are not valid JSON: {exc}") from exc
            except RecursionError as exc:
                raise InvalidArguments(f"{tool.name}: arguments are nested too deeply") from exc
        else:
            value = raw
            try:
                size = len(json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass"))
            except (TypeError, ValueError, RecursionError) as exc:
                raise InvalidArguments(f"{tool.name}: arguments are not JSON-serialisable: {exc}") from exc
            if size > self.max_arg_bytes:
                raise InvalidArguments(f"{tool.name}: arguments exceed the limit of {self.max_arg_bytes} bytes")
        if not isinstance(value, dict):
            raise InvalidArguments(f"{tool.name}: arguments must be a JSON object, got {type(value).__name__}")
        _reject_surrogates(tool.name, value)
        quick = self._quick.get(tool.name)
        if quick is not None and quick(value):
            return value
        errors = sorted(self._validators[tool.name].iter_errors(value), key=lambda e: list(e.absolute_path))
        if errors:
            raise InvalidArguments(f"{tool.name}: " + "; ".join(_describe(e) for e in errors[:5]))
        return value


def _reject_surrogates(tool: str, value: Any, path: str = "") -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidArguments(f"{tool}: argument {path or '(root)'} contains invalid unicode") from exc
    elif isinstance(value, dict):
        for k, v in value.items():
            _reject_surrogates(tool, k, path)
            _reject_surrogates(tool, v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _reject_surrogates(tool, v, f"{path}[{i}]")


def _describe(error: jsonschema.ValidationError) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
    if error.validator == "format":
        cause = f": {error.cause}" if error.cause else ""
        return f"argument {where!r} {error.instance!r} is not a valid {error.validator_value}{cause}"
    if where:
        return f"argument {where!r}: {error.message}"
    return str(error.message)


def load_tools(dirs: Iterable[str | Path], *, max_arg_bytes: int = 65_536,
               extra: Iterable[ToolManifest] = ()) -> ToolRegistry:
    """Loads every ``*.toml`` manifest in ``dirs`` (not recursive), and the manifests in ``extra`` (declared in
    config: remote agents)."""
    manifests: list[ToolManifest] = list(extra)
    for d in dirs:
        directory = Path(d)
        if not directory.is_dir():
            raise ConfigError(f"tool directory {directory} does not exist")
        manifests.extend(_parse_manifest(p) for p in sorted(directory.glob("*.toml")))
    return ToolRegistry(manifests, max_arg_bytes=max_arg_bytes)
