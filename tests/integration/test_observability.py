"""Tracing and metrics (pgoutbox.observability): the publisher's trace continues in each attempt's
span, and the Prometheus metrics count what the worker recorded in the database.

The OpenTelemetry tracer provider and the Prometheus default registry are process-global: spans
are told apart by operation type, and every test uses operation types of its own, so the
metric series it reads are its own too.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import REGISTRY, CollectorRegistry

from pgoutbox import (
    DatabaseSessionManager,
    DoNotRetry,
    HandlerContext,
    RetryPolicy,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
    observability,
    publish_many,
    publish_operation,
)
from pgoutbox.observability import OperationsGaugeRefresher, register_metrics

NO_WAIT = RetryPolicy(base_seconds=0, max_seconds=0, jitter=0)
test_tracer = trace.get_tracer("pgoutbox.tests")


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def span_exporter() -> InMemorySpanExporter:
    """An in-memory exporter on the process's SDK tracer provider (set here if none is: a
    process gets one global provider, the first one set)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        trace.set_tracer_provider(TracerProvider())
    provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "another tracer provider was set globally"
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture
def spans(span_exporter: InMemorySpanExporter) -> InMemorySpanExporter:
    span_exporter.clear()
    return span_exporter


def unique(name: str) -> str:
    """An operation type no other test uses (spans and metric series are process-global)."""
    return f"{name}.{uuid.uuid4().hex[:10]}"


def attempt_spans(exporter: InMemorySpanExporter, operation_type: str) -> list[ReadableSpan]:
    """The finished attempt spans of ``operation_type``, in attempt order."""
    name = f"pgoutbox.run {operation_type}"
    found = [span for span in exporter.get_finished_spans() if span.name == name]
    return sorted(found, key=lambda span: int(str((span.attributes or {})["pgoutbox.attempt"])))


def sample(name: str, **labels: str) -> float:
    """A sample of the default registry; 0 for a series that does not exist yet."""
    value = REGISTRY.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def publish(
    sm: DatabaseSessionManager, settings: Settings, operation_type: str, payload: Any, **kw: Any
) -> int:
    async with sm.session() as session:
        op_id = await publish_operation(
            session, operation_type, payload, settings.workflow_system.channel, **kw
        )
        await session.commit()
    return op_id


async def stored_trace_context(conn: asyncpg.Connection, schema: str, op_id: int) -> Any:
    value = await conn.fetchval(
        f'SELECT trace_context FROM "{schema}".operations WHERE id = $1', op_id
    )
    return None if value is None else json.loads(value)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.02)


async def wait_for_states(
    conn: asyncpg.Connection, schema: str, expected: dict[int, str], within: float = 10
) -> None:
    async def reached() -> bool:
        rows = await conn.fetch(
            f'SELECT id, state FROM "{schema}".operations WHERE id = ANY($1::bigint[])',
            list(expected),
        )
        return {r["id"]: r["state"] for r in rows} == expected

    await eventually(reached, f"operations in states {expected}", within)


def traceparent(span: trace.Span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


# -- tracing -----------------------------------------------------------------------------------


async def test_an_attempt_span_continues_the_trace_the_operation_was_published_in(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    spans: InMemorySpanExporter,
) -> None:
    operation_type = unique("traced.ok")
    current_in_handler: list[trace.SpanContext] = []
    router = WorkflowRouter()

    @router.on(operation_type)
    async def handler(ctx: HandlerContext, payload: Any) -> None:
        current_in_handler.append(trace.get_current_span().get_span_context())

    with test_tracer.start_as_current_span("checkout") as publisher:
        op_id = await publish(sm, settings, operation_type, {})
    schema = settings.database.schema_name
    assert await stored_trace_context(conn, schema, op_id) == {
        "traceparent": traceparent(publisher)
    }

    async with WorkflowSystem(router=router, settings=settings) as system:
        await wait_for_states(conn, schema, {op_id: "succeeded"})

    (attempt,) = attempt_spans(spans, operation_type)
    assert attempt.context is not None
    assert attempt.parent is not None
    assert attempt.context.trace_id == publisher.get_span_context().trace_id
    assert attempt.parent.span_id == publisher.get_span_context().span_id
    assert attempt.kind is SpanKind.CONSUMER
    assert dict(attempt.attributes or {}) == {
        "pgoutbox.operation_id": op_id,
        "pgoutbox.operation_type": operation_type,
        "pgoutbox.attempt": 1,
        "pgoutbox.worker_id": system.worker_id,
    }
    assert attempt.status.status_code is StatusCode.UNSET
    # The handler runs inside it: spans the handler starts are its children.
    assert [c.span_id for c in current_in_handler] == [attempt.context.span_id]


async def test_failed_attempts_are_error_spans_with_the_exception_each_a_child_of_the_publisher(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    spans: InMemorySpanExporter,
) -> None:
    flaky, fatal = unique("traced.flaky"), unique("traced.fatal")
    router = WorkflowRouter()

    @router.on(flaky, max_attempts=2, retry=NO_WAIT)
    async def always_fails(ctx: HandlerContext, payload: Any) -> None:
        raise RuntimeError(f"gateway timeout on attempt {ctx.attempt}")

    @router.on(fatal)
    async def declined(ctx: HandlerContext, payload: Any) -> None:
        raise DoNotRetry("card declined")

    with test_tracer.start_as_current_span("checkout") as publisher:
        flaky_id = await publish(sm, settings, flaky, {})
        fatal_id = await publish(sm, settings, fatal, {})
    async with WorkflowSystem(router=router, settings=settings):
        await wait_for_states(
            conn, settings.database.schema_name, {flaky_id: "dead", fatal_id: "dead"}
        )

    first, second = attempt_spans(spans, flaky)
    (declined_span,) = attempt_spans(spans, fatal)
    for span, message in [
        (first, "RuntimeError: gateway timeout on attempt 1"),
        (second, "RuntimeError: gateway timeout on attempt 2"),
        (declined_span, "DoNotRetry: card declined"),
    ]:
        assert span.parent is not None
        assert span.parent.span_id == publisher.get_span_context().span_id
        assert (span.status.status_code, span.status.description) == (StatusCode.ERROR, message)
        (event,) = span.events
        assert event.name == "exception"
        error_type, error_message = message.split(": ")
        assert event.attributes is not None
        assert str(event.attributes["exception.type"]).endswith(error_type)
        assert event.attributes["exception.message"] == error_message
    assert [(s.attributes or {})["pgoutbox.attempt"] for s in (first, second)] == [1, 2]


async def test_publishing_outside_a_span_stores_no_trace_context_and_its_attempts_start_a_trace(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    spans: InMemorySpanExporter,
) -> None:
    operation_type = unique("traced.untraced")
    router = WorkflowRouter()
    router.on(operation_type)(_noop)
    schema = settings.database.schema_name

    op_id = await publish(sm, settings, operation_type, {})
    assert await stored_trace_context(conn, schema, op_id) is None

    # Started inside a span: the worker's tasks inherit that context, and an attempt of an
    # untraced operation must still be a trace of its own, not a child of the start-up span.
    with test_tracer.start_as_current_span("deploy") as deploy:
        system = WorkflowSystem(router=router, settings=settings)
        await system.start()
    try:
        await wait_for_states(conn, schema, {op_id: "succeeded"})
    finally:
        await system.stop()

    (attempt,) = attempt_spans(spans, operation_type)
    assert attempt.parent is None
    assert attempt.context is not None
    assert attempt.context.trace_id != deploy.get_span_context().trace_id


async def test_publish_many_stores_the_publishers_trace_context_on_every_operation(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection
) -> None:
    channel = settings.workflow_system.channel
    items = [
        {"operation_type": "batch.one", "payload": {}, "channel": channel},
        {"operation_type": "batch.two", "payload": {}, "channel": channel, "idempotency_key": "k"},
    ]
    async with sm.session() as session:
        with test_tracer.start_as_current_span("import") as publisher:
            traced = await publish_many(session, items)
        untraced = await publish_many(session, [{**items[0], "payload": {"n": 2}}])
        await session.commit()

    schema = settings.database.schema_name
    for op_id in traced:
        assert await stored_trace_context(conn, schema, op_id) == {
            "traceparent": traceparent(publisher)
        }
    assert await stored_trace_context(conn, schema, untraced[0]) is None


async def test_a_trace_context_that_is_not_a_json_object_of_headers_is_ignored(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    spans: InMemorySpanExporter,
) -> None:
    operation_type = unique("traced.garbled")
    router = WorkflowRouter()
    router.on(operation_type)(_noop)
    schema = settings.database.schema_name
    garbled = ['["not", "an", "object"]', '{"traceparent": 42}', '{"traceparent": "garbage"}']
    # Set at insert, as a publisher could: the trace context cannot change afterwards.
    op_ids = [
        await conn.fetchval(
            f'INSERT INTO "{schema}".operations (operation_type, channel, payload, trace_context) '
            "VALUES ($1, $2, '{}', $3::jsonb) RETURNING id",
            operation_type,
            settings.workflow_system.channel,
            value,
        )
        for value in garbled
    ]

    async with WorkflowSystem(router=router, settings=settings):
        await wait_for_states(conn, schema, dict.fromkeys(op_ids, "succeeded"))

    found = attempt_spans(spans, operation_type)
    assert len(found) == 3
    assert all(span.parent is None for span in found)


# -- metrics -----------------------------------------------------------------------------------


async def test_the_metrics_count_each_recorded_outcome_and_time_attempts_claims_and_waits(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection
) -> None:
    ok, flaky, fatal, hopeless = (
        unique(name) for name in ("m.ok", "m.flaky", "m.fatal", "m.hopeless")
    )
    calls: dict[str, int] = dict.fromkeys((ok, flaky, fatal, hopeless), 0)
    router = WorkflowRouter(retry=NO_WAIT)

    @router.on(ok)
    async def slow_success(ctx: HandlerContext, payload: Any) -> None:
        await asyncio.sleep(0.1)

    @router.on(flaky, max_attempts=3)
    async def fails_once(ctx: HandlerContext, payload: Any) -> None:
        calls[flaky] += 1
        if calls[flaky] == 1:
            raise RuntimeError("try again")

    @router.on(fatal)
    async def declined(ctx: HandlerContext, payload: Any) -> None:
        raise DoNotRetry("card declined")

    @router.on(hopeless, max_attempts=2)
    async def always_fails(ctx: HandlerContext, payload: Any) -> None:
        raise RuntimeError("down")

    claims_before = sample("pgoutbox_claim_latency_seconds_count")
    # Due two minutes ago (by the application's clock, which is the database's here): the
    # queue age is measured by the database at the claim.
    overdue = datetime.now(UTC) - timedelta(minutes=2)
    ids = {
        ok: await publish(sm, settings, ok, {}, run_at=overdue),
        flaky: await publish(sm, settings, flaky, {}),
        fatal: await publish(sm, settings, fatal, {}),
        hopeless: await publish(sm, settings, hopeless, {}),
    }
    async with WorkflowSystem(router=router, settings=settings):
        await wait_for_states(
            conn,
            settings.database.schema_name,
            {
                ids[ok]: "succeeded",
                ids[flaky]: "succeeded",
                ids[fatal]: "dead",
                ids[hopeless]: "dead",
            },
        )

    def attempts(operation_type: str) -> dict[str, float]:
        outcomes = ("succeeded", "failed", "dead", "rejected", "released")
        counts = {
            outcome: sample(
                "pgoutbox_attempts_total", operation_type=operation_type, outcome=outcome
            )
            for outcome in outcomes
        }
        return {outcome: count for outcome, count in counts.items() if count}

    assert attempts(ok) == {"succeeded": 1}
    assert attempts(flaky) == {"failed": 1, "succeeded": 1}
    assert attempts(fatal) == {"dead": 1}
    assert attempts(hopeless) == {"failed": 1, "dead": 1}

    for operation_type, runs in [(ok, 1), (flaky, 2), (fatal, 1), (hopeless, 2)]:
        assert (
            sample("pgoutbox_attempt_duration_seconds_count", operation_type=operation_type) == runs
        )
        assert sample("pgoutbox_queue_age_seconds_count", operation_type=operation_type) == runs
    assert sample("pgoutbox_attempt_duration_seconds_sum", operation_type=ok) >= 0.1
    assert sample("pgoutbox_attempt_duration_seconds_bucket", operation_type=ok, le="0.05") == 0

    age = sample("pgoutbox_queue_age_seconds_sum", operation_type=ok)
    assert 120 <= age < 300
    assert sample("pgoutbox_queue_age_seconds_bucket", operation_type=ok, le="60.0") == 0
    assert sample("pgoutbox_queue_age_seconds_bucket", operation_type=ok, le="300.0") == 1

    assert sample("pgoutbox_claim_latency_seconds_count") > claims_before


async def test_a_late_result_is_counted_as_rejected_and_a_stopped_attempt_as_released(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection
) -> None:
    late, stuck, stuck_dead = unique("m.late"), unique("m.stuck"), unique("m.stuck_dead")
    running = {name: asyncio.Event() for name in (late, stuck, stuck_dead)}
    go_on = asyncio.Event()
    router = WorkflowRouter()

    async def blocks(ctx: HandlerContext, payload: Any) -> None:
        running[ctx.operation_type].set()
        await go_on.wait() if ctx.operation_type == late else await asyncio.sleep(60)

    router.on(late)(blocks)
    router.on(stuck)(blocks)
    router.on(stuck_dead, on_lost="dead")(blocks)
    schema = settings.database.schema_name
    system = WorkflowSystem(
        router=router,
        settings=settings.model_copy(
            update={
                "workflow_system": settings.workflow_system.model_copy(
                    update={"shutdown_timeout_seconds": 0.5}
                )
            }
        ),
    )
    await system.start()
    try:
        late_id = await publish(sm, settings, late, {})
        stuck_id = await publish(sm, settings, stuck, {})
        stuck_dead_id = await publish(sm, settings, stuck_dead, {})
        for event in running.values():
            await asyncio.wait_for(event.wait(), 10)
        # What the rescuer does to an expired lease, behind the running handler's back.
        await conn.execute(
            f"""UPDATE "{schema}".operations
                SET state = 'failed', transition = 'lose', transition_actor = 'other-worker',
                    version = version + 1, lease_owner = NULL, lease_expires_at = NULL,
                    run_at = now() + interval '1 hour'
                WHERE id = $1""",
            late_id,
        )
        go_on.set()

        async def late_result_rejected() -> bool:
            triggers = await conn.fetch(
                f'SELECT trigger FROM "{schema}".audit_log WHERE operation_id = $1', late_id
            )
            return "reject" in [r["trigger"] for r in triggers]

        await eventually(late_result_rejected, "the late success is audited as rejected")
    finally:
        await system.stop()
    await wait_for_states(conn, schema, {stuck_id: "pending", stuck_dead_id: "dead"})

    assert sample("pgoutbox_attempts_total", operation_type=late, outcome="rejected") == 1
    assert sample("pgoutbox_attempts_total", operation_type=late, outcome="succeeded") == 0
    assert sample("pgoutbox_attempts_total", operation_type=stuck, outcome="released") == 1
    assert sample("pgoutbox_attempts_total", operation_type=stuck_dead, outcome="dead") == 1


async def test_the_operations_gauge_counts_operations_by_state_and_type_and_zeroes_the_gone(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection
) -> None:
    done, waiting = unique("g.done"), unique("g.waiting")
    for _ in range(2):
        await publish(sm, settings, done, {})
    await publish(sm, settings, waiting, {})
    refresher = OperationsGaugeRefresher(settings.database, interval=0.05)

    def gauge(state: str, operation_type: str) -> float | None:
        return REGISTRY.get_sample_value(
            "pgoutbox_operations", {"state": state, "operation_type": operation_type}
        )

    counted = await refresher.run_once()
    assert (counted.series, counted.operations) == (2, 3)  # the schema is the test's own
    assert (gauge("pending", done), gauge("pending", waiting)) == (2, 1)

    router = WorkflowRouter()
    router.on(done)(_noop)
    async with WorkflowSystem(router=router, settings=settings):
        await wait_for_states(
            conn,
            settings.database.schema_name,
            {
                r["id"]: "succeeded"
                for r in await conn.fetch(
                    f'SELECT id FROM "{settings.database.schema_name}".operations '
                    "WHERE operation_type = $1",
                    done,
                )
            },
        )

    # The background loop picks the change up; a pair with no operations left reads 0.
    refresher.start()
    try:

        async def refreshed() -> bool:
            return gauge("succeeded", done) == 2

        await eventually(refreshed, "the gauge is refreshed in the background")
    finally:
        await refresher.stop()
    assert (gauge("pending", done), gauge("pending", waiting)) == (0, 1)


def test_the_metrics_can_also_be_exposed_on_a_registry_of_ones_own() -> None:
    registry = CollectorRegistry()
    register_metrics(registry)
    operation_type = unique("m.own_registry")
    assert observability.metrics is not None
    observability.metrics.count_attempt(operation_type, "succeeded")
    labels = {"operation_type": operation_type, "outcome": "succeeded"}
    assert registry.get_sample_value("pgoutbox_attempts_total", labels) == 1
    assert REGISTRY.get_sample_value("pgoutbox_attempts_total", labels) == 1


def test_an_operations_gauge_refresher_needs_a_positive_interval(settings: Settings) -> None:
    with pytest.raises(ValueError, match=r"invalid interval 0"):
        OperationsGaugeRefresher(settings.database, interval=0)


# -- without the extras --------------------------------------------------------------------------


async def test_without_the_extras_operations_run_with_no_trace_context_spans_or_metrics(
    settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What the modules look like when the imports of opentelemetry and prometheus_client fail.
    monkeypatch.setattr(observability, "tracer", None)
    monkeypatch.setattr(observability, "metrics", None)
    ok, failing = unique("plain.ok"), unique("plain.failing")
    router = WorkflowRouter()
    router.on(ok)(_noop)

    @router.on(failing)
    async def declined(ctx: HandlerContext, payload: Any) -> None:
        raise DoNotRetry("no")

    schema = settings.database.schema_name
    with test_tracer.start_as_current_span("checkout"):
        assert observability.capture_trace_context() is None
        ok_id = await publish(sm, settings, ok, {})
        failing_id = await publish(sm, settings, failing, {})
    assert await stored_trace_context(conn, schema, ok_id) is None

    async with WorkflowSystem(router=router, settings=settings):
        await wait_for_states(conn, schema, {ok_id: "succeeded", failing_id: "dead"})

    assert attempt_spans(spans, ok) == attempt_spans(spans, failing) == []
    for operation_type in (ok, failing):
        for outcome in ("succeeded", "dead"):
            assert (
                REGISTRY.get_sample_value(
                    "pgoutbox_attempts_total",
                    {"operation_type": operation_type, "outcome": outcome},
                )
                is None
            )
    with pytest.raises(RuntimeError, match=r"pip install 'pgoutbox\[prometheus\]'"):
        OperationsGaugeRefresher(settings.database)
    with observability.attempt_span(_Attempt(), "worker") as span:
        assert span is None


class _Attempt:
    id = 1
    operation_type = "t"
    attempt = 1
    trace_context = None


async def _noop(ctx: HandlerContext, payload: Any) -> None:
    pass


async def test_an_attempt_whose_worker_was_lost_is_counted_by_the_rescuing_worker(
    settings: Settings, sm: DatabaseSessionManager, conn: asyncpg.Connection
) -> None:
    from pgoutbox.db import create_pool
    from pgoutbox.sql import queries
    from pgoutbox.worker.services import Rescuer

    crashed = unique("m.crashed")
    router = WorkflowRouter()
    router.on(crashed)(_noop_handler)
    schema = settings.database.schema_name
    op_id = await publish(sm, settings, crashed, {})
    # Claimed by a worker that then died: its lease is already over.
    await conn.execute(
        f"""UPDATE "{schema}".operations
            SET state = 'claimed', transition = 'claim', transition_actor = 'dead-worker',
                attempts = attempts + 1, step_attempts = step_attempts + 1,
                version = version + 1, lease_owner = 'dead-worker',
                lease_expires_at = now() - interval '1 second'
            WHERE id = $1""",
        op_id,
    )
    pool = await create_pool(settings.database, max_size=2)
    try:
        rescuer = Rescuer(
            pool,
            queries(schema),
            "rescuer",
            settings.workflow_system.channel,
            router.handlers(),
            interval=3600,
        )
        result = await rescuer.run_once()
    finally:
        await pool.close()

    assert (result.retried, result.dead) == (1, 0)
    assert sample("pgoutbox_attempts_total", operation_type=crashed, outcome="lost") == 1


async def _noop_handler(ctx: HandlerContext, payload: Any) -> None:
    pass
