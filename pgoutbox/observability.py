"""Tracing and metrics, each switched on by installing its extra and off (at no cost) without it.

- ``pgoutbox[otel]`` (opentelemetry-api): :func:`publish_operation` stores the publisher's W3C
  trace context on the operation (:func:`capture_trace_context`), and every attempt runs in a
  ``pgoutbox.run <operation_type>`` span that continues that trace (:func:`attempt_span`).
- ``pgoutbox[prometheus]`` (prometheus-client): the dispatcher counts attempt outcomes and
  observes attempt duration, claim latency and queue age on the default registry
  (:data:`metrics`); :class:`OperationsGaugeRefresher` keeps a gauge of operations per state and
  type, when you run one.

Without the extra, :data:`tracer` (or :data:`metrics`) is ``None`` and the dispatcher skips all of
it after one attribute check. Usage and the full list of names: docs/observability.md.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import asyncpg

from pgoutbox.service import Service
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import queries

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer
    from prometheus_client import CollectorRegistry
    from prometheus_client.registry import Collector

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - exercised where the otel extra is not installed
    _otel_installed = False
else:
    _otel_installed = True

try:
    import prometheus_client
    from prometheus_client.metrics_core import HistogramMetricFamily
    from prometheus_client.utils import floatToGoString
except ImportError:  # pragma: no cover - exercised where the prometheus extra is not installed
    _prometheus_installed = False
else:
    _prometheus_installed = True

log = logging.getLogger("pgoutbox.observability")

AttemptOutcome = Literal[
    "succeeded", "failed", "dead", "rejected", "released", "lost", "snoozed", "cancelled"
]

INSTALL_PROMETHEUS: Final = "pip install 'pgoutbox[prometheus]'"


class Attempt(Protocol):
    """What :func:`attempt_span` needs to know of a claimed operation."""

    @property
    def id(self) -> int: ...
    @property
    def operation_type(self) -> str: ...
    @property
    def attempt(self) -> int: ...
    @property
    def trace_context(self) -> str | None: ...


# -- tracing -----------------------------------------------------------------------------------

# The tracer pgoutbox's spans come from; None without opentelemetry-api. Obtained once: before an
# SDK is configured it is a proxy that follows the provider set later.
tracer: Tracer | None = trace.get_tracer("pgoutbox") if _otel_installed else None

_NO_SPAN: Final[AbstractContextManager[None]] = contextlib.nullcontext()
_EMPTY_CARRIER: Final[Mapping[str, str]] = {}  # read only: extract() never writes to it


def capture_trace_context() -> str | None:
    """The current trace context as a JSON object of W3C headers (``traceparent``, and
    ``tracestate`` / ``baggage`` when set), or ``None`` without opentelemetry or an active span.

    :func:`~pgoutbox.publish_operation` and :func:`~pgoutbox.publish_many` store it in
    ``operations.trace_context``.
    """
    if tracer is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # the global propagator: W3C trace context and baggage by default
    return json.dumps(carrier, sort_keys=True, separators=(",", ":")) if carrier else None


def attempt_span(attempt: Attempt, worker_id: str) -> AbstractContextManager[Span | None]:
    """A context manager running one attempt in its span: ``pgoutbox.run <operation_type>``,
    kind CONSUMER, a child of the publisher's span (a new trace if it was published outside
    one), and the current span while the handler runs, so the handler's own spans nest in it.

    An exception leaving the block is recorded and sets the status to ERROR; failures the
    caller catches itself are reported with :func:`record_attempt_failure`. Without
    opentelemetry this is a shared no-op that yields ``None``.
    """
    if tracer is None or not _tracing_configured():
        return _NO_SPAN
    return _attempt_span(tracer, attempt, worker_id)


def tracing_active() -> bool:
    """Whether attempts get spans: opentelemetry is installed and a real tracer provider is
    set. The worker asks once per claimed batch, so a provider set after it started applies
    from its next claim."""
    return tracer is not None and _tracing_configured()


def _tracing_configured() -> bool:
    """Whether an SDK (or any real) tracer provider is set. Until one is, every span would be
    the API's invalid no-op span, which carries no context to a handler either: skipping it
    saves most of what an attempt costs the worker."""
    provider = trace.get_tracer_provider()
    return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


@contextlib.contextmanager
def _attempt_span(tracer: Tracer, attempt: Attempt, worker_id: str) -> Iterator[Span]:
    # Always an explicit parent context: the work loop's task inherited whatever context was
    # current when the worker started, and an attempt must not nest under that.
    parent = propagate.extract(_carrier(attempt.trace_context))
    with tracer.start_as_current_span(
        f"pgoutbox.run {attempt.operation_type}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={
            "pgoutbox.operation_id": attempt.id,
            "pgoutbox.operation_type": attempt.operation_type,
            "pgoutbox.attempt": attempt.attempt,
            "pgoutbox.worker_id": worker_id,
        },
        # Recorded below instead, BaseException included: OpenTelemetry skips those, and a
        # cancelled attempt did not succeed.
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            record_attempt_failure(span, exc)
            raise


def record_attempt_failure(
    span: Span | None, error: BaseException | None, description: str | None = None
) -> None:
    """Mark the attempt's span failed: record ``error`` (if any) and set the status to ERROR
    with ``description`` (by default the error's type and message)."""
    if span is None:
        return
    if error is not None:
        span.record_exception(error)
        description = description or f"{type(error).__name__}: {error}"
    span.set_status(Status(StatusCode.ERROR, description))


def _carrier(trace_context: str | None) -> Mapping[str, str]:
    """The stored headers, ignoring anything that is not a JSON object of strings: a broken
    trace context must never fail the attempt it belongs to."""
    if not trace_context:
        return _EMPTY_CARRIER
    try:
        parsed = json.loads(trace_context)
    except ValueError:
        return _EMPTY_CARRIER
    if not isinstance(parsed, dict):
        return _EMPTY_CARRIER
    return {k: v for k, v in parsed.items() if isinstance(k, str) and isinstance(v, str)}


# -- metrics -----------------------------------------------------------------------------------

# Buckets in seconds. Handlers call external APIs (up to minutes); a claim is one statement
# (milliseconds); an operation may wait from milliseconds to hours before it is claimed.
ATTEMPT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
CLAIM_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
QUEUE_AGE_BUCKETS: Final = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400)


class Histogram:
    """A Prometheus histogram with labels, observed cheaply on the worker's hot path.

    ``prometheus_client.Histogram`` takes two locks and searches its buckets one by one for
    every observation; with two observations per operation that was most of what metrics cost
    a worker (switching metrics off saved it 5-15 us of its 35-42 us of CPU per no-op
    operation on the benchmark machine). Here an observation is a
    binary search and two additions under one lock, and :meth:`observe_many` takes a claimed
    batch under one lock. Exported through ``collect()`` (a custom collector), under the same
    name, labels and buckets as prometheus_client's own, without its ``_created`` series.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
        registry: CollectorRegistry | None,
    ) -> None:
        self._name, self._documentation = name, documentation
        self._labelnames = tuple(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        self._les = [*map(floatToGoString, self._bounds), "+Inf"]
        self._lock = threading.Lock()
        # per label values: [count per bucket (the last one: above every bound)..., sum]
        self._series: dict[tuple[str, ...], list[float]] = {}
        if registry is not None:
            registry.register(self)

    def observe(self, value: float, *labels: str) -> None:
        """One observation of the series with these label values."""
        # observe_many((value,), ...) would do, but it is called per attempt: the extra call
        # and tuple cost 0.4 us, a third of the observation.
        with self._lock:
            series = self._series.get(labels) or self._new(labels)
            series[bisect.bisect_left(self._bounds, value)] += 1
            series[-1] += value

    def observe_many(self, values: Iterable[float], *labels: str) -> None:
        """Several observations of one series, under one lock."""
        bounds = self._bounds
        with self._lock:
            series = self._series.get(labels) or self._new(labels)
            for value in values:
                series[bisect.bisect_left(bounds, value)] += 1
                series[-1] += value

    def _new(self, labels: tuple[str, ...]) -> list[float]:
        if len(labels) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {labels}")
        series = self._series[labels] = [0.0] * (len(self._bounds) + 2)
        return series

    def describe(self) -> list[HistogramMetricFamily]:
        """The metric without samples (for the registry's duplicate-name check)."""
        return [self._family()]

    def collect(self) -> list[HistogramMetricFamily]:
        """The metric with a sample per bucket, count and sum of every series."""
        family = self._family()
        with self._lock:
            snapshot = [(labels, list(series)) for labels, series in self._series.items()]
        for labels, series in snapshot:
            cumulative, running = [], 0.0
            for le, count in zip(self._les, series[:-1], strict=True):
                running += count
                cumulative.append((le, running))
            family.add_metric(list(labels), cumulative, series[-1])
        return [family]

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)


class Metrics:
    """pgoutbox's Prometheus metrics (one instance, :data:`metrics`, on the default registry)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        pc = prometheus_client
        self.attempts = pc.Counter(
            "pgoutbox_attempts",
            "Attempts whose outcome this worker recorded, by operation type and outcome "
            "(succeeded, failed, dead, rejected, released, snoozed, cancelled; lost: rescued by "
            "this worker after another worker's lease expired).",
            ["operation_type", "outcome"],
            registry=registry,
        )
        self.attempt_duration = Histogram(
            "pgoutbox_attempt_duration_seconds",
            "How long attempts ran (the handler, and the commit of a transactional one).",
            ["operation_type"],
            ATTEMPT_BUCKETS,
            registry,
        )
        self.claim_latency = Histogram(
            "pgoutbox_claim_latency_seconds",
            "How long one claim statement took (locking, leasing and returning a batch).",
            [],
            CLAIM_BUCKETS,
            registry,
        )
        self.queue_age = Histogram(
            "pgoutbox_queue_age_seconds",
            "How long an operation had been due when it was claimed (database time).",
            ["operation_type"],
            QUEUE_AGE_BUCKETS,
            registry,
        )
        self.operations = pc.Gauge(
            "pgoutbox_operations",
            "Operations by state and type, as of the last OperationsGaugeRefresher round.",
            ["state", "operation_type"],
            registry=registry,
        )
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def collectors(self) -> tuple[Collector, ...]:
        """Every metric, for registering them on another registry."""
        return (
            self.attempts,
            self.attempt_duration,
            self.claim_latency,
            self.queue_age,
            self.operations,
        )

    def observe_claim(self, seconds: float, claimed: Iterable[Mapping[str, Any]]) -> None:
        """One claim statement took ``seconds``; ``claimed`` are its rows."""
        self.claim_latency.observe(seconds)
        ages: dict[str, list[float]] = {}
        for row in claimed:
            ages.setdefault(row["operation_type"], []).append(row["queue_age_seconds"])
        for operation_type, values in ages.items():
            self.queue_age.observe_many(values, operation_type)

    def observe_attempt(self, operation_type: str, seconds: float) -> None:
        """An attempt of ``operation_type`` ran for ``seconds``."""
        self.attempt_duration.observe(seconds, operation_type)

    def count_attempt(self, operation_type: str, outcome: AttemptOutcome, n: int = 1) -> None:
        """``n`` attempts' outcomes were committed."""
        self._child(self.attempts, operation_type, outcome).inc(n)

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: ``labels()`` validates and locks on
        every call, a few microseconds per operation on the worker's hot path. pgoutbox never
        removes a labelled child, so the one first returned stays the one exported."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child


# The metrics the dispatcher updates; None without prometheus-client.
metrics: Metrics | None = Metrics(prometheus_client.REGISTRY) if _prometheus_installed else None


def register_metrics(registry: CollectorRegistry) -> None:
    """Also expose pgoutbox's metrics on ``registry`` (they are always on the default one).

    Usage::

        registry = prometheus_client.CollectorRegistry()
        register_metrics(registry)
        prometheus_client.start_http_server(9464, registry=registry)
    """
    if metrics is None:
        raise RuntimeError(f"prometheus-client is not installed: {INSTALL_PROMETHEUS}")
    for collector in metrics.collectors():
        registry.register(collector)


@dataclass(frozen=True)
class OperationCounts:
    """One refresh of the gauge: how many (state, type) series it set, and the operations they
    add up to."""

    series: int
    operations: int


class OperationsGaugeRefresher(Service):
    """Keeps ``pgoutbox_operations{state, operation_type}`` up to date: every ``interval``
    seconds, counts the operations of the schema in ``settings`` by state and type.

    Usage::

        refresher = OperationsGaugeRefresher(settings.database, interval=30)
        refresher.start()          # in a running event loop
        ...
        await refresher.stop()

    The count scans the whole operations table, so run one per database (in the process that
    serves ``/metrics`` for it), not one per worker. A (state, type) pair that no longer has
    operations is set to 0, not dropped. Like the worker's services, :meth:`run_once` does one
    round and is what tests call.
    """

    name = "operations-gauge"

    def __init__(self, settings: DatabaseSettings, interval: float = 30.0) -> None:
        if metrics is None:
            raise RuntimeError(f"prometheus-client is not installed: {INSTALL_PROMETHEUS}")
        if not interval > 0:
            raise ValueError(f"invalid interval {interval!r}: a number of seconds > 0")
        super().__init__(interval)
        self._settings = settings
        self._query = queries(settings.schema_name)["operations_admin_stats"]  # `pgoutbox stats`'s
        self._seen: set[tuple[str, str]] = set()

    async def run_once(self) -> OperationCounts:
        """Count the operations now and set the gauge."""
        conn = await asyncpg.connect(**self._settings.connect_kwargs())
        try:
            rows = await self._query.fetch(conn)
        finally:
            await conn.close()
        counts = {(row["state"], row["operation_type"]): row["operations"] for row in rows}
        if metrics is not None:
            for labels in self._seen - counts.keys():
                metrics.operations.labels(*labels).set(0)
            for labels, count in counts.items():
                metrics.operations.labels(*labels).set(count)
        self._seen |= counts.keys()
        return OperationCounts(series=len(counts), operations=sum(counts.values()))
