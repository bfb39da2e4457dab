"""Routes a model name to one of its deployments: strategies, retries with backoff, cooldown, fallbacks, affinity.

Deployments are grouped by model name (several providers serving the same model). For each call the router
orders the group's healthy deployments by the strategy, puts the affinity choice first, and tries them in turn:

- ``failover``: declaration order (the first is primary);
- ``least_outstanding``: fewest requests in flight;
- ``latency``: weighted random, weight / smoothed latency (untried deployments first);
- ``cost``: cheapest per token, then fastest.

A :class:`ModelUnavailable` (429, 5xx, timeout, cut stream) counts a failure, waits an exponential backoff (or
the server's ``Retry-After``, capped) and tries the next; ``failures_to_cooldown`` failures in a row put the
deployment in cooldown for ``cooldown_s``. A :class:`ModelRejected` (bad request) is not retried. When the whole
group fails, the ``fallbacks`` of the model name are tried in order (other models, other providers).

Affinity (``prefix``): requests whose first messages are the same go to the same deployment (rendezvous hashing
over the healthy ones), so a provider's prefix (KV) cache stays warm; ``session`` uses the request's ``user``.

``router://NAME`` opens a :class:`RoutedModel`: the model gateway's router serves it during a gateway call.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

from stitchwork.compute._base import Model, ModelTurn, open_model
from stitchwork.compute._wire import StreamAssembler, turn_from_completion
from stitchwork.config import RouterConfig
from stitchwork.errors import ConfigError, ModelError, ModelRejected, ModelUnavailable

STRATEGIES = ("failover", "least_outstanding", "latency", "cost")
AFFINITIES = ("none", "prefix", "session")


@dataclass(frozen=True)
class Deployment:
    """One place serving a model.

    Attributes:
        model: The model name agents ask for (the group).
        uri: The adapter URI (``openai+https://...?profile=vllm&model=...&key=secret://name``).
        id: A short name for state and audit (default: host of the URI).
        weight: Relative share for the ``latency`` strategy.
        cost_in: USD per million prompt tokens.
        cost_out: USD per million completion tokens.
    """

    model: str
    uri: str
    id: str = ""
    weight: float = 1.0
    cost_in: float = 0.0
    cost_out: float = 0.0

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.cost_in + completion_tokens * self.cost_out) / 1_000_000


@dataclass(frozen=True)
class RouterSettings(RouterConfig):
    """How the router picks and retries: the router's keys of ``[compute]`` (:class:`RouterConfig`), checked,
    and two knobs only code sets."""

    max_backoff_s: float = 2.0
    """Longest backoff (a server's ``Retry-After`` included)."""
    affinity_chars: int = 4096
    """How much of the serialised messages forms the prefix key."""

    @classmethod
    def from_config(cls, config: RouterConfig) -> RouterSettings:
        """The router's settings from ``[compute]`` (a :class:`~stitchwork.config.ComputeConfig` is a
        :class:`RouterConfig`).

        Raises:
            ConfigError: a strategy, affinity or number out of range.
        """
        values = {f.name: getattr(config, f.name) for f in fields(RouterConfig)}
        values["fallbacks"] = {name: tuple(targets) for name, targets in config.fallbacks.items()}
        return cls(**values)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"router strategy {self.strategy!r}: expected one of {', '.join(STRATEGIES)}")
        if self.affinity not in AFFINITIES:
            raise ConfigError(f"router affinity {self.affinity!r}: expected one of {', '.join(AFFINITIES)}")
        if self.retries < 0 or self.backoff_s < 0 or self.cooldown_s < 0 or self.failures_to_cooldown < 1:
            raise ConfigError("router retries, backoff_s and cooldown_s must be >= 0, failures_to_cooldown >= 1")


@dataclass
class DeploymentState:
    """Live health of one deployment."""

    deployment: Deployment
    model: Model
    order: int
    outstanding: int = 0
    latency_s: float | None = None
    failures: int = 0
    cooldown_until: float = 0.0
    calls: int = 0
    errors: int = 0
    last_error: str = ""

    def cooling(self, now: float) -> bool:
        return self.cooldown_until > now

    def to_dict(self, now: float) -> dict[str, Any]:
        d = self.deployment
        return {
            "id": d.id, "model": d.model, "uri": _public_uri(d.uri), "healthy": not self.cooling(now),
            "cooldown_s": round(max(self.cooldown_until - now, 0.0), 3), "outstanding": self.outstanding,
            "latency_ms": None if self.latency_s is None else round(self.latency_s * 1000, 3),
            "consecutive_failures": self.failures, "calls": self.calls, "errors": self.errors,
            "last_error": self.last_error, "cost_in": d.cost_in, "cost_out": d.cost_out,
        }


def _public_uri(uri: str) -> str:
    """The URI without its query (which may name secrets)."""
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


@dataclass(frozen=True)
class Routed:
    """What a routed call produced and where."""

    completion: dict[str, Any]
    deployment: Deployment
    attempts: int


class Router:
    """Deployments grouped by model name, with health state."""

    def __init__(
        self, deployments: Sequence[Deployment], settings: RouterSettings | None = None, *,
        opener: Callable[[str], Model] = open_model, clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.settings = settings or RouterSettings()
        self.clock = clock
        self.sleep = sleep
        self.groups: dict[str, list[DeploymentState]] = {}
        seen: set[str] = set()
        for order, deployment in enumerate(deployments):
            if not deployment.model:
                raise ConfigError(f"deployment {deployment.uri!r} has no model name")
            did = deployment.id or urlsplit(deployment.uri).netloc or deployment.uri
            if did in seen:
                did = f"{did}#{order}"
            seen.add(did)
            deployment = Deployment(deployment.model, deployment.uri, did, deployment.weight, deployment.cost_in,
                                    deployment.cost_out)
            state = DeploymentState(deployment, opener(deployment.uri), order)
            self.groups.setdefault(deployment.model, []).append(state)
        for name, targets in self.settings.fallbacks.items():
            for target in targets:
                if target not in self.groups:
                    raise ConfigError(f"fallback {name!r} -> {target!r}: no deployment serves {target!r}")

    def models(self) -> list[str]:
        return sorted(self.groups)

    def __contains__(self, name: object) -> bool:
        return name in self.groups

    def state(self) -> list[dict[str, Any]]:
        """Health, cooldown and load of every deployment (for the API)."""
        now = self.clock()
        return [s.to_dict(now) for group in self.groups.values() for s in group]

    async def aclose(self) -> None:
        for group in self.groups.values():
            for state in group:
                await state.model.aclose()

    # -- ordering ---------------------------------------------------------------------------------------------

    def _affinity_key(self, request: Mapping[str, Any]) -> str:
        mode = self.settings.affinity
        if mode == "session":
            return str(request.get("user") or "")
        if mode == "prefix":
            messages = request.get("messages") or []
            text = json.dumps(list(messages)[:2], sort_keys=True, default=str)
            return text[: self.settings.affinity_chars]
        return ""

    def order(self, name: str, request: Mapping[str, Any]) -> list[DeploymentState]:
        """The deployments of ``name`` in the order they will be tried (cooling ones last)."""
        group = self.groups.get(name)
        if not group:
            raise ModelRejected(f"no deployment serves model {name!r}; known: {', '.join(self.models()) or 'none'}",
                                status=404)
        now = self.clock()
        healthy = [s for s in group if not s.cooling(now)]
        cooling = sorted((s for s in group if s.cooling(now)), key=lambda s: s.cooldown_until)
        strategy = self.settings.strategy
        if strategy == "least_outstanding":
            healthy.sort(key=lambda s: (s.outstanding, s.order))
        elif strategy == "cost":
            healthy.sort(key=lambda s: (s.deployment.cost_in + s.deployment.cost_out, s.latency_s or 0.0, s.order))
        elif strategy == "latency":
            healthy = self._latency_order(healthy)
        if len(healthy) > 1 and (key := self._affinity_key(request)):
            first = max(healthy, key=lambda s: hashlib.blake2b(f"{s.deployment.id}\0{key}".encode(),
                                                               digest_size=8).digest())
            healthy = [first, *(s for s in healthy if s is not first)]
        return healthy + cooling

    @staticmethod
    def _latency_order(states: list[DeploymentState]) -> list[DeploymentState]:
        untried = [s for s in states if s.latency_s is None]
        tried = [s for s in states if s.latency_s is not None]
        out: list[DeploymentState] = list(untried)
        while tried:
            weights = [s.deployment.weight / max(s.latency_s or 1e-6, 1e-6) for s in tried]
            pick = random.choices(range(len(tried)), weights=weights)[0]
            out.append(tried.pop(pick))
        return out

    # -- calls ------------------------------------------------------------------------------------------------

    def _succeeded(self, state: DeploymentState, started: float) -> None:
        elapsed = self.clock() - started
        state.latency_s = elapsed if state.latency_s is None else 0.8 * state.latency_s + 0.2 * elapsed
        state.failures = 0
        state.cooldown_until = 0.0

    def _failed(self, state: DeploymentState, exc: ModelError) -> None:
        state.errors += 1
        state.failures += 1
        state.last_error = str(exc)[:300]
        if state.failures >= self.settings.failures_to_cooldown:
            state.cooldown_until = self.clock() + self.settings.cooldown_s

    def _backoff(self, attempt: int, exc: ModelUnavailable) -> float:
        delay: float = min(self.settings.backoff_s * 2.0 ** attempt, self.settings.max_backoff_s)
        if exc.retry_after_s is not None:
            delay = min(max(delay, exc.retry_after_s), self.settings.max_backoff_s)
        return delay

    def _plan(self, name: str, request: Mapping[str, Any]) -> Iterator[DeploymentState]:
        """Deployments to try: the group (up to 1 + retries attempts), then each fallback group likewise."""
        for model_name in (name, *self.settings.fallbacks.get(name, ())):
            states = self.order(model_name, request)
            for attempt in range(self.settings.retries + 1):
                yield states[attempt % len(states)]

    @contextlib.contextmanager
    def _track(self, state: DeploymentState) -> Iterator[None]:
        state.outstanding += 1
        state.calls += 1
        try:
            yield
        finally:
            state.outstanding -= 1

    async def chat(self, name: str, request: Mapping[str, Any]) -> Routed:
        """One completion for model ``name``, retried and failed over as configured.

        Raises:
            ModelRejected: the request itself was refused, or no deployment serves ``name``.
            ModelUnavailable: every attempt failed.
        """
        routed: list[Routed] = []
        async for _ in self._attempts(name, request, routed, stream=False):
            pass  # an unstreamed call passes nothing on
        return routed[0]

    def chat_stream(self, name: str, request: Mapping[str, Any], routed: list[Routed]) -> AsyncIterator[
            dict[str, Any]]:
        """Streams a completion; fails over only until the first chunk has been passed on.

        The deployment used is appended to ``routed`` (with the assembled completion) once the stream ends.
        """
        return self._attempts(name, request, routed, stream=True)

    async def _attempts(self, name: str, request: Mapping[str, Any], routed: list[Routed], *,
                        stream: bool) -> AsyncIterator[dict[str, Any]]:
        """The retry loop: tries the :meth:`_plan` in turn, with backoff, until a deployment answers.

        A :class:`ModelUnavailable` counts a failure and the next deployment is tried, unless chunks of a stream
        were passed on already (then it is raised). The deployment that answered is appended to ``routed`` with
        its completion (a stream's assembled), once its stream ended.
        """
        errors: list[str] = []
        last = ModelUnavailable("")
        failures: list[ModelUnavailable] = []
        for attempt, state in enumerate(self._plan(name, request)):
            if attempt:
                await self.sleep(self._backoff(attempt - 1, last))
            started = self.clock()
            assembler = StreamAssembler()
            completion: dict[str, Any] = {}
            try:
                with self._track(state):
                    if stream:
                        async for chunk in state.model.chat_stream(request):
                            assembler.feed(chunk)
                            yield chunk
                    else:
                        completion = await state.model.chat(request)
            except ModelUnavailable as exc:
                self._failed(state, exc)
                if assembler.chunks:
                    raise
                errors.append(f"{state.deployment.id}: {exc}")
                last = exc
                failures.append(exc)
                continue
            self._succeeded(state, started)
            routed.append(Routed(assembler.completion() if stream else completion, state.deployment, attempt + 1))
            return
        # Every deployment rate-limited: still a 429, retry after the soonest; else the last failure's status.
        limited = bool(failures) and all(f.status == 429 for f in failures)
        waits = [f.retry_after_s for f in (failures if limited else failures[-1:]) if f.retry_after_s is not None]
        raise ModelUnavailable(f"model {name!r}: every deployment failed ({'; '.join(errors[-4:])})",
                               status=429 if limited else last.status, retry_after_s=min(waits) if waits else None)


_CURRENT: contextvars.ContextVar[Router | None] = contextvars.ContextVar("router", default=None)


@contextlib.contextmanager
def router_scope(router: Router | None) -> Iterator[None]:
    """Makes ``router`` serve ``router://`` models inside the block (the model gateway does this)."""
    token = _CURRENT.set(router)
    try:
        yield
    finally:
        _CURRENT.reset(token)


class RoutedModel(Model):
    """``router://NAME``: the model name ``NAME`` served by the model gateway's router."""

    def __init__(self, uri: str, **_: Any) -> None:
        self.uri = uri
        parts = urlsplit(uri)
        self.name = (parts.netloc + parts.path).strip("/")
        if not self.name:
            raise ConfigError(f"model URI {uri!r}: expected router://MODEL_NAME")

    def _router(self) -> Router:
        router = _CURRENT.get()
        if router is None:
            raise ModelError(f"{self.uri} is served by the model gateway's router; call it through the gateway")
        return router

    async def chat(self, request: Mapping[str, Any]) -> dict[str, Any]:
        return (await self._router().chat(self.name, request)).completion

    async def complete(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]]
    ) -> ModelTurn:
        request: dict[str, Any] = {"model": self.name, "messages": list(messages)}
        if tools:
            request["tools"] = list(tools)
        return turn_from_completion(await self.chat(request))


def parse_deployments(raw: Any) -> list[Deployment]:
    """``[[compute.deployments]]`` tables → deployments.

    Raises:
        ConfigError: a table is malformed.
    """
    if not isinstance(raw, list | tuple):
        raise ConfigError("compute.deployments must be a list of tables ([[compute.deployments]])")
    out: list[Deployment] = []
    known = {"model", "uri", "id", "weight", "cost_in", "cost_out"}
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ConfigError(f"compute.deployments[{i}] must be a table")
        if unknown := sorted(set(item) - known):
            raise ConfigError(f"compute.deployments[{i}]: unknown key(s) {', '.join(unknown)}")
        if not isinstance(item.get("model"), str) or not isinstance(item.get("uri"), str):
            raise ConfigError(f"compute.deployments[{i}] needs model and uri strings")
        try:
            out.append(Deployment(item["model"], item["uri"], str(item.get("id", "")), float(item.get("weight", 1)),
                                  float(item.get("cost_in", 0)), float(item.get("cost_out", 0))))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"compute.deployments[{i}]: {exc}") from exc
    return out


__all__ = ["Deployment", "DeploymentState", "Routed", "RoutedModel", "Router", "RouterSettings",
           "parse_deployments", "router_scope"]
