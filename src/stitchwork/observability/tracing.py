"""OpenTelemetry spans for the gateway's stages and model calls, exported by OTLP when configured.

Enabled when ``[observability] otlp_endpoint`` is set, or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is, and the SDK is installed (``pip install 'stitchwork[otel]'``);
``OTEL_SDK_DISABLED=true`` turns it off, and the other ``OTEL_*`` variables (headers, service name, sampler) are
read by the SDK itself. Otherwise :meth:`Tracing.span` hands out one shared no-op span: nothing is allocated.

Spans carry names and decisions, never argument values, prompts, completions or secrets:

* ``gateway.tool_call`` (``stitchwork.tool.name``, ``stitchwork.agent``, ``stitchwork.run_id``, ``stitchwork.status``,
  ``stitchwork.decision``, ``stitchwork.policy_ids``, ``stitchwork.side_effect``) with one child per stage
  (``gateway.authenticate``, ``gateway.validate``, ``gateway.authorize``, ``gateway.approve``, ``gateway.secrets``,
  ``gateway.execute``, ``gateway.audit``);
* ``chat <model>`` for each model call, with the GenAI semantic conventions: ``gen_ai.operation.name``,
  ``gen_ai.request.model``, ``gen_ai.response.model``, ``gen_ai.usage.input_tokens``,
  ``gen_ai.usage.output_tokens``, ``gen_ai.response.finish_reasons``, plus ``stitchwork.deployment`` and the
  decision and policy ids of its admission.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

AttributeValue = str | bool | int | float | Sequence[str]


class NoSpan:
    """The span handed out while tracing is off: every method does nothing."""

    __slots__ = ()

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        """Does nothing."""

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        """Does nothing."""

    def record_error(self, exc: BaseException) -> None:
        """Does nothing."""

    def end(self) -> None:
        """Does nothing."""

    def __enter__(self) -> NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


NO_SPAN = NoSpan()


class _Span:
    """An OpenTelemetry span behind the small interface the gateway uses."""

    __slots__ = ("_span",)

    def __init__(self, span: Any) -> None:
        self._span = span

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        self._span.set_attribute(key, list(value) if isinstance(value, tuple) else value)

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def record_error(self, exc: BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("error.type", getattr(exc, "code", type(exc).__name__))
        self._span.set_status(Status(StatusCode.ERROR, type(exc).__name__))

    def end(self) -> None:
        self._span.end()


class Tracing:
    """Where spans go: nowhere (the default), or an OpenTelemetry tracer provider."""

    def __init__(self) -> None:
        self.enabled = False
        self._tracer: Any = None
        self._provider: Any = None
        self._owned = False

    def span(self, name: str, attributes: Mapping[str, AttributeValue] | None = None
             ) -> AbstractContextManager[NoSpan | _Span]:
        """A span around a block (a child of the current one); :data:`NO_SPAN` while tracing is off."""
        if not self.enabled:
            return NO_SPAN
        return self._start(name, attributes)

    def begin(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> NoSpan | _Span:
        """A span that is not made current and ends on :meth:`end` (for a stream answered across tasks)."""
        if not self.enabled:
            return NO_SPAN
        attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in (attributes or {}).items()}
        return _Span(self._tracer.start_span(name, attributes=attrs))

    @contextmanager
    def _start(self, name: str, attributes: Mapping[str, AttributeValue] | None) -> Iterator[_Span]:
        attrs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in (attributes or {}).items()}
        with self._tracer.start_as_current_span(name, attributes=attrs, record_exception=False,
                                                set_status_on_exception=False) as span:
            wrapped = _Span(span)
            try:
                yield wrapped
            except BaseException as exc:
                wrapped.record_error(exc)
                raise

    def use(self, provider: Any) -> None:
        """Sends spans to ``provider`` (an SDK ``TracerProvider``; tests pass one with an in-memory exporter)."""
        self._provider = provider
        self._owned = False
        self._tracer = provider.get_tracer("stitchwork")
        self.enabled = True

    def configure(self, otlp_endpoint: str = "", *, service_name: str = "stitchwork",
                  environ: Mapping[str, str] | None = None) -> bool:
        """Starts OTLP export if an endpoint is configured here or in ``OTEL_*``; returns whether spans are on.

        Raises:
            ConfigError: an endpoint is configured but the OpenTelemetry SDK or OTLP exporter is not installed.
        """
        env = os.environ if environ is None else environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return False
        endpoint = (otlp_endpoint or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "")
        if not endpoint or (self.enabled and self._owned):
            return self.enabled
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            from stitchwork.errors import ConfigError

            raise ConfigError("an OTLP endpoint is configured but OpenTelemetry is not installed: "
                              "pip install 'stitchwork[otel]'") from exc
        resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service_name})
        provider = TracerProvider(resource=resource)
        if otlp_endpoint and not env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            url = otlp_endpoint.rstrip("/")
            exporter = OTLPSpanExporter(endpoint=url if url.endswith("/v1/traces") else url + "/v1/traces")
        else:
            exporter = OTLPSpanExporter()  # the SDK reads OTEL_EXPORTER_OTLP_* itself
        provider.add_span_processor(BatchSpanProcessor(exporter))
        self.use(provider)
        self._owned = True
        return True

    def shutdown(self) -> None:
        """Flushes and stops a provider this module started; tracing is off afterwards."""
        if self._provider is not None and self._owned:
            self._provider.shutdown()
        self.reset()

    def reset(self) -> None:
        """Turns tracing off (without shutting a provider down)."""
        self.enabled = False
        self._tracer = None
        self._provider = None
        self._owned = False


TRACING = Tracing()
"""The process's tracing (OpenTelemetry's own provider is process-wide too)."""

__all__ = ["NO_SPAN", "TRACING", "NoSpan", "Tracing"]
