"""``WorkflowSystem``: one worker process's claim/run/record machinery and its services."""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from types import TracebackType

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from pgoutbox import migrations, registry
from pgoutbox.db import (
    SESSION_SETTINGS_KEY,
    create_engine,
    create_pool,
    new_worker_key,
    worker_key_fingerprint,
)
from pgoutbox.router import RouterError, WorkflowRouter
from pgoutbox.settings import Settings
from pgoutbox.sql import queries
from pgoutbox.worker.checkpoints import (
    CheckpointService,
    PartitionService,
    RetentionService,
    checkpoint_service,
)
from pgoutbox.worker.dispatcher import Dispatcher
from pgoutbox.worker.services import Heartbeat, Listener, Rescuer
from pgoutbox.worker.sync_handlers import SyncHandlers

_Service = Heartbeat | Rescuer | Listener | CheckpointService | RetentionService | PartitionService

log = logging.getLogger("pgoutbox.worker")


class SchemaNotReady(RuntimeError):
    """The database schema is not at pgoutbox's head revision and auto_migrate is off."""


class WorkflowSystem:
    """Runs the handlers of ``router`` for operations published on the configured channel.

    Usage::

        system = WorkflowSystem(router=router, settings=settings)
        await system.start()      # migrates (auto_migrate), then claims and runs operations
        ...
        await system.stop()       # finishes or releases what is in flight

    It also works as ``async with WorkflowSystem(...) as system:``. Only operations of this
    channel whose type the router handles are claimed; others stay ``pending``.
    """

    def __init__(self, router: WorkflowRouter, settings: Settings | None = None) -> None:
        self.router = router
        self.settings = settings if settings is not None else Settings()
        self.handlers = router.handlers()
        if not self.handlers:
            raise RouterError("the router has no handlers: register some with @router.on(...)")
        # The database knows this process's worker by its key: the id ends with the key's
        # fingerprint, and only this process's connections carry the key.
        self._worker_key = new_worker_key()
        fingerprint = worker_key_fingerprint(self._worker_key)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{fingerprint}"
        self._dispatcher: Dispatcher | None = None
        self._services: list[_Service] = []
        self._engine: AsyncEngine | None = None
        self._sync: SyncHandlers | None = None  # the threads of `def` handlers

    @property
    def dispatcher(self) -> Dispatcher:
        """The running dispatcher (after :meth:`start`)."""
        if self._dispatcher is None:
            raise RuntimeError("WorkflowSystem is not started: call `await system.start()`")
        return self._dispatcher

    @property
    def services(
        self,
    ) -> dict[
        str,
        Heartbeat | Rescuer | Listener | CheckpointService | RetentionService | PartitionService,
    ]:
        """The running background services by name."""
        return {service.name: service for service in self._services}

    async def start(self) -> None:
        """Bring the schema to head and register the router's lifecycles (or, without
        ``auto_migrate``, check both are so), then start claiming."""
        if self._dispatcher is not None:
            raise RuntimeError("WorkflowSystem is already started")
        db, ws = self.settings.database, self.settings.workflow_system
        # The signing key first: a worker asked for checkpoints without one does not start.
        make_checkpoints = checkpoint_service(ws) if ws.audit_checkpoint_minutes else None
        if ws.auto_migrate:
            await migrations.upgrade(db)
        else:
            current, head = await migrations.current(db), migrations.head_revision()
            if current != head:
                raise SchemaNotReady(
                    f"schema {db.schema_name!r} is at revision {current or 'none'}, not at "
                    f"pgoutbox's head {head}; run `pgoutbox db upgrade` (or set "
                    "workflow_system.auto_migrate=true)"
                )
        q = queries(db.schema_name)
        self._pool = await create_pool(
            db, max_size=max(db.pool_size, 4), worker_key=self._worker_key
        )
        try:
            async with self._pool.acquire() as conn:
                if ws.auto_migrate:
                    await registry.register(conn, q, db.schema_name, self.handlers)
                else:
                    await registry.check(conn, q, self.handlers)
        except BaseException:
            await self._pool.close()
            raise
        sessions = None
        if any(step.transactional for s in self.handlers.values() for step in s.all_steps()):
            self._engine = create_engine(db, pool_size=ws.n_workers, worker_key=self._worker_key)
            # Settings in each session's info: a handler publishing on ctx.session publishes
            # into this schema.
            sessions = async_sessionmaker(
                self._engine, expire_on_commit=False, info={SESSION_SETTINGS_KEY: db}
            )
        async with self._pool.acquire() as conn:
            await q["workers_register"].execute(
                conn,
                worker_id=self.worker_id,
                hostname=socket.gethostname(),
                pid=os.getpid(),
                channel=ws.channel,
                operation_types=sorted(self.handlers),
            )
        self._sync = SyncHandlers.for_handlers(self.handlers, db, ws.n_workers, self._worker_key)
        dispatcher = Dispatcher(
            self._pool, q, ws, db.schema_name, self.handlers, self.worker_id, sessions, self._sync
        )
        heartbeat = Heartbeat(
            self._pool,
            q,
            self.worker_id,
            ws.lease_seconds,
            ws.heartbeat_interval,
            dispatcher.held_versions,
            on_cancel_requests=dispatcher.abort,
        )
        self._services = [
            heartbeat,
            Rescuer(
                self._pool,
                q,
                self.worker_id,
                ws.channel,
                self.handlers,
                ws.rescue_interval,
                on_rescued=dispatcher.wake,
                # Ten leases without a heartbeat: that worker is gone, not slow.
                stale_worker_seconds=10 * ws.lease_seconds,
            ),
        ]
        if ws.listen:
            self._services.append(
                Listener(
                    db,
                    ws.channel,
                    dispatcher.wake,
                    ws.poll_interval_seconds,
                    # An operator's cancel request: the heartbeat reads it now.
                    on_cancel=heartbeat.kick,
                )
            )
        self._services.append(PartitionService(self._pool, db.schema_name))
        if make_checkpoints is not None:
            self._services.append(make_checkpoints(self._pool, db.schema_name))
        if ws.retention_days is not None:
            self._services.append(
                RetentionService(
                    db,
                    self.worker_id,
                    timedelta(days=ws.retention_days),
                    ws.retention_include_dead,
                    ws.retention_interval_minutes * 60,
                )
            )
        for service in self._services:
            service.start()
        dispatcher.start()
        self._dispatcher = dispatcher
        log.info(
            "worker %s started on channel %r for %d operation types",
            self.worker_id,
            ws.channel,
            len(self.handlers),
        )

    async def stop(self) -> None:
        """Stop claiming, let running handlers finish (up to ``shutdown_timeout_seconds``),
        release the rest in an audited transition, and close connections."""
        if self._dispatcher is None:
            return
        dispatcher, self._dispatcher = self._dispatcher, None
        try:
            await dispatcher.stop(self.settings.workflow_system.shutdown_timeout_seconds)
        finally:
            for service in self._services:
                await service.stop()
            self._services = []
            q = queries(self.settings.database.schema_name)
            try:
                async with self._pool.acquire() as conn:
                    await q["workers_unregister"].execute(conn, worker_id=self.worker_id)
            except Exception as exc:  # the row only informs operators; never block a stop
                log.warning("could not unregister worker %s: %s", self.worker_id, exc)
            await self._pool.close()
            if self._engine is not None:
                await self._engine.dispose()
                self._engine = None
            if self._sync is not None:
                self._sync.close()
                self._sync = None
        log.info("worker %s stopped", self.worker_id)

    async def __aenter__(self) -> WorkflowSystem:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
