"""Cedar policy text: files, statements and their lines, policy ids, and load errors that name a file and line.

Policies are loaded from ``*.cedar`` files (:func:`load_policy_files`); each becomes a :class:`PolicyInfo` with a
human-readable id (its ``@id`` annotation, else ``<file>:<line>``) and its body in Cedar's JSON form. Every
problem found on the way is a :class:`~stitchwork.errors.PolicyLoadError` naming the file and, where it can be
found, the line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cedarpy

from stitchwork.errors import PolicyLoadError

POLICY_REF = re.compile(r"\bpolicy(\d+)\b")
"""Cedar's positional id of a policy, ``policy<N>``: its load-order index."""


def builtin_policy_dir() -> Path:
    """The directory of the default policy pack shipped with Stitchwork."""
    # policy/ -> security/ -> stitchwork/, which holds the ``policies`` pack.
    return Path(__file__).resolve().parent.parent.parent / "policies"


def cedar_string(value: str) -> str:
    """A Cedar string literal (Cedar escapes, not JSON's ``\\uXXXX``)."""
    out = ['"']
    for ch in value:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


@dataclass(frozen=True)
class PolicyInfo:
    """One loaded policy.

    Attributes:
        id: Its ``@id`` annotation, else ``<file>:<line>``.
        effect: ``permit`` or ``forbid``.
        file: Short label of its file (``default/read.cedar`` for the built-in pack).
        path: The file's full path.
        line: Line of the policy's first token (its first annotation), 0 if it could not be located.
        annotations: All its annotations (a bare ``@name`` has the value ``""``).
    """

    id: str
    effect: str
    file: str
    path: str
    line: int
    annotations: Mapping[str, str]

    @property
    def needs_approval(self) -> bool:
        """Whether this is a forbid that a human approval lifts."""
        return self.effect == "forbid" and self.annotations.get("approval") == "required"

    @property
    def location(self) -> str:
        """``<file>:<line>``, or just the file when the line is unknown."""
        return f"{self.file}:{self.line}" if self.line else self.file


def reason(info: PolicyInfo) -> str:
    """How a deciding policy is explained: ``forbid <id> (<file>:<line>)``."""
    where = "" if info.id == info.location else f" ({info.location})"
    if info.needs_approval:
        return f"approval required by {info.id}{where}"
    return f"{info.effect} {info.id}{where}"


# -- statements and lines ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Statement:
    """One policy's text in its file: from its first token to its terminating ``;``."""

    line: int
    text: str
    terminated: bool


def _split_statements(text: str) -> list[_Statement]:
    """Splits Cedar policy text into policies, tracking the line each starts on.

    Cedar has ``//`` comments and double-quoted strings with backslash escapes; a ``;`` outside both ends a
    policy. Text after the last ``;`` that is not blank or a comment is returned as an unterminated statement.
    """
    statements: list[_Statement] = []
    line = 1
    start = -1
    start_line = 0
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
            continue
        if ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        if ch.isspace():
            i += 1
            continue
        if start < 0:
            start, start_line = i, line
        if ch == '"':
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                if i < n and text[i] == "\n":
                    line += 1
                i += 1
            i += 1
            continue
        if ch == ";":
            statements.append(_Statement(start_line, text[start : i + 1], True))
            start = -1
        i += 1
    if start >= 0:
        statements.append(_Statement(start_line, text[start:], False))
    return statements


def _parse_error(text: str) -> str | None:
    """Cedar's parse error for ``text``, or None if it parses."""
    try:
        cedarpy.PolicySet.from_str(text)
    except ValueError as exc:
        return str(exc) or "syntax error"
    return None


def _locate_parse_error(text: str, message: str) -> tuple[int | None, str]:
    """Finds the line of a parse error that Cedar reports without a location.

    Each statement is parsed alone; the first that fails holds the error. Within a multi-line statement the
    offending line is the shortest prefix of lines that already fails with the same message.

    Returns:
        The line (None if no single statement fails) and the message to report.
    """
    for statement in _split_statements(text):
        error = _parse_error(statement.text)
        if error is None:
            continue
        lines = statement.text.split("\n")
        count = next(
            (k for k in range(1, len(lines)) if _parse_error("\n".join(lines[:k])) == error), len(lines)
        )
        if count == 1:
            return statement.line, error
        return statement.line + count - 1, f"{error} (in the policy starting at line {statement.line})"
    return None, message


# -- files ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedPolicies:
    """The policies of a set of files, in load order.

    Attributes:
        infos: Each policy described; its index is its Cedar id ``policy<N>``.
        bodies: Each policy in Cedar's JSON form, in the same order.
        text: The files' texts joined, for parsing and validating them as one policy set.
    """

    infos: tuple[PolicyInfo, ...]
    bodies: tuple[Mapping[str, Any], ...]
    text: str


def load_policy_files(paths: Sequence[Path]) -> LoadedPolicies:
    """Reads and parses policy files, or directories whose ``*.cedar`` files are loaded in name order.

    Raises:
        PolicyLoadError: A file is missing or unreadable, a policy does not parse, is a template, misuses
            ``@approval``, or repeats an ``@id``; the error names the file and line.
    """
    infos: list[PolicyInfo] = []
    bodies: list[Mapping[str, Any]] = []
    texts: list[str] = []
    seen_ids: dict[str, PolicyInfo] = {}
    for label, path in _policy_files(paths):
        text = _read(path)
        file_infos, file_bodies = _file_policies(label, path, text)
        for info in file_infos:
            if info.id in seen_ids:
                first = seen_ids[info.id]
                raise PolicyLoadError(
                    f"duplicate policy id {info.id!r} (first declared at {first.path}:{first.line})",
                    path=info.path,
                    line=info.line or None,
                )
            seen_ids[info.id] = info
        infos.extend(file_infos)
        bodies.extend(file_bodies)
        texts.append(text)
    return LoadedPolicies(tuple(infos), tuple(bodies), "\n".join(texts))


def _policy_files(paths: Sequence[Path]) -> list[tuple[str, Path]]:
    """The files to load with their short labels, in order, each once."""
    builtin = builtin_policy_dir()
    found: list[tuple[str, Path]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            prefix = "default" if path.resolve() == builtin else path.name
            found += [(f"{prefix}/{f.name}", f) for f in sorted(path.glob("*.cedar")) if f.is_file()]
        elif path.is_file():
            found.append((path.name, path))
        else:
            raise PolicyLoadError("no such policy file or directory", path=str(path))
    unique: list[tuple[str, Path]] = []
    seen_paths: set[Path] = set()
    labels: set[str] = set()
    for label, path in found:
        resolved = path.resolve()
        if resolved in seen_paths:
            continue
        seen_paths.add(resolved)
        if label in labels:
            label = str(path)
        labels.add(label)
        unique.append((label, path))
    return unique


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyLoadError(f"cannot read policy file: {exc}", path=str(path)) from exc


def _file_policies(label: str, path: Path, text: str) -> tuple[list[PolicyInfo], list[Mapping[str, Any]]]:
    """Parses one file: its policies described (id, effect, line, annotations) and as Cedar JSON."""
    try:
        est = json.loads(cedarpy.policies_to_json_str(text))
    except ValueError as exc:
        line, message = _locate_parse_error(text, str(exc))
        raise PolicyLoadError(f"syntax error: {message}", path=str(path), line=line) from exc
    statements = _split_statements(text)
    templates: dict[str, Any] = est.get("templates") or {}
    static: dict[str, Any] = est.get("staticPolicies") or {}
    count = len(static) + len(templates)
    lines_known = len(statements) == count

    def line_of(index: int) -> int:
        return statements[index].line if lines_known else 0

    if templates:
        first = min(int(key.removeprefix("policy")) for key in templates)
        raise PolicyLoadError(
            "policy templates (?principal / ?resource slots) are not supported",
            path=str(path),
            line=line_of(first) or None,
        )
    infos: list[PolicyInfo] = []
    used: set[str] = set()
    for index in range(count):
        body = static[f"policy{index}"]
        line = line_of(index)
        annotations = {
            str(k): "" if v is None else str(v) for k, v in (body.get("annotations") or {}).items()
        }
        effect = str(body.get("effect"))
        if "approval" in annotations:
            if annotations["approval"] != "required":
                raise PolicyLoadError(
                    'the only @approval value is "required"', path=str(path), line=line or None
                )
            if effect != "forbid":
                raise PolicyLoadError(
                    '@approval("required") only applies to forbid policies',
                    path=str(path),
                    line=line or None,
                )
        policy_id = annotations.get("id") or (f"{label}:{line}" if line else f"{label}#{index + 1}")
        if "id" not in annotations or not annotations["id"]:
            base, suffix = policy_id, 2
            while policy_id in used:  # two policies without @id on one line
                policy_id, suffix = f"{base}#{suffix}", suffix + 1
        used.add(policy_id)
        infos.append(PolicyInfo(policy_id, effect, label, str(path), line, annotations))
    return infos, [static[f"policy{index}"] for index in range(count)]


def validate_against_schema(text: str, schema: cedarpy.Schema, infos: Sequence[PolicyInfo]) -> None:
    """Validates the policies of ``text`` against ``schema`` in strict mode.

    Raises:
        PolicyLoadError: The first policy (in load order) that does not validate, with its file and line, and
            up to five more problems in the message.
    """
    result = cedarpy.validate_policies(text, schema)
    if result.validation_passed:
        return
    problems: list[tuple[int, PolicyInfo | None, str]] = []
    for error in result.errors:
        match = POLICY_REF.fullmatch(error.policy_id or "")
        index = int(match.group(1)) if match else -1
        info = infos[index] if 0 <= index < len(infos) else None
        message = re.sub(r"^for policy `policy\d+`, ", "", error.error)
        problems.append((index if index >= 0 else len(infos), info, message))
    problems.sort(key=lambda p: p[0])
    _, info, message = problems[0]
    where = f"policy {info.id}: " if info is not None else ""
    more = ""
    if len(problems) > 1:
        rest = [f"{p[1].path}:{p[1].line}: {p[2]}" if p[1] else p[2] for p in problems[1:6]]
        more = f" (and {len(problems) - 1} more: {'; '.join(rest)})"
    raise PolicyLoadError(
        f"does not validate against the schema: {where}{message}{more}",
        path=info.path if info else "",
        line=(info.line or None) if info else None,
    )
