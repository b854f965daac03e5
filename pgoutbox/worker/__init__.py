"""Workers: the dispatcher, its background services and ``WorkflowSystem``."""

from pgoutbox.worker.system import SchemaNotReady, WorkflowSystem

__all__ = ["SchemaNotReady", "WorkflowSystem"]
