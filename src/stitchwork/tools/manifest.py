"""Tool manifests (TOML) and argument validation.

A tool lives in a directory with a manifest ``<name>.toml`` and its code::

    name = "send_email"
    description = "Send an e-mail to one recipient."
    side_effect = "external"          # read | write | external | irreversible
    entry = "mail.py:send_email"      # file (relative to the manifest) and function
    sandbox = "bwrap://"              # optional; default: [isolation] default
    target = "to"                     # optional: the argument naming what the call acts on (Cedar resource)
    destinations = ["to", "cc"]       # optional: every argument naming where data goes or who is engaged;
                                      # or a table with roles: { to = "recipient", hook = "url" }
    confidential = false              # whether its results are confidential (default: false)
    secrets = ["smtp_password"]       # vault secrets the tool may receive
    egress = []                       # hosts the tool may reach (empty: no network)
    undo = ""                         # optional: name of the tool that reverses this one (see [undo] below)
    idempotency = "none"              # "key": the tool de-duplicates by STITCHWORK_IDEMPOTENCY_KEY itself
    trusted_output = false            # whether results are trusted content (default: untrusted)

    [limits]                          # optional overrides of [isolation] limits
    timeout_s = 5

    [args]                            # JSON Schema (2020-12) of the arguments object
    type = "object"
    required = ["to", "body"]
    additionalProperties = false
    properties.to = { type = "string", format = "email" }
    properties.body = { type = "string", maxLength = 20000 }

Destinations. Every destination argument is checked by the policy pack like the target (a tainted ``cc``, a
forwarding address or a webhook URL counts as much as the recipient), whatever the side-effect class. Roles:
``recipient``, ``account``, ``url`` (data leaves through them: the *outward* roles), ``path``, ``command`` and
``code`` (the argument is run: taint there is reported as ``code``). Without ``destinations`` the roles come
from the general rule's argument names (:func:`stitchwork.tools.classify.roles`); a list without roles takes each
argument's role from the same rule, ``recipient`` when the name says nothing. ``destinations = []`` declares that
the tool has none beyond its target.

Confidentiality. The output of a ``confidential`` tool is recorded under a secrecy label: an external call whose
arguments carry its values needs a human's approval (``external-confidential`` in the default pack). Vault secrets
are always confidential by construction: their values never reach the model (outputs are redacted) and resolve
only inside the sandbox of a tool granted them.

Reversible tools. ``undo`` names the tool that reverses a call (its *compensation*), run by ``stitchwork undo``.
The undo call can take its arguments from the original call and its result: write ``undo`` as a table,
``[undo] tool = "delete_event"`` with ``args = { id = "result.id", calendar = "args.calendar" }``. The mapping
language is paths only, never code: each value is ``args`` or ``result`` followed by ``.name`` (an object key:
letters, digits, ``_``, ``-``) and ``[N]`` (a list index) steps, or a constant that is not a string (a number, a
boolean, a table or list of such). Checked when the manifests load, with an error naming the path: the syntax, the
first step of an ``args`` path (an argument the tool declares), and the undo tool's arguments (each mapped name
must be one of them, and every argument it requires must be mapped). Without ``args`` the undo call gets the
call's arguments as they were. At run time a path missing from the call or its result leaves the call not
undoable, and the tool's audit event says which path (``undo_error``); otherwise the event records the undo call
(``undo_call``: tool and arguments).

``idempotency = "key"`` declares that the tool (or the API behind it) de-duplicates calls by the key it gets in
``STITCHWORK_IDEMPOTENCY_KEY``: a call found started but unfinished after a crash is then resumed with the same
key instead of being held for a human (see :mod:`stitchwork.gateway.uncertain`).

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
from stitchwork.tools.classify import ROLES, roles

UNDO_PATH_RE = re.compile(r"^(args|result)(\.[A-Za-z0-9_-]+|\[[0-9]+\])*$")
IDEMPOTENCY = ("none", "key")
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
    destinations: Mapping[str, str] | None = None
    """Destination arguments by role; ``None``: from the general rule (:meth:`destination_roles`)."""
    confidential: bool = False
    """Whether its results are confidential."""

    @property
    def secret_output(self) -> bool:
        """Whether its output is recorded under a secrecy label (declared ``confidential``)."""
        return self.confidential

    def destination_roles(self) -> dict[str, str]:
        """The destination arguments by role (declared, or from the general rule)."""
        if self.destinations is not None:
            return dict(self.destinations)
        return roles(self.name, self.args_schema)
    undo_args: Mapping[str, Any] = field(default_factory=dict)
    """How the undo call's arguments come from this call: name → ``args.<path>``, ``result.<path>`` or a constant
    (empty with an ``undo`` tool: the undo call gets this call's arguments as they were)."""
    idempotency: str = "none"
    """``key``: the tool de-duplicates by ``STITCHWORK_IDEMPOTENCY_KEY``, so an uncertain call may be resumed."""
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
             "trusted_output", "limits", "args", "host", "destinations", "confidential", "idempotency", "a2a",
             "a2a_key"}
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
    destinations = _destinations(path, name, schema, data.get("destinations"))
    limits = dict(data.get("limits", {}))
    if unknown_limits := sorted(set(limits) - set(Limits.__dataclass_fields__)):
        raise ConfigError(f"tool manifest {path}: unknown limit(s) {', '.join(unknown_limits)}")
    undo, undo_args = _parse_undo(path, data.get("undo", ""))
    idempotency = data.get("idempotency", "none")
    if idempotency not in IDEMPOTENCY:
        raise ConfigError(f"tool manifest {path}: idempotency must be one of {', '.join(IDEMPOTENCY)}, "
                          f"got {idempotency!r}")
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
        undo=undo,
        undo_args=undo_args,
        idempotency=str(idempotency),
        trusted_output=bool(data.get("trusted_output", False)),
        limits=limits,
        source=path,
        host=str(host),
        destinations=destinations,
        confidential=bool(data.get("confidential", False)),
        remote=remote,
        remote_key=remote_key,
    )


def _destinations(path: Path, name: str, schema: Mapping[str, Any], raw: Any) -> dict[str, str] | None:
    """The manifest's ``destinations`` (a list of arguments or a table argument -> role), checked."""
    if raw is None:
        return None
    properties = schema.get("properties", {})
    inferred = roles(name, schema)
    if isinstance(raw, list):
        raw = {str(arg): inferred.get(str(arg), "recipient") for arg in raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"tool manifest {path}: destinations must be a list of arguments or a table of roles")
    out: dict[str, str] = {}
    for arg, role in raw.items():
        if arg not in properties:
            raise ConfigError(f"tool manifest {path}: destination {arg!r} is not one of the tool's arguments")
        if role not in ROLES:
            raise ConfigError(f"tool manifest {path}: destination {arg!r} has role {role!r}; roles: {', '.join(ROLES)}")
        out[str(arg)] = str(role)
    return out


def _parse_undo(path: Path, value: Any) -> tuple[str, dict[str, Any]]:
    """``undo = "tool"`` or ``[undo] tool = "...", args = {...}`` → (tool, argument paths)."""
    if isinstance(value, str):
        return value, {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"tool manifest {path}: undo must be a tool name or a table with tool and args")
    if unknown := sorted(set(value) - {"tool", "args"}):
        raise ConfigError(f"tool manifest {path}: undo: unknown key(s) {', '.join(unknown)}")
    tool, args = value.get("tool", ""), value.get("args", {})
    if not isinstance(tool, str) or not NAME_RE.match(tool):
        raise ConfigError(f"tool manifest {path}: undo.tool must name a tool, got {tool!r}")
    if not isinstance(args, Mapping):
        raise ConfigError(f"tool manifest {path}: undo.args must be a table (name = \"result.id\")")
    for name, source in args.items():
        if isinstance(source, str) and not UNDO_PATH_RE.match(source):
            raise ConfigError(f"tool manifest {path}: undo.args.{name} = {source!r} must be a path like "
                              "'result.id' or 'args.calendar' (constants must not be strings)")
        if not isinstance(source, str) and not _constant(source):
            raise ConfigError(f"tool manifest {path}: undo.args.{name} must be a path or a constant that is not a "
                              f"string, got {source!r}")
    return tool, dict(args)


def _constant(value: Any) -> bool:
    """Whether ``value`` is a constant of the undo mapping: no strings anywhere (a string is always a path)."""
    if isinstance(value, bool | int | float):
        return True
    if isinstance(value, list):
        return all(_constant(v) for v in value)
    if isinstance(value, Mapping):
        return all(_constant(v) for v in value.values())
    return False


def _check_undo(tool: ToolManifest, undo: ToolManifest) -> None:
    """The undo mapping of ``tool`` against its own arguments and those of its undo tool.

    Raises:
        ConfigError: an ``args`` path whose first step is not one of ``tool``'s arguments, a mapped name that is
            not an argument of ``undo``, or an argument ``undo`` requires that is not mapped.
    """
    where = f"tool {tool.name!r} ({tool.source or 'manifest'})"
    properties = tool.args_schema.get("properties") or {}
    for name, source in tool.undo_args.items():
        if isinstance(source, str) and source.startswith("args"):
            first = re.match(r"^args\.([A-Za-z0-9_-]+)", source)
            if first is None or first.group(1) not in properties:
                raise ConfigError(f"{where}: undo.args.{name} = {source!r}: {tool.name!r} has no argument "
                                  f"{(first.group(1) if first else source)!r}; its arguments: "
                                  f"{', '.join(sorted(properties)) or 'none'}")
    if not tool.undo_args:
        return
    targets = undo.args_schema.get("properties") or {}
    closed = undo.args_schema.get("additionalProperties") is False
    for name in tool.undo_args:
        if closed and name not in targets:
            raise ConfigError(f"{where}: undo.args.{name}: the undo tool {undo.name!r} has no argument {name!r}; "
                              f"its arguments: {', '.join(sorted(targets)) or 'none'}")
    if missing := sorted(set(undo.args_schema.get("required") or ()) - set(tool.undo_args)):
        raise ConfigError(f"{where}: undo.args does not map {', '.join(repr(m) for m in missing)}, required by the "
                          f"undo tool {undo.name!r}")


def _pick(value: Any, rest: str) -> Any:
    """The value at ``rest`` (``.a.b[0]``) inside ``value``; raises KeyError when it is not there."""
    for key, index in re.findall(r"\.([A-Za-z0-9_-]+)|\[([0-9]+)\]", rest):
        if key and isinstance(value, Mapping) and key in value:
            value = value[key]
        elif index and isinstance(value, list) and int(index) < len(value):
            value = value[int(index)]
        else:
            raise KeyError(rest)
    return value


def undo_call(tool: ToolManifest, args: Mapping[str, Any], result: Any) -> tuple[dict[str, Any] | None, str]:
    """The arguments of the call that reverses one call of ``tool``, and why there are none (``""`` when there
    are, or when ``tool`` declares no undo): the first path its manifest names that this call or its result lacks."""
    if not tool.undo:
        return None, ""
    if not tool.undo_args:
        return dict(args), ""
    roots = {"args": args, "result": result}
    built: dict[str, Any] = {}
    for name, source in tool.undo_args.items():
        if not isinstance(source, str):
            built[name] = source
            continue
        root = "args" if source.startswith("args") else "result"
        try:
            built[name] = _pick(roots[root], source[len(root):])
        except KeyError:
            where = "arguments have" if root == "args" else "result has"
            return None, f"undo.args.{name} = {source!r}: the call's {where} no value there"
    return built, ""


def undo_arguments(tool: ToolManifest, args: Mapping[str, Any], result: Any) -> dict[str, Any] | None:
    """The arguments of the call that reverses one call of ``tool`` (``None``: ``tool`` declares no undo, or a
    path its manifest names is missing from this call or its result; :func:`undo_call` says which)."""
    return undo_call(tool, args, result)[0]


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
            if tool.undo:
                _check_undo(tool, self._tools[tool.undo])

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
