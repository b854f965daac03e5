"""Tests for pgoutbox.embedded: real throwaway PostgreSQL servers with each available backend."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from pgoutbox import embedded
from pgoutbox.embedded import Backend, EmbeddedPostgres, EmbeddedUnavailableError, start_embedded

HAVE_PGSERVER = importlib.util.find_spec("pgserver") is not None
BINDIR = embedded._find_bindir()


def _binaries_major() -> int:
    assert BINDIR is not None
    out = subprocess.run(
        [str(BINDIR / "pg_ctl"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"\)\s+(\d+)", out)
    assert match, out
    return int(match.group(1))


BACKENDS = [
    pytest.param(
        "pgserver",
        16,
        marks=pytest.mark.skipif(not HAVE_PGSERVER, reason="pgserver not installed"),
    ),
    pytest.param(
        "binaries",
        _binaries_major() if BINDIR else 0,
        marks=pytest.mark.skipif(BINDIR is None, reason="no PostgreSQL server binaries"),
    ),
]


def _server_version(dsn: str) -> tuple[int, str]:
    async def query() -> tuple[int, str]:
        conn = await asyncpg.connect(dsn)
        try:
            version: str = await conn.fetchval("select version()")
            num: int = await conn.fetchval("select current_setting('server_version_num')::int")
            return num // 10000, version
        finally:
            await conn.close()

    return asyncio.run(query())


@pytest.fixture
def persistent_dir() -> Iterator[Path]:
    # Not tmp_path: when running as root the server runs as another OS user, which must be
    # able to traverse the parent directory (pytest's are mode 0700).
    parent = Path(tempfile.mkdtemp(prefix="pgoutbox-test-"))
    parent.chmod(0o755)
    yield parent / "pgdata"
    shutil.rmtree(parent, ignore_errors=True)


@pytest.mark.parametrize(("backend", "major"), BACKENDS)
def test_throwaway_server_runs_and_is_cleaned_up(backend: Backend, major: int) -> None:
    pg = start_embedded(backend=backend)
    try:
        assert pg.backend == backend
        assert pg.dsn.startswith("postgresql://postgres@/postgres?host=/")
        assert (pg.data_dir / "PG_VERSION").is_file()
        got_major, version = _server_version(pg.dsn)
        assert version.startswith("PostgreSQL ")
        assert got_major == major
    finally:
        pg.stop()
    assert not pg.data_dir.exists()
    pg.stop()  # idempotent


@pytest.mark.parametrize(("backend", "major"), BACKENDS)
def test_persistent_data_dir_is_kept_and_reused(
    backend: Backend, major: int, persistent_dir: Path
) -> None:
    with start_embedded(persistent_dir, backend=backend) as pg:
        assert isinstance(pg, EmbeddedPostgres)

        async def create() -> None:
            conn = await asyncpg.connect(pg.dsn)
            await conn.execute("create table kept (x int); insert into kept values (42)")
            await conn.close()

        asyncio.run(create())
    assert (persistent_dir / "PG_VERSION").is_file()

    with start_embedded(persistent_dir, backend=backend) as pg:

        async def read() -> int:
            conn = await asyncpg.connect(pg.dsn)
            try:
                value: int = await conn.fetchval("select x from kept")
                return value
            finally:
                await conn.close()

        assert asyncio.run(read()) == 42
        assert _server_version(pg.dsn)[0] == major
    assert (persistent_dir / "PG_VERSION").is_file()


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql not installed")
def test_dsn_works_with_psql() -> None:
    with start_embedded() as pg:
        out = subprocess.run(
            ["psql", pg.dsn, "-Atc", "select 1"], capture_output=True, text=True, check=True
        )
    assert out.stdout.strip() == "1"


@pytest.fixture
def no_binaries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(embedded, "_PG_LIB_GLOB", str(tmp_path / "nothing" / "*" / "bin"))


@pytest.mark.usefixtures("no_binaries")
def test_missing_binaries_raise_helpful_error() -> None:
    with pytest.raises(EmbeddedUnavailableError) as excinfo:
        start_embedded(backend="binaries")
    message = str(excinfo.value)
    assert "initdb" in message
    assert "pip install 'pgoutbox[embedded]'" in message
    assert "PGOUTBOX_TEST_DSN" in message


def test_missing_pgserver_raises_helpful_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pgserver", None)  # makes `import pgserver` fail
    with pytest.raises(EmbeddedUnavailableError, match=r"pip install 'pgoutbox\[embedded\]'"):
        start_embedded(backend="pgserver")


@pytest.mark.usefixtures("no_binaries")
def test_auto_with_nothing_available_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pgserver", None)
    with pytest.raises(EmbeddedUnavailableError, match="PGOUTBOX_TEST_DSN"):
        start_embedded()


@pytest.mark.skipif(BINDIR is None, reason="no PostgreSQL server binaries")
def test_auto_falls_back_to_binaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pgserver", None)
    with start_embedded() as pg:
        assert pg.backend == "binaries"
        assert _server_version(pg.dsn)[0] == _binaries_major()


def test_temp_dirs_are_private_per_server() -> None:
    with start_embedded() as first, start_embedded() as second:
        assert first.dsn != second.dsn
        assert first.data_dir != second.data_dir
        assert os.path.isdir(first.data_dir)
