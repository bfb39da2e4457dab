"""How the CLI reaches the platform: over HTTP when ``stitchwork up`` is running (DuckDB has one writer: the
server), otherwise by opening the platform in this process (:mod:`~stitchwork.interfaces.cli.local`).

Remote mode: ``STITCHWORK_URL`` (e.g. ``http://10.0.0.5:8470``) names the server and ``STITCHWORK_TOKEN`` the
operator token it printed on first start; without them, the server recorded in ``<state dir>/server.json`` by a
``stitchwork up`` on this machine and its ``operator.token`` are used. This module imports only ``httpx``: the light
install (``pip install stitchwork``, no extras) reaches a remote server with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import httpx

from stitchwork.config import Config
from stitchwork.errors import AuthError, ConfigError, StitchworkError

if TYPE_CHECKING:
    from stitchwork.interfaces.cli.local import LocalClient


def server_file(config: Config) -> Path:
    return config.state_dir / "server.json"


def token_file(config: Config) -> Path:
    return config.state_dir / "operator.token"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_server(config: Config) -> str | None:
    """The URL of a live `stitchwork up` for this state dir, if any."""
    if url := os.environ.get("STITCHWORK_URL", "").strip():
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"STITCHWORK_URL must be the server's http(s)://host:port, got {url!r}")
        return url.rstrip("/")
    path = server_file(config)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or not _pid_alive(int(info.get("pid", 0))):
        return None
    return str(info.get("url")) or None


class RemoteError(StitchworkError):
    """An error the server reported."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else str(body)
        self.code = body.get("error", "error") if isinstance(body, dict) else "error"
        super().__init__(f"{message} (HTTP {status})")


class HttpClient:
    """Talks to a running control plane."""

    def __init__(self, url: str, token: str) -> None:
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise StitchworkError(f"cannot reach the platform at {self.http.base_url}: {exc}") from exc
        if response.status_code >= 400:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            if response.status_code == 401:
                raise AuthError(body.get("message", "unauthenticated") if isinstance(body, dict) else str(body))
            raise RemoteError(response.status_code, body)
        return response.json() if response.content else None

    def run(self, agent: str, task: str, model: str | None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/runs", json={"agent": agent, "task": task, "model": model,
                                                                      "wait": True})
        return result

    def get_run(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/runs/{run_id}")
        return result

    def run_calls(self, run_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", f"/v1/runs/{run_id}/calls")
        return result

    def undo(self, run_id: str, call: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/v1/runs/{run_id}/undo",
                                            json={"call": call} if call is not None else {})
        return result

    def list_runs(self, status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit, **({"status": status} if status else {})}
        result: list[dict[str, Any]] = self._call("GET", "/v1/runs", params=params)
        return result

    def approvals(self, status: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/approvals", params={"status": status})
        return result

    def decide(self, approval_id: str, approve: bool, note: str) -> dict[str, Any]:
        verb = "approve" if approve else "deny"
        result: dict[str, Any] = self._call("POST", f"/v1/approvals/{approval_id}/{verb}", json={"note": note})
        return result

    def memory_list(self, agent: str | None, namespace: str | None, limit: int) -> list[dict[str, Any]]:
        """Agents with memory (``agent`` None), or one agent's items, newest first."""
        if agent is None:
            rows: list[dict[str, Any]] = self._call("GET", "/v1/memory")
            return rows
        params: dict[str, Any] = {"limit": limit, **({"namespace": namespace} if namespace is not None else {})}
        rows = self._call("GET", f"/v1/memory/{quote(agent, safe='')}", params=params)
        return rows

    def memory_search(self, agent: str, query: str, limit: int) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET", f"/v1/memory/{quote(agent, safe='')}/search",
                                                params={"q": query, "limit": limit})
        return rows

    def memory_grant(self, owner: str, grantee: str, namespace: str, mode: Literal["read", "write"], *,
                     revoke: bool = False) -> Any:
        """Grants (or with ``revoke`` removes) ``grantee``'s ``mode`` access to ``owner``'s memory."""
        body = {"owner": owner, "grantee": grantee, "namespace": namespace, "mode": mode}
        return self._call("POST", "/v1/memory/grants/revoke" if revoke else "/v1/memory/grants", json=body)

    def memory_grants(self, owner: str | None) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = self._call("GET", "/v1/memory/grants", params={"owner": owner} if owner else {})
        return rows

    def audit_tail(self, n: int) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/audit/tail", params={"n": n})
        return result

    def audit_query(self, sql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("POST", "/v1/audit/query", json={"sql": sql})
        return result

    def audit_verify(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", "/v1/audit/verify")
        return result

    def audit_report(self, name: str, since: float | None = None, until: float | None = None) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("since", since), ("until", until)) if v is not None}
        result: list[dict[str, Any]] = self._call("GET", f"/v1/audit/reports/{name}", params=params)
        return result

    def audit_export(self, to: str, since: float | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/audit/export", json={"to": to, "since": since})
        return result

    def audit_compact(self, to: str, older_than_days: float | None = None, upto_seq: int | None = None
                      ) -> dict[str, Any]:
        body = {"to": to, "older_than_days": older_than_days, "upto_seq": upto_seq}
        result: dict[str, Any] = self._call("POST", "/v1/audit/compact", json=body)
        return result

    def data_retention(self) -> dict[str, int]:
        result: dict[str, int] = self._call("POST", "/v1/data/retention")
        return result

    def secret_set(self, name: str, value: str) -> None:
        self._call("PUT", f"/v1/secrets/{name}", json={"value": value})

    def secret_names(self) -> list[str]:
        result: list[str] = self._call("GET", "/v1/secrets")
        return result

    def secret_delete(self, name: str) -> None:
        self._call("DELETE", f"/v1/secrets/{name}")

    def session_open(self, agent: str, task: str, ttl_s: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", "/v1/sessions", json={"agent": agent, "task": task,
                                                                          "ttl_s": ttl_s})
        return result

    def session_renew(self, run_id: str, ttl_s: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/v1/sessions/{_segment(run_id)}/renew", json={"ttl_s": ttl_s})
        return result

    def session_close(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("DELETE", f"/v1/sessions/{_segment(run_id)}")
        return result

    def session_show(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/v1/sessions/{_segment(run_id)}")
        return result

    def sessions(self, include_closed: bool = False) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._call("GET", "/v1/sessions",
                                                  params={"all": str(include_closed).lower()})
        return result


def _segment(value: str) -> str:
    """``value`` quoted for a URL path (a ``?`` or ``#`` in an id stays part of the id)."""
    return quote(value, safe="")


def connect(config: Config) -> HttpClient | LocalClient:
    """An HTTP client if a server runs for this state dir (or ``STITCHWORK_URL`` names one), else a local one.

    Raises:
        ConfigError: no server, and the server side is not installed here (the light client install).
    """
    url = running_server(config)
    if url is None:
        try:
            from stitchwork.interfaces.cli.local import LocalClient
        except ImportError as exc:
            raise ConfigError(
                f"no `stitchwork up` is running for {config.state_dir} and this install cannot open the platform "
                f"itself (no module {(exc.name or '?').split('.')[0]!r}): set STITCHWORK_URL (and STITCHWORK_TOKEN) "
                "to a running server, or run: pip install 'stitchwork[server]'"
            ) from exc
        return LocalClient(config)
    token = os.environ.get("STITCHWORK_TOKEN")
    if not token:
        try:
            token = token_file(config).read_text().strip()
        except OSError as exc:
            raise AuthError(
                f"the platform runs at {url}; set STITCHWORK_TOKEN to the operator token printed by `stitchwork up`"
            ) from exc
    return HttpClient(url, token)
