"""Recording outcomes when the recording's connection dies: the dispatcher's retry, against a
real PostgreSQL with real faults.

Two injections, both on the server:

- **Killed before commit.** A test-only row trigger on the test schema's ``operations``
  (``BEFORE UPDATE ... WHEN (NEW.transition = ...)``, named ``a_fault_*`` so that it runs before
  pgoutbox's own audit trigger clears ``NEW.transition``) runs
  ``pg_terminate_backend(pg_backend_pid())`` the first time it fires. The worker's pooled
  backend exits mid-statement (FATAL 57P01), its transaction is rolled back, and asyncpg raises
  a connection error that ``Dispatcher._flush_locked`` retries.

  "The first time" is counted by a *sequence*, not a flag row: a flag row flipped by the same
  function is rolled back with the killed transaction, so it would read "not yet" on every retry
  and kill each one (checked by hand: the row stays unflipped). ``nextval`` and ``setval`` are
  not transactional, so the sequence counts every firing -- the killed one included -- and a
  second one keeps the killed backend's pid.

- **Reply lost after commit.** The worker connects through a small TCP proxy, which reaches
  the server over TCP or, when the settings name a socket directory (as the embedded server's
  do), over its Unix socket. A trigger raises a marker NOTICE the first time it fires; from
  that message on the proxy forwards nothing of that connection, reads on until the server's
  ReadyForQuery (the statement's implicit transaction has committed) and then closes it. The
  worker sees the connection drop although its statement committed: the case
  ``Dispatcher._recorded_before`` is there for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest

from pgoutbox import (
    DatabaseSessionManager,
    HandlerContext,
    RetryPolicy,
    Settings,
    WorkflowRouter,
    WorkflowSystem,
    publish_operation,
)
from pgoutbox.audit import verify_chains

WITHIN = 15.0  # seconds any awaited database condition may take
# A failed attempt waits an hour for its retry: it stays `failed` for the test to look at.
NO_RETRY_SOON = RetryPolicy(base_seconds=3600, max_seconds=3600, jitter=0)
DROP_MARKER = "pgoutbox-fault: drop the reply"
KILLED_BY_SERVER = "terminating connection due to administrator command"


# -- fault injection ---------------------------------------------------------------------------


@dataclass
class Fault:
    """One test-only trigger on ``<schema>.operations`` and the sequences that count it."""

    conn: asyncpg.Connection
    schema: str

    async def shots(self) -> int:
        """How many times the trigger fired (killed or rolled back firings included)."""
        row = await self.conn.fetchrow(
            f'SELECT last_value, is_called FROM "{self.schema}".fault_shots'
        )
        assert row is not None
        return int(row["last_value"]) if row["is_called"] else 0

    async def killed_pid(self) -> int | None:
        """The backend the fault hit (killed, or cut off by the proxy), once it fired."""
        row = await self.conn.fetchrow(
            f'SELECT last_value, is_called FROM "{self.schema}".fault_killed_pid'
        )
        assert row is not None
        return int(row["last_value"]) if row["is_called"] else None


async def _install(conn: asyncpg.Connection, schema: str, when: str, action: str) -> Fault:
    s = f'"{schema}"'
    await conn.execute(
        f"""
        CREATE SEQUENCE {s}.fault_shots;
        CREATE SEQUENCE {s}.fault_killed_pid;
        CREATE FUNCTION {s}.fault_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('{s}.fault_shots') = 1 THEN
                {action}
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER a_fault_once BEFORE UPDATE ON {s}.operations
            FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION {s}.fault_once();
        """
    )
    return Fault(conn, schema)


async def kill_once(conn: asyncpg.Connection, schema: str, when: str) -> Fault:
    """The first UPDATE of an operation row matching ``when`` kills its own backend."""
    action = (
        f"PERFORM setval('\"{schema}\".fault_killed_pid', pg_backend_pid()); "
        "PERFORM pg_terminate_backend(pg_backend_pid());"
    )
    return await _install(conn, schema, when, action)


async def drop_reply_once(conn: asyncpg.Connection, schema: str, when: str) -> Fault:
    """The first UPDATE of an operation row matching ``when`` tells the proxy (by a NOTICE) to
    swallow the rest of that statement's reply, commit included, and cut the connection."""
    action = f"PERFORM setval('\"{schema}\".fault_killed_pid', pg_backend_pid()); "
    action += f"RAISE NOTICE '{DROP_MARKER}';"
    return await _install(conn, schema, when, action)


@dataclass
class ReplyDropper:
    """A TCP proxy to PostgreSQL that cuts a connection once the server sends DROP_MARKER,
    after letting the server finish (and commit) what it was doing.

    ``host`` is the server's, as libpq takes it: a name or address, or a directory (starting
    with ``/``) holding the server's Unix socket ``.s.PGSQL.<port>``."""

    host: str
    port: int
    port_in: int = 0  # where the proxy listens (on 127.0.0.1)
    dropped: int = 0  # connections cut after a committed statement
    _server: asyncio.Server | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port_in = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await self._connect_upstream()
        self._writers += [client_w, server_w]
        pipes = [
            asyncio.create_task(self._upstream(client_r, server_w)),
            asyncio.create_task(self._downstream(server_r, client_w)),
        ]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            for writer in (client_w, server_w):
                writer.close()

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.host.startswith("/"):
            return await asyncio.open_unix_connection(f"{self.host}/.s.PGSQL.{self.port}")
        return await asyncio.open_connection(self.host, self.port)

    @staticmethod
    async def _upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    async def _downstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # No SSLRequest (sslmode=disable): every server message is framed, type byte + length.
        dropping = False
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readexactly(5)
                body = await reader.readexactly(int.from_bytes(head[1:], "big") - 4)
                if dropping:
                    if head[:1] == b"Z":  # ReadyForQuery: the statement committed; cut here
                        self.dropped += 1
                        return
                    continue
                if head[:1] == b"N" and DROP_MARKER.encode() in body:
                    dropping = True
                    continue
                writer.write(head + body)
                await writer.drain()


# -- helpers -----------------------------------------------------------------------------------


def schema_of(settings: Settings) -> str:
    return settings.database.schema_name


def with_database(settings: Settings, **changes: Any) -> Settings:
    return settings.model_copy(update={"database": settings.database.model_copy(update=changes)})


async def publish(sm: DatabaseSessionManager, settings: Settings, operation_type: str) -> int:
    async with sm.session() as session:
        op_id = await publish_operation(
            session, operation_type, {}, channel=settings.workflow_system.channel
        )
        await session.commit()
    return op_id


async def eventually(check: Callable[[], Awaitable[Any]], what: str, within: float = WITHIN) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not (result := await check()):
        assert loop.time() < deadline, f"timed out after {within}s waiting for {what}"
        await asyncio.sleep(0.02)
    return result


async def state_of(conn: asyncpg.Connection, schema: str, op_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(f'SELECT * FROM "{schema}".operations WHERE id = $1', op_id)
    assert row is not None
    return row


async def wait_for_state(
    conn: asyncpg.Connection, schema: str, op_id: int, state: str
) -> asyncpg.Record:
    async def reached() -> asyncpg.Record | None:
        row = await state_of(conn, schema, op_id)
        return row if row["state"] == state else None

    row: asyncpg.Record = await eventually(reached, f"operation {op_id} to be {state!r}")
    return row


async def trail(conn: asyncpg.Connection, schema: str, op_id: int) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            f'SELECT *, xmin::text AS xid FROM "{schema}".audit_log WHERE operation_id = $1 '
            "ORDER BY seq",
            op_id,
        )
    )


def steps(rows: list[asyncpg.Record]) -> list[tuple[str, int, str]]:
    return [(r["trigger"], r["attempt"], r["actor"]) for r in rows]


async def rejects(conn: asyncpg.Connection, schema: str) -> int:
    n: int = await conn.fetchval(
        f"SELECT count(*) FROM \"{schema}\".audit_log WHERE trigger = 'reject'"
    )
    return n


async def chains_verify(conn: asyncpg.Connection, schema: str) -> None:
    verification = await verify_chains(conn, schema)
    assert verification.ok, str(verification.problem)


async def settled(system: WorkflowSystem) -> None:
    """Wait until the dispatcher holds nothing: every outcome recorded (or given up on)."""
    await eventually(lambda: _true(not system.dispatcher.in_flight), "the dispatcher to settle")


async def _true(value: bool) -> bool:
    return value


def the_retry_warning(caplog: pytest.LogCaptureFixture) -> str:
    """The one warning the worker logged about a failed recording (exactly one is expected)."""
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.name == "pgoutbox.worker" and "outcomes failed" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    return warnings[0]


def committed_before_notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "pgoutbox.worker"
        and "committed before its connection dropped" in r.getMessage()
    ]


async def assert_backend_replaced(
    conn: asyncpg.Connection, pid: int | None, settings: Settings
) -> None:
    """The fault's backend really exited (it is not merely idle in the pool), and the worker
    is connected through other ones."""
    assert pid is not None, "the fault never fired"
    app = settings.database.application_name

    async def gone() -> bool:
        n = await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
        return bool(n == 0)

    await eventually(gone, f"backend {pid} to exit")
    live = await conn.fetchval(
        "SELECT array_agg(pid) FROM pg_stat_activity WHERE application_name = $1", app
    )
    assert live, f"the worker ({app}) has no backend left"
    assert pid not in live


async def still_works(
    system: WorkflowSystem,
    sm: DatabaseSessionManager,
    settings: Settings,
    conn: asyncpg.Connection,
    operation_type: str,
) -> None:
    """A further operation is claimed, run and recorded by the same worker."""
    schema = schema_of(settings)
    op_id = await publish(sm, settings, operation_type)
    await wait_for_state(conn, schema, op_id, "succeeded")
    assert steps(await trail(conn, schema, op_id))[1:] == [
        ("claim", 1, system.worker_id),
        ("succeed", 1, system.worker_id),
    ]


@dataclass
class Gate:
    """Handlers that report they started and then wait to be let go."""

    expected: int
    started: list[int] = field(default_factory=list)
    go: asyncio.Event = field(default_factory=asyncio.Event)
    all_started: asyncio.Event = field(default_factory=asyncio.Event)

    async def enter(self, ctx: HandlerContext) -> None:
        """Wait to be let go; once let go (the test's later operations), pass straight on."""
        if self.go.is_set():
            return
        self.started.append(ctx.operation_id)
        if len(self.started) >= self.expected:
            self.all_started.set()
        await self.go.wait()

    def router(self, operation_type: str) -> WorkflowRouter:
        """A router whose handler for ``operation_type`` enters this gate and succeeds."""
        router = WorkflowRouter()

        @router.on(operation_type)
        async def gated(ctx: HandlerContext, payload: Any) -> None:
            await self.enter(ctx)

        return router

    async def wait_started(self) -> None:
        await asyncio.wait_for(self.all_started.wait(), WITHIN)

    async def release_after_losing(
        self, conn: asyncpg.Connection, schema: str, late: int
    ) -> asyncpg.Record:
        """Once every handler has started, take ``late``'s lease away (an audited ``lose`` by
        the test), then let the handlers return success, all in the same turn: ``late``'s
        result arrives after its lease was lost. The operation row after the ``lose``."""
        try:
            await self.wait_started()
            lost = await conn.fetchrow(_lose_lease_sql(schema), late)
            assert lost is not None, "the operation was not claimed"
            return lost
        finally:
            self.go.set()


@pytest.fixture
def schema(settings: Settings) -> str:
    return schema_of(settings)


@pytest.fixture
def worker_settings(settings: Settings) -> Settings:
    """The test's settings, with an application_name of its own (to find its backends)."""
    return with_database(settings, application_name=f"fault_rec_{uuid.uuid4().hex[:8]}")


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="pgoutbox.worker")
    return caplog


@pytest.fixture
async def proxy(worker_settings: Settings) -> AsyncIterator[ReplyDropper]:
    """A ReplyDropper in front of the test's server."""
    db = worker_settings.database
    dropper = ReplyDropper(db.host, db.port)
    await dropper.start()
    try:
        yield dropper
    finally:
        await dropper.close()


@pytest.fixture
def proxied_settings(worker_settings: Settings, proxy: ReplyDropper) -> Settings:
    """The test's settings, connecting through ``proxy``."""
    return with_database(worker_settings, host="127.0.0.1", port=proxy.port_in, sslmode="disable")


def _lose_lease_sql(schema: str) -> str:
    """What a rescuer does to an expired lease, audited: the operation goes back to `failed`
    (retried in an hour, so nobody claims it during the test) and its version moves on."""
    return f"""
        UPDATE "{schema}".operations
        SET state = 'failed', transition = 'lose', transition_actor = 'test',
            transition_detail = 'lease taken away by the test', last_error = 'lease lost (test)',
            version = version + 1, lease_owner = NULL, lease_expires_at = NULL,
            run_at = now() + interval '1 hour'
        WHERE id = $1 AND state = 'claimed'
        RETURNING state, version
    """


# -- killed before commit ----------------------------------------------------------------------


async def test_a_success_whose_statement_is_killed_is_recorded_once_on_retry(
    worker_settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    router = WorkflowRouter()
    runs: list[int] = []

    @router.on("rec.ok")
    async def ok(ctx: HandlerContext, payload: Any) -> None:
        runs.append(ctx.operation_id)

    fault = await kill_once(conn, schema, "NEW.transition = 'succeed'")
    async with WorkflowSystem(router=router, settings=worker_settings) as system:
        op_id = await publish(sm, worker_settings, "rec.ok")
        row = await wait_for_state(conn, schema, op_id, "succeeded")
        await settled(system)
        # The first firing was killed, the retry's went through.
        assert await fault.shots() == 2
        await assert_backend_replaced(conn, await fault.killed_pid(), worker_settings)
        warning = the_retry_warning(logs)
        assert warning.startswith("recording 1 outcomes failed (")
        assert KILLED_BY_SERVER in warning
        assert committed_before_notes(logs) == []  # the retry had to record it again

        assert runs == [op_id]  # recorded again, not run again
        assert (row["attempts"], row["lease_owner"], row["last_error"]) == (1, None, None)
        assert steps(await trail(conn, schema, op_id))[1:] == [
            ("claim", 1, system.worker_id),
            ("succeed", 1, system.worker_id),
        ]
        assert await rejects(conn, schema) == 0
        await still_works(system, sm, worker_settings, conn, "rec.ok")
    await chains_verify(conn, schema)


async def test_a_late_success_whose_refusal_is_killed_is_rejected_once_on_retry(
    worker_settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    gate = Gate(expected=1)
    router = gate.router("rec.slow")

    fault = await kill_once(conn, schema, "NEW.transition = 'reject'")
    async with WorkflowSystem(router=router, settings=worker_settings) as system:
        op_id = await publish(sm, worker_settings, "rec.slow")
        # The lease is taken away while the handler runs; it returns success, too late.
        lost = await gate.release_after_losing(conn, schema, op_id)

        reject = await eventually(
            lambda: _reject_of(conn, schema, op_id), "the late result to be refused"
        )
        await settled(system)
        assert await fault.shots() == 2
        await assert_backend_replaced(conn, await fault.killed_pid(), worker_settings)
        warning = the_retry_warning(logs)
        assert KILLED_BY_SERVER in warning

        row = await state_of(conn, schema, op_id)
        # The late result changed nothing: state, version and error are what the test left.
        assert (row["state"], row["version"]) == (lost["state"], lost["version"])
        assert (row["lease_owner"], row["last_error"]) == (None, "lease lost (test)")
        rows = await trail(conn, schema, op_id)
        assert steps(rows)[1:] == [
            ("claim", 1, system.worker_id),
            ("lose", 1, "test"),
            ("reject", 1, system.worker_id),
        ]
        assert (reject["from_state"], reject["to_state"]) == ("failed", "failed")
        assert "attempt 1" in reject["detail"]
        assert "lease was lost" in reject["detail"]
        assert system.worker_id in reject["detail"]
        assert await rejects(conn, schema) == 1

        await still_works(system, sm, worker_settings, conn, "rec.slow")
    await chains_verify(conn, schema)


async def test_a_batch_with_a_late_success_records_the_on_time_one_once_when_the_refusal_dies(
    worker_settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    # The first statement commits the on-time success and marks it; the refusal statement is
    # killed; the retry must write the refusal alone: neither a second 'succeed' nor a 'reject'
    # for the on-time operation.
    gate = Gate(expected=2)
    router = gate.router("rec.slow")

    fault = await kill_once(conn, schema, "NEW.transition = 'reject'")
    on_time = await publish(sm, worker_settings, "rec.slow")
    late = await publish(sm, worker_settings, "rec.slow")
    async with WorkflowSystem(router=router, settings=worker_settings) as system:
        # Both return success in the same turn: one batch of successes, one of them late.
        lost = await gate.release_after_losing(conn, schema, late)
        await wait_for_state(conn, schema, on_time, "succeeded")
        await eventually(lambda: _reject_of(conn, schema, late), "the late result to be refused")
        await settled(system)
        assert await fault.shots() == 2
        await assert_backend_replaced(conn, await fault.killed_pid(), worker_settings)
        warning = the_retry_warning(logs)
        assert warning.startswith("recording 2 outcomes failed (")
        assert KILLED_BY_SERVER in warning
        assert committed_before_notes(logs) == []

        on_time_trail = await trail(conn, schema, on_time)
        late_trail = await trail(conn, schema, late)
        assert steps(on_time_trail)[1:] == [
            ("claim", 1, system.worker_id),
            ("succeed", 1, system.worker_id),
        ]
        assert steps(late_trail)[1:] == [
            ("claim", 1, system.worker_id),
            ("lose", 1, "test"),
            ("reject", 1, system.worker_id),
        ]
        # Two statements: the success committed on its own, the refusal in the retry.
        assert on_time_trail[-1]["xid"] != late_trail[-1]["xid"]
        row = await state_of(conn, schema, late)
        assert (row["state"], row["version"]) == (lost["state"], lost["version"])
        assert await rejects(conn, schema) == 1

        await still_works(system, sm, worker_settings, conn, "rec.slow")
    await chains_verify(conn, schema)


async def _reject_of(conn: asyncpg.Connection, schema: str, op_id: int) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await conn.fetchrow(
        f"SELECT * FROM \"{schema}\".audit_log WHERE operation_id = $1 AND trigger = 'reject'",
        op_id,
    )
    return row


@pytest.mark.parametrize(
    "killed",
    [
        pytest.param("succeed", id="killed-recording-the-success"),
        # The success's UPDATE already ran in the transaction when the failure's is killed.
        pytest.param("fail", id="killed-recording-the-failure"),
    ],
)
async def test_a_mixed_batch_killed_inside_its_transaction_is_recorded_once_on_retry(
    killed: str,
    worker_settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    router = WorkflowRouter()
    gate = Gate(expected=2)
    runs: list[tuple[str, int]] = []

    @router.on("rec.ok")
    async def ok(ctx: HandlerContext, payload: Any) -> None:
        runs.append((ctx.operation_type, ctx.attempt))
        await gate.enter(ctx)

    @router.on("rec.bad", retry=NO_RETRY_SOON)
    async def bad(ctx: HandlerContext, payload: Any) -> None:
        runs.append((ctx.operation_type, ctx.attempt))
        await gate.enter(ctx)
        raise RuntimeError("boom")

    fault = await kill_once(conn, schema, f"NEW.transition = '{killed}'")
    good_id = await publish(sm, worker_settings, "rec.ok")
    bad_id = await publish(sm, worker_settings, "rec.bad")
    async with WorkflowSystem(router=router, settings=worker_settings) as system:
        try:
            await gate.wait_started()
        finally:
            # Both handlers resume in the same turn of the loop: their outcomes form one batch.
            gate.go.set()
        await wait_for_state(conn, schema, good_id, "succeeded")
        failed = await wait_for_state(conn, schema, bad_id, "failed")
        await settled(system)
        assert await fault.shots() == 2
        await assert_backend_replaced(conn, await fault.killed_pid(), worker_settings)
        warning = the_retry_warning(logs)
        assert warning.startswith("recording 2 outcomes failed (")
        # asyncpg reports the dead connection as its transaction's exit finds it.
        assert "the underlying connection is closed" in warning
        assert committed_before_notes(logs) == []

        assert sorted(runs) == [("rec.bad", 1), ("rec.ok", 1)]  # recorded again, not rerun
        good_trail = await trail(conn, schema, good_id)
        bad_trail = await trail(conn, schema, bad_id)
        assert steps(good_trail)[1:] == [
            ("claim", 1, system.worker_id),
            ("succeed", 1, system.worker_id),
        ]
        assert steps(bad_trail)[1:] == [
            ("claim", 1, system.worker_id),
            ("fail", 1, system.worker_id),
        ]
        # One transaction recorded both (the batch was mixed), once.
        assert good_trail[-1]["xid"] == bad_trail[-1]["xid"]
        assert "RuntimeError: boom" in bad_trail[-1]["detail"]
        assert (failed["attempts"], failed["last_error"]) == (1, "RuntimeError: boom")
        assert await rejects(conn, schema) == 0

        await still_works(system, sm, worker_settings, conn, "rec.ok")
    await chains_verify(conn, schema)


# -- reply lost after commit -------------------------------------------------------------------


async def test_a_success_committed_with_its_reply_lost_is_not_recorded_twice(
    proxy: ReplyDropper,
    proxied_settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    router = WorkflowRouter()

    @router.on("rec.ok")
    async def ok(ctx: HandlerContext, payload: Any) -> None:
        pass

    fault = await drop_reply_once(conn, schema, "NEW.transition = 'succeed'")
    async with WorkflowSystem(router=router, settings=proxied_settings) as system:
        op_id = await publish(sm, proxied_settings, "rec.ok")
        await wait_for_state(conn, schema, op_id, "succeeded")
        await settled(system)
        assert (await fault.shots(), proxy.dropped) == (1, 1)
        await assert_backend_replaced(conn, await fault.killed_pid(), proxied_settings)
        warning = the_retry_warning(logs)
        assert warning.startswith("recording 1 outcomes failed (")
        # The retry found the committed outcome in the audit log and left it at that.
        assert len(committed_before_notes(logs)) == 1
        assert steps(await trail(conn, schema, op_id))[1:] == [
            ("claim", 1, system.worker_id),
            ("succeed", 1, system.worker_id),
        ]
        assert await rejects(conn, schema) == 0
        await still_works(system, sm, proxied_settings, conn, "rec.ok")
    await chains_verify(conn, schema)


async def test_what_a_recording_claimed_with_its_reply_lost_is_handed_back_not_left_to_die(
    proxy: ReplyDropper,
    proxied_settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    # The statement that records the first operation's success also claims the second one, and
    # its reply is lost after the commit: the worker holds a lease it never heard of. With
    # on_lost="dead", leaving it to expire would send an operation whose handler never ran to
    # dead. The worker hands it back instead (an audited release), then claims and runs it.
    router = WorkflowRouter()
    gate = Gate(expected=1)
    runs: list[int] = []

    @router.on("rec.once", on_lost="dead")
    async def once(ctx: HandlerContext, payload: Any) -> None:
        runs.append(ctx.operation_id)
        await gate.enter(ctx)

    # One at a time, and no wake-up but the recording's own claim: the second operation,
    # published while the first one runs, is claimed by the statement recording the first.
    single = proxied_settings.model_copy(
        update={
            "workflow_system": proxied_settings.workflow_system.model_copy(
                update={
                    "n_workers": 1,
                    "batch_size": 1,
                    "listen": False,
                    "poll_interval_seconds": 30.0,
                }
            )
        }
    )
    fault = await drop_reply_once(conn, schema, "NEW.transition = 'succeed'")
    first = await publish(sm, single, "rec.once")
    async with WorkflowSystem(router=router, settings=single) as system:
        await gate.wait_started()
        # By now the claim loop has found nothing more and sleeps for the poll interval (its
        # look for the next due run_at takes milliseconds); it is not woken by this publish.
        await asyncio.sleep(0.5)
        second = await publish(sm, single, "rec.once")
        gate.go.set()
        await wait_for_state(conn, schema, second, "succeeded")
        await settled(system)
        # Both successes fired the test trigger; the first one's reply was dropped.
        assert (await fault.shots(), proxy.dropped) == (2, 1)
        assert len(committed_before_notes(logs)) == 1  # the first one's success had committed
        handed_back = [r.getMessage() for r in logs.records if "claim's reply" in r.getMessage()]
        assert handed_back == ["handed back 1 operations whose claim's reply was lost"]

        assert runs == [first, second]  # each handler ran once
        worker = system.worker_id
        assert steps(await trail(conn, schema, first))[1:] == [
            ("claim", 1, worker),
            ("succeed", 1, worker),
        ]
        second_trail = await trail(conn, schema, second)
        assert steps(second_trail)[1:] == [
            ("claim", 1, worker),
            ("release", 1, worker),
            ("claim", 2, worker),
            ("succeed", 2, worker),
        ]
        assert second_trail[2]["to_state"] == "pending"
        assert "the handler never ran" in second_trail[2]["detail"]
        assert await rejects(conn, schema) == 0
    await chains_verify(conn, schema)


async def test_a_late_success_batched_with_a_success_whose_reply_is_lost_is_still_rejected(
    proxy: ReplyDropper,
    proxied_settings: Settings,
    sm: DatabaseSessionManager,
    conn: asyncpg.Connection,
    schema: str,
    logs: pytest.LogCaptureFixture,
) -> None:
    # A batch of successes, one of them late. The first statement records the on-time one and
    # commits, but its reply is lost: the refusal statement never ran. The retry finds the
    # on-time outcome in the audit log, marks the late one refused and records the refusal.
    gate = Gate(expected=2)
    router = gate.router("rec.ok")

    fault = await drop_reply_once(conn, schema, "NEW.transition = 'succeed'")
    on_time = await publish(sm, proxied_settings, "rec.ok")
    late = await publish(sm, proxied_settings, "rec.ok")
    async with WorkflowSystem(router=router, settings=proxied_settings) as system:
        # Both return success in the same turn: one batch of successes, one of them late.
        lost = await gate.release_after_losing(conn, schema, late)
        await wait_for_state(conn, schema, on_time, "succeeded")
        await settled(system)  # the batch is done with: nothing more will be written for it
        assert (await fault.shots(), proxy.dropped) == (1, 1)
        await assert_backend_replaced(conn, await fault.killed_pid(), proxied_settings)
        warning = the_retry_warning(logs)
        assert warning.startswith("recording 2 outcomes failed (")
        assert len(committed_before_notes(logs)) == 1
        assert steps(await trail(conn, schema, on_time))[1:] == [
            ("claim", 1, system.worker_id),
            ("succeed", 1, system.worker_id),
        ]
        row = await state_of(conn, schema, late)
        assert (row["state"], row["version"]) == (lost["state"], lost["version"])
        await still_works(system, sm, proxied_settings, conn, "rec.ok")
        worker_id = system.worker_id
    await chains_verify(conn, schema)

    late_steps = steps(await trail(conn, schema, late))[1:]
    # The late result is audited as refused, once: the retry found the on-time success
    # recorded, and the late one not, so it still wrote the refusal.
    assert late_steps == [
        ("claim", 1, worker_id),
        ("lose", 1, "test"),
        ("reject", 1, worker_id),
    ]
