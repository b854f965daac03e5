"""A ``django.tasks`` backend (Django 6+): ``@task`` functions enqueue as pgoutbox operations,
in the caller's transaction, with their audit trail; ``manage.py pgoutbox_worker`` runs them.

Usage (settings.py)::

    TASKS = {"default": {"BACKEND": "pgoutbox.contrib.django.tasks.PgoutboxTaskBackend"}}

    # shop/tasks.py
    from django.tasks import task

    @task
    def send_receipt(order_id):
        ...

    with transaction.atomic():
        order.save()
        send_receipt.enqueue(order.pk)    # commits, or rolls back, with the order

Every task is an operation of type ``django.task`` whose payload names the task and holds its
arguments (JSON). What does not map (docs/django.md): results (``supports_get_result`` is
False; a task's return value is not stored -- the operation's state and audit trail are its
record), queues (the operations go on pgoutbox's channel; the queue name is kept in the
payload), async task functions, and Django's task signals. Retries follow pgoutbox's
(``max_attempts``, backoff), which Django's interface does not express.
"""

from __future__ import annotations

from typing import Any

from django.db import connections, transaction
from django.tasks import Task, TaskContext, TaskResult, TaskResultStatus
from django.tasks.backends.base import BaseTaskBackend
from django.utils import timezone
from django.utils.module_loading import import_string

from pgoutbox.context import DoNotRetry, HandlerContext
from pgoutbox.contrib.django.conf import pgoutbox_options, pgoutbox_settings
from pgoutbox.publish import publish_operation
from pgoutbox.router import WorkflowRouter

TASK_OPERATION_TYPE = "django.task"


class PgoutboxTaskBackend(BaseTaskBackend):  # type: ignore[misc]  # Django ships no types
    """Enqueues ``django.tasks`` tasks as pgoutbox operations (see the module docstring)."""

    supports_defer = True  # run_after is the operation's run_at
    supports_priority = True  # Django's -100..100 is the operation's priority
    supports_async_task = False
    supports_get_result = False

    def enqueue(self, task: Task, args: Any, kwargs: Any) -> TaskResult:
        """Publish ``task`` with its arguments in the current transaction of the database of
        ``PGOUTBOX["DATABASE"]`` (its own transaction outside ``atomic()``)."""
        self.validate_task(task)
        alias = pgoutbox_options().get("DATABASE", "default")
        payload = {
            "task": task.module_path,
            "args": list(args),
            "kwargs": dict(kwargs),
            "queue": task.queue_name,
            "backend": self.alias,
        }
        with transaction.atomic(using=alias, savepoint=False):
            op_id = publish_operation(
                connections[alias],
                TASK_OPERATION_TYPE,
                payload,
                pgoutbox_settings().workflow_system.channel,
                run_at=task.run_after,
                priority=task.priority,
            )
        return _result(task, str(op_id), TaskResultStatus.READY, list(args), dict(kwargs))


def _result(
    task: Task, result_id: str, status: TaskResultStatus, args: list[Any], kwargs: dict[str, Any]
) -> TaskResult:
    now = timezone.now()
    return TaskResult(
        task=task,
        id=result_id,
        status=status,
        enqueued_at=now,
        started_at=now if status == TaskResultStatus.RUNNING else None,
        last_attempted_at=None,
        finished_at=None,
        args=args,
        kwargs=kwargs,
        backend=task.backend,
        errors=[],
        worker_ids=[],
    )


def run_task(ctx: HandlerContext, payload: dict[str, Any]) -> None:
    """The handler of ``django.task`` operations: import the task and call it (a plain def:
    it runs in the worker's thread pool)."""
    try:
        task = import_string(payload["task"])
    except (ImportError, KeyError) as exc:
        raise DoNotRetry(f"no task {payload.get('task')!r} to run: {exc}") from None
    if not isinstance(task, Task):
        raise DoNotRetry(f"{payload['task']!r} is not a django.tasks Task; it is not run")
    args, kwargs = payload["args"], payload["kwargs"]
    if task.takes_context:
        result = _result(task, str(ctx.operation_id), TaskResultStatus.RUNNING, args, kwargs)
        result.worker_ids.append(ctx.worker_id)
        task.call(TaskContext(task_result=result), *args, **kwargs)
    else:
        task.call(*args, **kwargs)


def tasks_router() -> WorkflowRouter:
    """A router with the handler of ``django.task`` operations (``pgoutbox_worker`` includes it
    when ``TASKS`` uses :class:`PgoutboxTaskBackend`)."""
    router = WorkflowRouter()
    router.on(TASK_OPERATION_TYPE)(run_task)
    return router
