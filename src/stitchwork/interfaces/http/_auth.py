"""Reading credentials off a request."""

from __future__ import annotations

from starlette.requests import HTTPConnection


def bearer(request: HTTPConnection) -> str:
    """The token of an ``Authorization: Bearer <token>`` header ("" without one)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


__all__ = ["bearer"]
