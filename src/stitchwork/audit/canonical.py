"""Canonical JSON and the hash chain of the audit log.

Every audited action becomes one :class:`~stitchwork.audit.records.AuditEvent` in a SHA-256 hash chain::

    hash(n) = sha256(prev_hash(n) + canonical({seq, ts, kind, agent, run_id, tool, decision, data}))
    prev_hash(1) = "0" * 64,  prev_hash(n) = hash(n - 1)

Canonical JSON fast path. Preparing an event used to be mostly the recursive ``_sanitise`` copy of ``data`` and the
standard encoder. For plain data (exact dicts with str keys, lists, tuples, str, int, bool, None, finite floats)
``orjson`` with sorted keys produces the same bytes (checked in the tests over every code point, random floats and
generated data), except floats below 1e-4 (``1e-05`` vs ``0.00001``), which are spotted on the output and sent
down the slow path, as are integers beyond 64 bits and lone surrogates (orjson refuses them) and anything not
plain. The hashed bytes, and so the chain, are the same whichever path an event takes.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import orjson

from stitchwork.errors import AuditError

__all__ = ["GENESIS_HASH", "canonical"]

GENESIS_HASH = "0" * 64

_MAX_DEPTH = 64
_HEX_DIGITS = frozenset("0123456789abcdef")
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_encode_str = json.encoder.encode_basestring  # what _ENCODER does with a str, without its overhead
#: orjson refuses (instead of converting) subclasses, dataclasses and datetimes: those take the slow path.
_ORJSON_OPTIONS = (
    orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_DATETIME
)
#: The only numbers orjson writes differently from ``float.__repr__``: below 1e-4, orjson writes ``0.00001`` and
#: ``1e-7`` where Python writes ``1e-05`` and ``1e-07``. Strings matching this merely take the slow path.
_FLOAT_FORM_DIFFERS = re.compile(rb"[0-9]e-|0\.0000")
_FLOAT_FORM_DIFFERS_TEXT = re.compile(r"[0-9]e-|0\.0000")
_PLAIN_SCALARS = frozenset({str, int, bool, type(None)})
_PLAIN_CONTAINERS = frozenset({dict, list, tuple})


def canonical(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no whitespace, UTF-8, no NaN or infinities.

    Args:
        obj: JSON-compatible value (dict, list, str, int, float, bool, None).

    Returns:
        The UTF-8 encoding; equal values always give equal bytes.

    Raises:
        AuditError: ``obj`` holds NaN, an infinity, a non-JSON type or a string that is not valid Unicode.
    """
    try:
        return _ENCODER.encode(obj).encode("utf-8")
    except (ValueError, TypeError) as exc:  # UnicodeEncodeError is a ValueError
        raise AuditError(f"cannot encode audit value as canonical JSON: {exc}") from exc


def _body(seq: int, ts: float, kind: str, agent: str, run_id: str, tool: str, decision: str, data: str) -> str:
    """``canonical({...})`` of an event's hashed fields, built from ``data`` already in canonical JSON."""
    enc = _encode_str
    return (
        f'{{"agent":{enc(agent)},"data":{data},"decision":{enc(decision)},"kind":{enc(kind)},'
        f'"run_id":{enc(run_id)},"seq":{seq},"tool":{enc(tool)},"ts":{float.__repr__(ts)}}}'
    )


def _chain_hash(prev_hash: str, body: str) -> str:
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


def _is_hash(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and _HEX_DIGITS.issuperset(value)


def _clean_str(value: str) -> str:
    """Strings that cannot be encoded as UTF-8 (lone surrogates) get them backslash-escaped."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


_Path = tuple[str | int | None, ...]  # keys, list indexes, None for "a member of a set"


def _where(path: _Path) -> str:
    parts = ("{…}" if p is None else f"[{p!r}]" for p in path)
    return "data" + "".join(parts)


def _clean_key(key: object, path: _Path) -> str:
    if isinstance(key, str):
        return _clean_str(str(key))
    if isinstance(key, bool) or key is None:
        return _ENCODER.encode(key)  # what json.dumps would do: "true", "false", "null"
    if isinstance(key, int):
        return str(int(key))
    if isinstance(key, float) and math.isfinite(key):
        return repr(float(key))
    raise AuditError(f"audit {_where(path)} has a key of type {type(key).__name__} ({key!r}); keys must be strings")


def _sanitise(value: Any, path: _Path = (), active: set[int] | None = None) -> Any:
    """A JSON-safe copy of ``value``: bytes become their repr, sets sorted lists, tuples lists.

    Raises:
        AuditError: NaN or infinity, a type with no JSON form, a reference cycle or excessive nesting;
            the message names where in ``data`` it is.
    """
    kind = type(value)
    if kind is str:
        return _clean_str(value)
    if kind is int or kind is bool or value is None:
        return value
    if kind is float:
        if math.isfinite(value):
            return value
        raise AuditError(f"audit {_where(path)} is {value!r}: NaN and infinities are not valid JSON")
    if isinstance(value, str):  # subclasses (StrEnum, …) become plain values
        return _clean_str(str(value))
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _sanitise(float(value), path, active)
    if isinstance(value, bytes | bytearray | memoryview):
        return repr(bytes(value))
    if len(path) >= _MAX_DEPTH:
        raise AuditError(f"audit {_where(path)} is nested more than {_MAX_DEPTH} levels deep")
    active = set() if active is None else active
    if id(value) in active:
        raise AuditError(f"audit {_where(path)} contains itself (a reference cycle)")
    active.add(id(value))
    result: Any
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            name = key if type(key) is str and key.isascii() else _clean_key(key, path)
            if name in result:  # {1: …, "1": …}
                raise AuditError(f"audit {_where(path)} has two keys that both become {name!r} in JSON")
            result[name] = _sanitise(item, (*path, name), active)
    elif isinstance(value, list | tuple):
        result = [_sanitise(item, (*path, i), active) for i, item in enumerate(value)]
    elif isinstance(value, set | frozenset):
        items = [_sanitise(item, (*path, None), active) for item in value]
        result = sorted(items, key=_ENCODER.encode)
    else:
        raise AuditError(
            f"audit {_where(path)} is a {type(value).__name__}, which has no JSON form; "
            "convert it to str, int, float, bool, None, list or dict first"
        )
    active.discard(id(value))
    return result


def _is_plain(data: dict[str, Any]) -> bool:
    """True if ``data`` holds only exact dicts (str keys), lists, tuples, str, int, bool, None and finite floats.

    Call it only on data orjson has encoded (so it has no reference cycle). For such data ``_sanitise`` changes
    nothing but tuples (to lists, as orjson writes them) and lone surrogates (which orjson refuses).
    """
    scalars, containers = _PLAIN_SCALARS, _PLAIN_CONTAINERS
    stack: list[Any] = [data]
    while stack:
        container = stack.pop()
        if type(container) is dict:
            for key in container:
                if type(key) is not str:
                    return False
            values = container.values()
        else:
            values = container
        for value in values:
            kind = type(value)
            if kind in scalars:
                continue
            if kind is float:
                if value - value != 0.0:  # NaN or an infinity
                    return False
            elif kind in containers:
                stack.append(value)
            else:
                return False
    return True


def _fast_canonical(data: Mapping[str, Any]) -> str | None:
    """``canonical(_sanitise(data))`` as text, by orjson, when that is certain to give the same bytes; else None.

    orjson's output equals the standard encoder's (sorted keys, same escapes, shortest float digits) for plain
    data, except floats below 1e-4 in magnitude (checked on the output), integers beyond 64 bits and strings
    with lone surrogates (orjson refuses both). Data nested deeper than ``_sanitise`` allows, and anything not
    plain (subclasses, sets, bytes, enums, non-str keys, NaN), takes the slow path, which converts or refuses it.
    """
    if type(data) is not dict:
        return None
    try:
        raw = orjson.dumps(data, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:  # unsupported type, big int, surrogate, cycle or too deep
        return None
    if (b"e-" in raw or b"0.0000" in raw) and _FLOAT_FORM_DIFFERS.search(raw):
        return None
    if raw.count(b"{") + raw.count(b"[") > _MAX_DEPTH:  # might be nested deeper than _sanitise allows
        return None
    if not _is_plain(data):
        return None
    return raw.decode("utf-8")
