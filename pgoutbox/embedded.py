"""Throwaway real PostgreSQL servers for the demo and for tests when no DSN is configured.

Two backends are supported:

* ``pgserver`` (``pip install 'pgoutbox[embedded]'``), which bundles its own PostgreSQL;
* ``binaries``: the PostgreSQL server binaries (``initdb``/``pg_ctl``) installed on the machine.

Servers listen on a unix socket only, in a private directory, so they never clash with each
other or with a system PostgreSQL. Run ``python -m pgoutbox.embedded [DATA_DIR]`` to get one
by hand.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import quote

__all__ = ["Backend", "EmbeddedPostgres", "EmbeddedUnavailableError", "start_embedded"]

Backend = Literal["auto", "pgserver", "binaries"]
ShutdownMode = Literal["smart", "fast", "immediate"]  # pg_ctl -m

_PORT = 5432  # unique socket directory per server, so the default port never clashes
_PG_LIB_GLOB = "/usr/lib/postgresql/*/bin"  # Debian/Ubuntu layout
_OS_USER = "postgres"  # PostgreSQL refuses to run as root; this user runs it instead
_HOW_TO_FIX = (
    "install pgserver with `pip install 'pgoutbox[embedded]'`, or install the PostgreSQL "
    "server binaries (initdb, pg_ctl), or point pgoutbox at an existing server by setting "
    "PGOUTBOX_TEST_DSN (tests) or a DSN"
)


class EmbeddedUnavailableError(RuntimeError):
    """No way to start an embedded PostgreSQL server on this machine."""


class EmbeddedPostgres:
    """A running throwaway PostgreSQL server. Use as a context manager or call stop().

    ``dsn`` is a libpq-style URL such as
    ``postgresql://postgres@/postgres?host=/tmp/pgoutbox-abcd&port=5432`` that works with both
    ``asyncpg.connect()`` and ``psql``; ``backend`` is ``"pgserver"`` or ``"binaries"``.
    """

    def __init__(
        self,
        dsn: str,
        backend: str,
        data_dir: Path,
        stopper: Callable[[], None],
        restarter: Callable[[ShutdownMode], None] | None = None,
    ) -> None:
        self.dsn = dsn
        self.backend = backend
        self.data_dir = data_dir
        self._stopper: Callable[[], None] | None = stopper
        self._restarter = restarter

    def restart(self, mode: ShutdownMode = "fast") -> None:
        """Restart the server in place (``pg_ctl restart -m MODE``): same data, same address.

        ``fast`` disconnects clients and shuts down cleanly; ``immediate`` aborts every process
        without a checkpoint, so the server starts with crash recovery. For fault-injection
        tests; only the ``binaries`` backend supports it.
        """
        if mode not in get_args(ShutdownMode):
            raise ValueError(f"invalid shutdown mode {mode!r}: one of {get_args(ShutdownMode)}")
        if self._restarter is None or self._stopper is None:
            raise RuntimeError(
                f"restart() is not available for a {self.backend} server that is "
                "stopped or not started from the server binaries"
            )
        self._restarter(mode)

    def stop(self) -> None:
        """Stop the server and delete its data directory unless the caller supplied it.

        Calling it more than once is harmless.
        """
        stopper, self._stopper = self._stopper, None
        if stopper is not None:
            stopper()

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(backend={self.backend!r}, dsn={self.dsn!r})"


def start_embedded(
    data_dir: str | os.PathLike[str] | None = None, *, backend: Backend = "auto"
) -> EmbeddedPostgres:
    """Start (or reuse, when ``data_dir`` already holds a cluster) an embedded server.

    With ``data_dir=None`` the cluster lives in a fresh temporary directory removed by stop();
    otherwise the data is kept. ``backend="auto"`` prefers pgserver and falls back to the
    machine's server binaries. Note that a data directory can only be reused by the same
    PostgreSQL major version that created it. Raises EmbeddedUnavailableError when the chosen
    backend cannot be used.
    """
    if backend in ("auto", "pgserver"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR unset
                import pgserver
        except ImportError:
            if backend == "pgserver":
                raise EmbeddedUnavailableError(
                    f"pgserver is not installed; {_HOW_TO_FIX}."
                ) from None
        else:
            return _start_pgserver(pgserver, data_dir)
    return _start_binaries(data_dir)


def _dsn(socket_dir: str | os.PathLike[str], port: int | None) -> str:
    host = quote(os.fspath(socket_dir), safe="/")
    return f"postgresql://postgres@/postgres?host={host}&port={port or _PORT}"


def _start_pgserver(pgserver: Any, data_dir: str | os.PathLike[str] | None) -> EmbeddedPostgres:
    persistent = data_dir is not None
    pgdata = Path(data_dir) if data_dir is not None else Path(tempfile.mkdtemp(prefix="pgoutbox-"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        server = pgserver.get_server(pgdata, cleanup_mode="stop" if persistent else "delete")
    info = server.get_postmaster_info()
    if info.socket_dir is None:  # pgserver only uses TCP on Windows
        dsn = f"postgresql://postgres@{info.hostname}:{info.port}/postgres"
    else:
        dsn = _dsn(info.socket_dir, info.port)
    return EmbeddedPostgres(dsn, "pgserver", pgdata.resolve(), server.cleanup)


def _find_bindir() -> Path | None:
    """Locate a directory holding initdb and pg_ctl: PATH, Debian's layout, then pg_config."""
    candidates = sorted(
        (Path(p) for p in glob.glob(_PG_LIB_GLOB)),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else -1,
    )
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        candidates.insert(0, Path(out.stdout.strip()))
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:  # resolve symlinks such as /usr/local/bin/pg_ctl -> /usr/lib/postgresql/15/bin
        candidates.append(Path(pg_ctl).resolve().parent)
    for bindir in reversed(candidates):  # PATH, newest Debian version, then pg_config
        if (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file():
            return bindir
    return None


def _start_binaries(data_dir: str | os.PathLike[str] | None) -> EmbeddedPostgres:
    bindir = _find_bindir()
    if bindir is None:
        raise EmbeddedUnavailableError(
            f"No PostgreSQL server binaries (initdb, pg_ctl) found on PATH, in {_PG_LIB_GLOB} "
            f"or via pg_config; {_HOW_TO_FIX}."
        )
    as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    prefix = ["runuser", "-u", _OS_USER, "--"] if as_root else []
    # The private directory holds the socket, the log and (when not persistent) the cluster.
    workdir = Path(tempfile.mkdtemp(prefix="pgoutbox-"))
    pgdata = Path(data_dir).resolve() if data_dir is not None else workdir / "data"
    pgdata.mkdir(parents=True, exist_ok=True)
    if as_root:
        for path in (workdir, pgdata):
            shutil.chown(path, _OS_USER, _OS_USER)

    log = workdir / "postgres.log"

    def run(*args: str) -> None:
        cmd = [*prefix, str(bindir / args[0]), *args[1:]]
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            detail = proc.stderr + (log.read_text() if log.exists() else "")
            raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{detail}")

    initdb = ["initdb", "-D", str(pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8"]
    options = f"-k {shlex.quote(str(workdir))} -c listen_addresses='' -p {_PORT} -c fsync=off"
    try:
        if not (pgdata / "PG_VERSION").exists():
            run(*initdb, "--no-sync")
        # -l is required: otherwise the server inherits and holds open our stdout pipe.
        run("pg_ctl", "-w", "-D", str(pgdata), "-l", str(log), "-o", options, "start")
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise

    def stopper() -> None:
        try:
            run("pg_ctl", "-w", "-D", str(pgdata), "-m", "fast", "stop")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def restarter(mode: ShutdownMode) -> None:
        run("pg_ctl", "-w", "-D", str(pgdata), "-l", str(log), "-m", mode, "-o", options, "restart")

    return EmbeddedPostgres(_dsn(workdir, _PORT), "binaries", pgdata, stopper, restarter)


if __name__ == "__main__":
    with start_embedded(sys.argv[1] if len(sys.argv) > 1 else None) as pg:
        print(f"{pg.backend}: {pg.dsn}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
