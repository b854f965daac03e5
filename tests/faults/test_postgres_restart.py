"""PostgreSQL restarted under a running system (``pg_ctl restart -m fast``, then ``-m
immediate``, i.e. a crash and recovery) on a server this test owns.

While operations are being published and worked, the server goes away twice. Afterwards: the
worker processes are the same ones (they reconnected, none died), every operation whose publish
committed is there and succeeded, every transition committed before a restart is still in its
chain, nothing is left claimed, and every chain verifies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from faultkit import Supervisor, fault_scale

from pgoutbox import DatabaseSessionManager, migrations, publish_many
from pgoutbox.audit import verify_chains
from pgoutbox.embedded import EmbeddedPostgres, EmbeddedUnavailableError, start_embedded
from pgoutbox.settings import DatabaseSettings

SCHEMA, CHANNEL = "fault_restart", "fault_restart"


@pytest.fixture(scope="module")
def own_server() -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL of this test's own (the embedded server, else the machine's binaries)."""
    try:
        server = start_embedded()
    except EmbeddedUnavailableError as exc:
        pytest.skip(f"no PostgreSQL to run a private, restartable server: {exc}")
    with server:
        yield server


async def _connect(settings: DatabaseSettings) -> asyncpg.Connection:
    """Connect, waiting out a restart."""
    for _ in range(300):
        try:
            return await asyncpg.connect(**settings.connect_kwargs())
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await asyncio.sleep(0.1)
    raise AssertionError("the server did not come back")


async def _heads(settings: DatabaseSettings) -> dict[int, tuple[int, bytes]]:
    """Every operation's committed chain head: id -> (seq, hash)."""
    conn = await _connect(settings)
    try:
        rows = await conn.fetch(f"SELECT id, audit_seq, audit_hash FROM {SCHEMA}.operations")
    finally:
        await conn.close()
    return {r["id"]: (r["audit_seq"], r["audit_hash"]) for r in rows}


async def _workers_registered(settings: DatabaseSettings, count: int) -> None:
    conn = await _connect(settings)
    try:
        for _ in range(600):
            if await conn.fetchval(f"SELECT count(*) FROM {SCHEMA}.workers") >= count:
                return
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    raise AssertionError("workers did not start")


class Publisher:
    """Publishes numbered batches with idempotency keys, retrying a batch whose commit failed
    (so an ambiguous commit is resolved: the same keys return the same operations)."""

    def __init__(self, settings: DatabaseSettings, total: int, batch: int = 20) -> None:
        self.settings, self.total, self.batch = settings, total, batch
        self.committed: dict[str, int] = {}
        self.retries = 0

    async def run(self) -> None:
        for start in range(0, self.total, self.batch):
            items = [
                {"operation_type": "fault.work", "payload": {"n": n}, "channel": CHANNEL,
                 "idempotency_key": f"restart-{n}", "max_attempts": 1000}
                for n in range(start, min(self.total, start + self.batch))
            ]  # fmt: skip
            while True:
                sm = DatabaseSessionManager(self.settings)
                try:
                    async with sm.session() as session:
                        ids = await publish_many(session, items)
                        await session.commit()
                    break
                except Exception:  # the server is restarting: retry the same keys
                    self.retries += 1
                    await asyncio.sleep(0.2)
                finally:
                    await sm.close()
            for item, op_id in zip(items, ids, strict=True):
                self.committed[item["idempotency_key"]] = op_id
            await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_postgres_fast_and_immediate_restarts_lose_no_committed_transition(
    own_server: EmbeddedPostgres, tmp_path: Path
) -> None:
    settings = DatabaseSettings(dsn=own_server.dsn, schema=SCHEMA)
    await migrations.upgrade(settings)
    conn = await _connect(settings)
    try:
        await conn.execute(
            "CREATE SCHEMA fault_restart_effects; CREATE TABLE fault_restart_effects.effects "
            "(operation_id bigint NOT NULL, attempt int NOT NULL, worker_pid int NOT NULL, "
            "at timestamptz NOT NULL DEFAULT clock_timestamp())"
        )
    finally:
        await conn.close()
    total = max(fault_scale() // 2, 200)
    supervisor = Supervisor(
        settings, CHANNEL, "fault_restart_effects", tmp_path, size=2,
        extra_env={"FAULT_KILL_RATE": "0"},
    )  # fmt: skip
    publisher = Publisher(settings, total)
    began = time.monotonic()
    supervisor.start()
    try:
        publishing = asyncio.create_task(publisher.run())
        for mode in ("fast", "immediate"):
            # Let work pile up, remember what is committed, pull the server away.
            while len(publisher.committed) < total * (1 if mode == "fast" else 2) // 3:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            # Both workers up and registered: this tests reconnecting, not starting up.
            await _workers_registered(settings, supervisor.size)
            before = await _heads(settings)
            await asyncio.to_thread(own_server.restart, mode)
            after = await _heads(settings)
            survived = [i for i, (seq, _) in before.items() if i in after and after[i][0] >= seq]
            assert len(survived) == len(before), f"{mode}: committed operations or transitions lost"
            conn = await _connect(settings)
            try:
                rows = await conn.fetch(
                    f"SELECT operation_id, seq, hash FROM {SCHEMA}.audit_log "
                    "WHERE (operation_id, seq) IN (SELECT * FROM unnest($1::bigint[], $2::int[]))",
                    list(before),
                    [seq for seq, _ in before.values()],
                )
            finally:
                await conn.close()
            assert {r["operation_id"]: (r["seq"], r["hash"]) for r in rows} == before
        await asyncio.wait_for(publishing, 300)

        conn = await _connect(settings)
        try:
            deadline = time.monotonic() + 180
            while True:
                done = await conn.fetchval(
                    f"SELECT count(*) FROM {SCHEMA}.operations WHERE state = 'succeeded'"
                )
                if done == total:
                    break
                assert time.monotonic() < deadline, f"{done}/{total}\n{supervisor.logs()}"
                await asyncio.sleep(0.2)
            # The same worker processes throughout: they reconnected, none had to be replaced.
            supervisor.replace_dead()
            assert not supervisor.exits, f"workers died: {supervisor.exits}\n{supervisor.logs()}"
            assert await supervisor.stop() == [0] * supervisor.size

            ids = await conn.fetch(f"SELECT id, idempotency_key, state FROM {SCHEMA}.operations")
            assert {r["idempotency_key"]: r["id"] for r in ids} == publisher.committed
            stranded = await conn.fetchval(
                f"SELECT count(*) FROM {SCHEMA}.operations WHERE lease_owner IS NOT NULL"
            )
            assert stranded == 0
            unaudited = await conn.fetchval(
                f"SELECT count(*) FROM {SCHEMA}.operations o WHERE NOT EXISTS (SELECT 1 FROM "
                f"{SCHEMA}.audit_log a WHERE a.operation_id = o.id AND a.seq = o.audit_seq "
                "AND a.trigger = 'succeed' AND a.hash = o.audit_hash)"
            )
            assert unaudited == 0
            verification = await verify_chains(conn, SCHEMA)
            assert verification.ok, str(verification.problem)
            attempts = await conn.fetchval(f"SELECT sum(attempts) FROM {SCHEMA}.operations")
        finally:
            await conn.close()
    finally:
        supervisor.kill_all()
    print(
        f"restart result: operations={total} restarts=2 (fast, immediate) "
        f"attempts={attempts} publish_retries={publisher.retries} worker_deaths=0 lost=0 "
        f"seconds={round(time.monotonic() - began)}"
    )
