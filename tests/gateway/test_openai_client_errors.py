"""The official ``openai`` client against the model gateway: every refusal arrives as the exception class the client
maps from the status (unknown model, bad token, policy, malformed request, upstream failures), with a message."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from stitchwork.config import ComputeConfig, Config, DataConfig, IsolationConfig, MessagingConfig
from stitchwork.interfaces.http.app import create_app
from stitchwork.platform import BUILTIN_TOOLS, Platform
from stitchwork.service import Service
from tests.fakes.openai_server import FakeOpenAIServer, Fault

openai = pytest.importorskip("openai")
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def gateway(fake: Callable[..., Any], tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    upstream: FakeOpenAIServer = await fake("generic")
    config = Config(state_dir=tmp_path / "state", tool_dirs=(str(BUILTIN_TOOLS),),
                    isolation=IsolationConfig(default="inline://", allow_inline=True),
                    data=DataConfig(audit_flush_ms=5),
                    messaging=MessagingConfig(bus="memory://"),
                    compute=ComputeConfig(retries=0, deployments=[
                        {"model": "m", "uri": upstream.uri()}, {"model": "secret", "uri": upstream.uri()}],
                        agents={"*": {"models": ["m"]}}))
    platform = Platform.open(config, role="server")
    app = create_app(Service(platform))
    token = platform.tokens.issue("assistant", "run-1")

    def client(key: str = token) -> Any:
        return openai.AsyncOpenAI(base_url="http://sw/v1", api_key=key, max_retries=0,
                                  http_client=httpx.AsyncClient(transport=httpx.ASGITransport(app=app)))

    try:
        yield {"client": client, "upstream": upstream}
    finally:
        await platform.aclose()


async def test_unknown_model_is_not_found(gateway: dict[str, Any]) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        await gateway["client"]().chat.completions.create(model="gpt-9", messages=USER)
    assert "unknown model 'gpt-9'" in raised.value.message and "m" in raised.value.message


async def test_a_bad_token_is_an_authentication_error(gateway: dict[str, Any]) -> None:
    with pytest.raises(openai.AuthenticationError):
        await gateway["client"]("not-a-token").chat.completions.create(model="m", messages=USER)


async def test_a_model_policy_forbids_is_permission_denied(gateway: dict[str, Any]) -> None:
    with pytest.raises(openai.PermissionDeniedError) as raised:
        await gateway["client"]().chat.completions.create(model="secret", messages=USER)
    assert raised.value.body["policy_ids"] == ["model-not-allowed"]


async def test_a_malformed_request_is_a_bad_request(gateway: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError):
        await gateway["client"]().chat.completions.create(model="m", messages=[{"role": "tool", "content": 3}])


@pytest.mark.parametrize("status,error", [(429, "RateLimitError"), (500, "InternalServerError"),
                                          (503, "InternalServerError")])
async def test_upstream_failures_keep_their_meaning(status: int, error: str, gateway: dict[str, Any]) -> None:
    gateway["upstream"].inject(Fault("status", status=status, retry_after_s=7), times=3)
    with pytest.raises(getattr(openai, error)) as raised:
        await gateway["client"]().chat.completions.create(model="m", messages=USER)
    assert raised.value.response.headers.get("retry-after") == "7"


async def test_upstream_context_length_is_a_bad_request(gateway: dict[str, Any]) -> None:
    upstream = gateway["upstream"]
    original = upstream._check

    def too_long(body: Any) -> Any:
        from tests.fakes.openai_server import _error

        return _error(400, "This model's maximum context length is 8 tokens.") if body else original(body)

    upstream._check = too_long
    with pytest.raises(openai.BadRequestError) as raised:
        await gateway["client"]().chat.completions.create(model="m", messages=USER)
    assert raised.value.code == "context_length_exceeded"
