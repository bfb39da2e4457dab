"""Templates and the response headers every dashboard page carries.

Jinja2 autoescapes everything (``autoescape=True`` for every template): tool output, model text, arguments, agent
and tool names are text, never markup. Only :mod:`.charts` returns markup, built from escaped pieces. The
Content-Security-Policy allows scripts, styles and connections from this origin only: no inline script or style,
no ``eval``, no frames, no plugins, forms posting only here. Links built from data go through :func:`safe_url`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from jinja2 import ChainableUndefined, Environment, FileSystemLoader
from starlette.responses import HTMLResponse, Response

__all__ = ["CSP", "HERE", "SECURITY_HEADERS", "page", "safe_next", "safe_url", "templates"]

HERE = Path(__file__).resolve().parent
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}
SAFE_SCHEMES = frozenset({"http", "https", "mailto"})


def safe_url(value: object) -> str:
    """``value`` if it is a relative path or an http(s)/mailto URL, else ``#`` (never ``javascript:``, ``data:``)."""
    text = str(value or "").strip()
    if not text or any(ord(c) < 32 for c in text):
        return "#"
    parts = urlsplit(text)
    if parts.scheme:
        return text if parts.scheme.lower() in SAFE_SCHEMES else "#"
    if text.startswith("//") or text.startswith("\\"):
        return "#"
    return text


def safe_next(value: str) -> str:
    """Where to go after sign-in: a dashboard path only (no other host, no scheme), else the runs page."""
    if (value.startswith("/ui/") or value == "/ui") and not value.startswith("//") and "\\" not in value \
            and not any(ord(c) < 32 for c in value):
        return value
    return "/ui/runs"


def _when(value: object) -> str:
    try:
        stamp = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(stamp) or stamp <= 0:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp)) + " UTC"


def _clock(value: object) -> str:
    """Time of day (UTC) of a Unix time, for dense tables (the full time goes in a tooltip)."""
    full = _when(value)
    return full[11:19] if full else ""


def _ago(value: object) -> str:
    try:
        seconds = time.time() - float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(seconds):
        return ""
    if seconds < 60:
        return f"{max(int(seconds), 0)} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} min ago"
    if seconds < 86400:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} d ago"


def _money(value: object) -> str:
    try:
        amount = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(amount):
        return ""
    return f"${amount:,.4f}" if amount < 1 else f"${amount:,.2f}"


def _number(value: object) -> str:
    if value is None or value == "":
        return ""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return ""
    return f"{int(number):,}" if number == int(number) else f"{number:,.3f}"


def _json(value: object) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=True)


def _query(base: str, params: Mapping[str, Any], **changes: Any) -> str:
    """``base`` with ``params`` (empty values dropped) updated by ``changes``, URL-encoded."""
    merged = {k: v for k, v in {**params, **changes}.items() if v not in (None, "")}
    return f"{base}?{urlencode(merged)}" if merged else base


templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=ChainableUndefined,
                        trim_blocks=True, lstrip_blocks=True)
templates.filters.update({"when": _when, "clock": _clock, "ago": _ago, "money": _money, "number": _number,
                          "tojson_text": _json, "safe_url": safe_url, "urlpart": lambda v: quote(str(v), safe="")})
templates.globals.update({"query": _query})


def page(name: str, context: Mapping[str, Any], *, status: int = 200) -> Response:
    """Renders template ``name`` with the page's security headers."""
    html = templates.get_template(name).render(**context)
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
