"""A worker's maintenance services: the audit log's monthly partitions (made ahead; at the
end), retention purges (``workflow_system.retention_days``) and audit checkpoints: a signed
checkpoint of the audit log every N minutes (``workflow_system.audit_checkpoint_minutes``),
written to a directory the user ships somewhere the database's owner cannot write
(docs/audit.md).

One at a time per schema across workers (a session advisory lock), and a round finds nothing
to do when the directory already holds a checkpoint younger than the interval (workers sharing
the directory take turns). The worker's database role must read the audit log: give it the
auditor's grants too (``pgoutbox db grant --auditor ROLE``), or run ``pgoutbox audit
checkpoint`` from cron as the auditor instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from pgoutbox import anchor
from pgoutbox.service import Service
from pgoutbox.settings import DatabaseSettings
from pgoutbox.sql import queries

log = logging.getLogger("pgoutbox.worker")


class CheckpointService(Service):
    """Takes a signed audit checkpoint every ``interval`` seconds into ``directory``."""

    name = "audit-checkpoint"

    def __init__(
        self, pool: asyncpg.Pool, schema: str, key: Any, directory: Path, interval: float
    ) -> None:
        super().__init__(interval)
        self._pool, self._schema, self._key, self._directory = pool, schema, key, directory

    def _recent(self) -> bool:
        newest = max(
            (p.stat().st_mtime for p in self._directory.glob("checkpoint-*.json")), default=0.0
        )
        return time.time() - newest < self.interval * 0.9

    async def run_once(self) -> Path | None:
        """Take one checkpoint unless another worker holds the lock or one is recent; its
        path, or None."""
        self._directory.mkdir(parents=True, exist_ok=True)
        if self._recent():
            return None
        q = queries(self._schema)
        async with self._pool.acquire() as conn:
            if not await q["anchor_try_lock"].fetchval(conn, schema=self._schema):
                return None
            try:
                if self._recent():
                    return None
                stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
                path = self._directory / f"checkpoint-{stamp}.json"
                document = await anchor.take_checkpoint(
                    conn, self._schema, self._key, anchor.heads_path_for(path)
                )
                anchor.write_checkpoint(document, path)
            except asyncpg.InsufficientPrivilegeError as exc:
                log.error(
                    "audit checkpoint: this worker's role may not read the audit log (%s): "
                    "grant it with `pgoutbox db grant --auditor ROLE`",
                    exc,
                )
                return None
            finally:
                await q["anchor_unlock"].fetchval(conn, schema=self._schema)
        log.info(
            "audit checkpoint %s: %d operations, %d rows, root %s",
            path.name,
            document["size"],
            document["rows"],
            document["root"],
        )
        return path


def checkpoint_service(settings: Any) -> Callable[[asyncpg.Pool, str], CheckpointService]:
    """What builds the service ``settings`` (a
    :class:`~pgoutbox.settings.WorkflowSystemSettings` with ``audit_checkpoint_minutes`` set)
    asks for, its key read now from ``PGOUTBOX_AUDIT_KEY``: a missing or bad key fails the
    worker's start, naming the variable, before anything is opened."""
    key = anchor.private_key_from(None)
    directory = Path(settings.audit_checkpoint_dir)
    interval = settings.audit_checkpoint_minutes * 60

    def build(pool: asyncpg.Pool, schema: str) -> CheckpointService:
        return CheckpointService(pool, schema, key, directory, interval)

    return build


class RetentionService(Service):
    """Purges finished operations older than the retention (``workflow_system.retention_days``)
    once per ``interval``: what ``pgoutbox ops purge`` does, recorded in ``purges`` with the
    actor ``retention:<worker id>``; their audit rows stay. Workers may run it at the same
    time: each run is its own ``purges`` row, and its batches skip rows another one locked. The
    worker's role needs the operator's grants (``pgoutbox db grant --operator ROLE``)."""

    name = "retention"

    def __init__(
        self,
        settings: DatabaseSettings,
        worker_id: str,
        keep: timedelta,
        include_dead: bool,
        interval: float,
    ) -> None:
        super().__init__(interval)
        self._settings, self._actor = settings, f"retention:{worker_id}"
        self._keep, self._include_dead = keep, include_dead

    async def run_once(self) -> int:
        """Purge what the retention allows now; how many operations were deleted."""
        from pgoutbox.admin import Admin

        async with Admin(self._settings) as admin:
            try:
                result = await admin.purge(
                    self._keep, actor=self._actor, include_dead=self._include_dead
                )
            except asyncpg.InsufficientPrivilegeError as exc:
                log.error(
                    "retention: this worker's role may not purge (%s): grant it with "
                    "`pgoutbox db grant --operator ROLE`, or run `pgoutbox ops purge` from cron",
                    exc,
                )
                return 0
        if result.deleted:
            log.info("retention: purged %d finished operations", result.deleted)
        return int(result.deleted)


class PartitionService(Service):
    """Makes ``audit_log``'s monthly partitions (revision 0014) for this month and the next
    :attr:`MONTHS_AHEAD`, once an hour in every worker: a month's rows never wait on DDL and
    never land in the default partition. A partition another worker made already is left as
    it is; one whose lock is busy for 2 s is made in a later round. The worker's role needs
    ``pgoutbox db grant --worker`` of revision 0014 or later."""

    name = "audit-partitions"
    MONTHS_AHEAD = 3

    def __init__(self, pool: asyncpg.Pool, schema: str, interval: float = 3600.0) -> None:
        super().__init__(interval)
        self._pool, self._schema = pool, schema
        self._warned = False

    async def run_once(self) -> int:
        """Make the partitions missing now; how many were made."""
        try:
            async with self._pool.acquire() as conn:
                made = await queries(self._schema)["audit_log_add_partitions"].fetchval(
                    conn, months_ahead=self.MONTHS_AHEAD
                )
        except asyncpg.LockNotAvailableError:
            return 0
        except asyncpg.InsufficientPrivilegeError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "audit-partitions: this worker's role may not make audit_log's monthly "
                    "partitions (%s): run `pgoutbox db grant --worker ROLE` again after the "
                    "upgrade; until then rows of months without a partition go to "
                    "audit_log_default, which `audit archive` cannot take",
                    exc,
                )
            return 0
        if made:
            log.info("audit-partitions: made %d monthly partitions of audit_log", made)
        return int(made)
