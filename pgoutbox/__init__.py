"""pgoutbox: PostgreSQL-backed workflow and outbox engine for irreversible operations."""

from pgoutbox.admin import Admin
from pgoutbox.audit import AuditProblem, AuditVerification, verify
from pgoutbox.context import (
    DoNotRetry,
    GuardedSession,
    HandlerContext,
    SessionControlError,
    Snooze,
)
from pgoutbox.db import DatabaseSessionManager
from pgoutbox.fire import FireRefused, fire
from pgoutbox.flow import Limit, LimitError, Rate
from pgoutbox.flow_admin import FlowControlError
from pgoutbox.lifecycle import DEFAULT_LIFECYCLE, Lifecycle, LifecycleError, TransitionNotAllowed
from pgoutbox.publish import (
    IdempotencyConflict,
    OperationId,
    PublishError,
    publish_many,
    publish_operation,
)
from pgoutbox.router import HandlerSpec, RetryPolicy, RouterError, WorkflowRouter
from pgoutbox.settings import DatabaseSettings, Settings, WorkflowSystemSettings
from pgoutbox.worker import SchemaNotReady, WorkflowSystem

__all__ = [
    "DEFAULT_LIFECYCLE",
    "Admin",
    "AuditProblem",
    "AuditVerification",
    "DatabaseSessionManager",
    "DatabaseSettings",
    "DoNotRetry",
    "FireRefused",
    "FlowControlError",
    "GuardedSession",
    "HandlerContext",
    "HandlerSpec",
    "IdempotencyConflict",
    "Lifecycle",
    "LifecycleError",
    "Limit",
    "LimitError",
    "OperationId",
    "PublishError",
    "Rate",
    "RetryPolicy",
    "RouterError",
    "SchemaNotReady",
    "SessionControlError",
    "Settings",
    "Snooze",
    "TransitionNotAllowed",
    "WorkflowRouter",
    "WorkflowSystem",
    "WorkflowSystemSettings",
    "fire",
    "publish_many",
    "publish_operation",
    "verify",
]
