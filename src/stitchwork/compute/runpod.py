"""RunPod serverless: ``runpod://ENDPOINT_ID?key=secret://runpod&profile=vllm&model=NAME``.

Calls the endpoint's native queue API with the OpenAI request wrapped as worker-vllm expects
(``{"input": {"openai_route": "/v1/chat/completions", "openai_input": {...}}}``): ``POST /runsync`` and, while the
job is ``IN_QUEUE`` or ``IN_PROGRESS``, ``GET /status/{job}`` until it ends (``mode=run`` submits with ``/run``
instead). Options: ``base`` (default ``https://api.runpod.ai/v2``), ``timeout`` (seconds, default 300),
``poll_s`` (default 0.5), plus the ``openai+`` options ``profile`` and ``model``. Streaming replays the finished
answer. RunPod's OpenAI-compatible route is ``openai+https://api.runpod.ai/v2/ENDPOINT_ID/openai/v1``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from stitchwork.compute._base import ChatCompletionsModel
from stitchwork.compute.openai import OpenAICompatModel
from stitchwork.errors import ConfigError, ModelError, ModelUnavailable

_RUNNING = {"IN_QUEUE", "IN_PROGRESS"}


class RunPodModel(ChatCompletionsModel):
    """A RunPod serverless endpoint running an OpenAI-compatible worker (worker-vllm)."""

    def __init__(self, uri: str, *, http: httpx.AsyncClient | None = None, **_: Any) -> None:
        self.uri = uri
        parts = urlsplit(uri)
        self.endpoint = parts.netloc
        if not self.endpoint:
            raise ConfigError(f"model URI {uri!r}: expected runpod://ENDPOINT_ID")
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.base = options.pop("base", "https://api.runpod.ai/v2").rstrip("/") + "/" + self.endpoint
        self.mode = options.pop("mode", "runsync")
        if self.mode not in {"runsync", "run"}:
            raise ConfigError(f"model URI {uri!r}: mode must be runsync or run")
        try:
            self.deadline_s = float(options.get("timeout", 300))
            self.poll_s = float(options.pop("poll_s", 0.5))
        except ValueError as exc:
            raise ConfigError(f"model URI {uri!r}: timeout and poll_s must be numbers") from exc
        # The wire handling (profile workarounds, key reference) is the OpenAI client's.
        self.wire = OpenAICompatModel(f"openai+{self.base}/openai/v1?{urlencode(options)}", http=http)

    async def aclose(self) -> None:
        await self.wire.aclose()

    async def _send(self, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
        try:
            response = await self.wire.http.request(method, url, headers=self.wire._headers(), **kwargs)
        except httpx.HTTPError as exc:
            raise self.wire._unavailable(exc) from exc
        if response.status_code >= 400:
            raise self.wire._error(response, response.text)
        try:
            body = response.json()
        except ValueError as exc:
            raise ModelUnavailable(f"RunPod endpoint {self.endpoint} returned invalid JSON") from exc
        if not isinstance(body, dict):
            raise ModelError(f"RunPod endpoint {self.endpoint} returned {type(body).__name__}")
        return body

    async def chat(self, request: Mapping[str, Any]) -> dict[str, Any]:
        body, required = self.wire.prepare(request, stream=False)
        offered = [(t.get("function") or {}).get("name", "") for t in body.get("tools") or ()]
        payload = {"input": {"openai_route": "/v1/chat/completions", "openai_input": body}}
        job = await self._send("POST", f"{self.base}/{self.mode}", json=payload)
        deadline = time.monotonic() + self.deadline_s
        while job.get("status") in _RUNNING:
            if time.monotonic() > deadline:
                raise ModelUnavailable(f"RunPod job {job.get('id')} still {job.get('status')} after "
                                       f"{self.deadline_s:g}s")
            await asyncio.sleep(self.poll_s)
            job = await self._send("GET", f"{self.base}/status/{job.get('id')}")
        status = job.get("status")
        if status != "COMPLETED":
            error = str(job.get("error") or status)[:300]
            if status in {"FAILED", "TIMED_OUT", "CANCELLED"}:
                raise ModelUnavailable(f"RunPod job {job.get('id')} {status}: {error}")
            raise ModelError(f"RunPod job {job.get('id')} ended {status}: {error}")
        output = job.get("output")
        if isinstance(output, list) and output:
            output = output[0]
        if not isinstance(output, dict):
            raise ModelError(f"RunPod job {job.get('id')} output is not a chat completion")
        return self.wire._fix(output, offered, required)


__all__ = ["RunPodModel"]
