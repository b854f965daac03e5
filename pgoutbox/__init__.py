"""pgoutbox: PostgreSQL-backed workflow and outbox engine for irreversible operations."""

from pgoutbox.audit import AuditProblem, AuditVerification, verify
from pgoutbox.db import DatabaseSessionManager
from pgoutbox.lifecycle import DEFAULT_LIFECYCLE, Lifecycle, TransitionNotAllowed
from pgoutbox.publish import (
    IdempotencyConflict,
    OperationId,
    PublishError,
    publish_many,
    publish_operation,
)
from pgoutbox.settings import DatabaseSettings, Settings, WorkflowSystemSettings

__all__ = [
    "DEFAULT_LIFECYCLE",
    "AuditProblem",
    "AuditVerification",
    "DatabaseSessionManager",
    "DatabaseSettings",
    "IdempotencyConflict",
    "Lifecycle",
    "OperationId",
    "PublishError",
    "Settings",
    "TransitionNotAllowed",
    "WorkflowSystemSettings",
    "publish_many",
    "publish_operation",
    "verify",
]
