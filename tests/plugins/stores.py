"""The store under test: every adapter this host runs, or the ones named with ``--store=URI``.

``memory://`` and ``duckdb:///…`` always run; ``chdb:///…`` when the ``chdb`` package is installed (one data
directory per test session, one database per test); ``clickhouse://…`` when ``STITCHWORK_TEST_CLICKHOUSE`` names a
reachable server (``clickhouse://host:8123``), each test in its own database, dropped afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from stitchwork.data._base import Store, open_store

ADAPTERS = ("memory", "duckdb", "chdb", "clickhouse")
CLICKHOUSE_ENV = "STITCHWORK_TEST_CLICKHOUSE"

StoreFactory = Callable[[], Store]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_backend" in metafunc.fixturenames:
        chosen = metafunc.config.getoption("--store") or list(ADAPTERS)
        metafunc.parametrize("store_backend", chosen, ids=[urlsplit(c).scheme or c for c in chosen])


@pytest.fixture(scope="session")
def chdb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chdb")


def _unique_db() -> str:
    return "t_" + uuid.uuid4().hex[:12]


@pytest.fixture
def store_uri(store_backend: str, tmp_path: Path, chdb_dir: Path) -> Iterator[str]:
    """A fresh, empty store URI for ``store_backend`` (an adapter name or a URI given with ``--store``)."""
    scheme = urlsplit(store_backend).scheme if "://" in store_backend else store_backend
    if scheme in ("chdb", "clickhouse"):
        missing = "chdb" if scheme == "chdb" else "clickhouse_connect"
        if importlib.util.find_spec(missing) is None:
            pytest.skip(f"{scheme}:// needs the {missing} package (pip install 'stitchwork[{scheme}]')")
    if "://" in store_backend:
        parts = urlsplit(store_backend)
        if scheme == "chdb":
            yield f"chdb://{parts.netloc}{parts.path}?database={_unique_db()}"
        elif scheme == "clickhouse":
            yield from _clickhouse(f"clickhouse://{parts.netloc}")
        else:
            yield store_backend
        return
    if store_backend == "memory":
        yield "memory://"
    elif store_backend == "duckdb":
        yield f"duckdb://{tmp_path / 'store.duckdb'}"
    elif store_backend == "chdb":
        yield f"chdb://{chdb_dir}?database={_unique_db()}"
    elif store_backend == "clickhouse":
        server = os.environ.get(CLICKHOUSE_ENV, "")
        if not server:
            pytest.skip(f"no ClickHouse server: set {CLICKHOUSE_ENV}=clickhouse://host:8123 to run this contract test "
                        "(Debian's clickhouse-server 18.16 is too old for clickhouse-connect)")
        yield from _clickhouse(server.rstrip("/"))
    else:
        raise pytest.UsageError(f"unknown store store_backend {store_backend!r}")


def _clickhouse(base: str) -> Iterator[str]:
    parts = urlsplit(base)
    uri = f"clickhouse://{parts.netloc}/{_unique_db()}"
    yield uri
    import clickhouse_connect

    client = clickhouse_connect.get_client(host=parts.hostname, port=parts.port or 8123,
                                           username=parts.username or "default", password=parts.password or "")
    client.command(f"DROP DATABASE IF EXISTS `{urlsplit(uri).path.strip('/')}`")
    client.close()


@pytest.fixture
def make_store(store_uri: str) -> Iterator[StoreFactory]:
    """Opens the store (again: a reopen sees the same data, except for ``memory://`` which is one instance)."""
    opened: list[Store] = []
    memory: list[Store] = []

    def factory() -> Store:
        if store_uri.startswith("memory"):
            if not memory:
                memory.append(open_store(store_uri))
            return _Unclosable(memory[0])
        store = open_store(store_uri)
        opened.append(store)
        return store

    yield factory
    for store in opened + memory:
        store.close()


class _Unclosable(Store):
    """The one memory:// instance, kept open across "reopens"."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.uri = inner.uri

    def execute(self, sql: str, params: object = ()) -> None:  # type: ignore[override]
        self.inner.execute(sql, params)  # type: ignore[arg-type]

    def append(self, table: str, rows: object) -> None:  # type: ignore[override]
        self.inner.append(table, rows)  # type: ignore[arg-type]

    def query(self, sql: str, params: object = ()) -> list[dict[str, object]]:  # type: ignore[override]
        return self.inner.query(sql, params)  # type: ignore[arg-type]

    def ensure(self, table: object) -> None:  # type: ignore[override]
        self.inner.ensure(table)  # type: ignore[arg-type]

    def query_readonly(self, sql: str, params: object = (), **limits: object) -> list[dict[str, object]]:  # type: ignore[override]
        return self.inner.query_readonly(sql, params, **limits)  # type: ignore[arg-type]

    def close(self) -> None:
        pass


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store()
