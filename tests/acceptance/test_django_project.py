"""A Django project (tests/django_project: the example shop of examples/django_shop plus a command
that places orders through its view) used through its management commands, each a process of
its own, as a deploy would: Django's migrate, pgoutbox_upgrade, orders placed in a view
(publishing inside its atomic() block), and pgoutbox_worker handling them with def handlers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import django
import psycopg
import pytest

from pgoutbox import migrations
from pgoutbox.settings import DatabaseSettings, parse_dsn

PROJECT = Path(__file__).resolve().parents[1] / "django_project"


@pytest.fixture
async def shop_dsn(server_dsn: str) -> AsyncIterator[str]:
    """A fresh database for the project (Django's tables live in its public schema)."""
    name = f"shop_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        fields = DatabaseSettings(**{**parse_dsn(server_dsn), "database": name})
        user = fields.user + (f":{fields.password}" if fields.password else "")
        yield f"postgresql://{user}@/{name}?host={fields.host}&port={fields.port}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def manage(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``manage.py`` with ``args``; fail the test, showing its output, if it fails."""
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT,
        env={**os.environ, "SHOP_DSN": dsn},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"manage.py {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


def test_a_django_project_publishes_in_its_views_and_handles_with_its_worker(
    shop_dsn: str,
) -> None:
    manage(shop_dsn, "migrate", "--no-input")
    upgraded = manage(shop_dsn, "pgoutbox_upgrade")
    head = migrations.head_revision()
    assert upgraded.stdout.strip() == f"schema 'pgoutbox' upgraded from nothing to {head}"
    again = manage(shop_dsn, "pgoutbox_upgrade")
    assert again.stdout.strip() == f"schema 'pgoutbox' already at revision {head}"

    assert manage(shop_dsn, "place_order", "ada@example.com", "2500").stdout.startswith("200 ")
    failed = manage(shop_dsn, "place_order", "bob@example.com", "900", "--fail-after-publishing")
    assert failed.stdout.startswith("500 ")  # rolled back: the order and its operations
    assert manage(shop_dsn, "place_order", "cy@example.com", "4000").stdout.startswith("200 ")
    tasks = django.VERSION >= (6, 0)  # django.tasks: Django 6 needs Python 3.12+
    if tasks:
        assert manage(shop_dsn, "enqueue_task", "task@example.com", "1").stdout.startswith(
            "enqueued "
        )
        failed = manage(shop_dsn, "enqueue_task", "no@example.com", "2", "--fail-after-enqueueing")
        assert failed.stdout.strip() == "not enqueued: rolled back"

    with psycopg.connect(shop_dsn, autocommit=True) as conn:
        pending = conn.execute(
            "SELECT operation_type, state, (payload->>'order')::bigint "
            "FROM pgoutbox.operations WHERE operation_type LIKE 'shop.%' ORDER BY id"
        ).fetchall()
        enqueued = conn.execute(
            "SELECT payload FROM pgoutbox.operations WHERE operation_type = 'django.task'"
        ).fetchall()
        assert enqueued == (
            [
                (
                    {
                        "task": "testsite.tasks.record_order",
                        "args": ["task@example.com", 1],
                        "kwargs": {},
                        "queue": "default",
                        "backend": "default",
                    },
                )
            ]
            if tasks
            else []
        )
        orders = conn.execute("SELECT id, email FROM shop_order ORDER BY id").fetchall()
        assert [email for _, email in orders] == ["ada@example.com", "cy@example.com"]
        assert pending == [
            (kind, "pending", order_id)
            for order_id, _ in orders
            for kind in ("shop.charge", "shop.receipt")
        ]

        worker = subprocess.Popen(
            [sys.executable, "manage.py", "pgoutbox_worker"],
            cwd=PROJECT,
            env={**os.environ, "SHOP_DSN": shop_dsn},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            query = "SELECT count(*) FROM pgoutbox.operations WHERE state <> 'succeeded'"
            while conn.execute(query).fetchone() != (0,):
                assert worker.poll() is None, worker.communicate()[0]
                assert time.monotonic() < deadline, "operations not handled"
                time.sleep(0.1)
        finally:
            worker.send_signal(signal.SIGTERM)
            output = worker.communicate(timeout=60)[0]
        assert worker.returncode == 0, output

        handled = conn.execute("SELECT email, state, receipt_sent FROM shop_order ORDER BY id")
        assert sorted(handled.fetchall()) == [
            ("ada@example.com", "paid", True),
            ("cy@example.com", "paid", True),
            *([("task@example.com", "from-task", False)] if tasks else []),
        ]


@pytest.mark.parametrize("command", ["pgoutbox_upgrade", "pgoutbox_worker"])
def test_a_management_command_names_the_database_it_cannot_reach(command: str) -> None:
    # Port 1 on the loopback: nothing listens there, the connection is refused at once.
    result = subprocess.run(
        [sys.executable, "manage.py", command],
        cwd=PROJECT,
        env={**os.environ, "SHOP_DSN": "postgresql://shop@127.0.0.1:1/shop"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(
        "CommandError: cannot use PostgreSQL at 127.0.0.1:1 (database shop, user shop) "
        "(DATABASES['default']): ConnectionRefusedError"
    )
    assert "Traceback" not in result.stderr
