"""No input gives a 500: the OpenAPI schema fuzzed with schemathesis against the app in-process (bounded for CI;
``bench/fuzz_api.py`` runs the same for longer)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="needs pip install 'stitchwork[dev]' (schemathesis)")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from stitchwork.config import Config, DataConfig  # noqa: E402
from stitchwork.interfaces.http.app import create_app  # noqa: E402
from stitchwork.platform import Platform  # noqa: E402
from stitchwork.service import Service  # noqa: E402

EXAMPLES = int(os.environ.get("STITCHWORK_FUZZ_EXAMPLES", "6"))
"""Examples per operation: 6 in CI (about 20 s for some 35 operations here); ``bench/fuzz_api.py`` sets more."""


def fuzz_target(state: Path) -> tuple[Any, Service, str]:
    """An app on a fresh platform (no tools of its own) and its operator token."""
    config = Config(state_dir=state, data=DataConfig(audit_flush_ms=5))
    platform = Platform.open(config, role="server")
    service = Service(platform)
    token = service.create_operator_token()
    return create_app(service, expiry_interval_s=3600), service, token


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str]]:
    app, service, token = fuzz_target(tmp_path_factory.mktemp("fuzz"))
    yield app, token
    asyncio.run(service.platform.aclose())


@pytest.fixture(scope="module")
def api_schema(target: tuple[Any, str]) -> Any:
    app, _ = target
    schema = schemathesis.openapi.from_dict(app.openapi())
    schema.app = app
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize="STITCHWORK_FUZZ_SEED" not in os.environ, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_input_gives_a_server_error(case: Any, target: tuple[Any, str]) -> None:
    _, token = target
    case.call_and_validate(headers={"Authorization": f"Bearer {token}"}, checks=[not_a_server_error])
