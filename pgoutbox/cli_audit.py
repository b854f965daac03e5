"""``pgoutbox audit keygen | checkpoint | prove | check-proof | as-of | archive``, and ``audit
verify --checkpoint / --archive``: the anchored audit (pgoutbox/anchor.py, pgoutbox/archive.py,
docs/audit.md).

Usage::

    pgoutbox audit keygen -o /secure/audit            # audit.key (secret) and audit.pub
    pgoutbox audit checkpoint --key /secure/audit.key -o cp-2026-12-03.json
    pgoutbox audit verify --checkpoint cp-2026-12-03.json --public-key audit.pub
    pgoutbox audit prove 1207 --checkpoint cp-2026-12-03.json -o proof-1207.json
    pgoutbox audit check-proof proof-1207.json --public-key audit.pub     # no database
    pgoutbox audit as-of 2026-11-30T12:00Z --type charge
    pgoutbox audit archive --before 2026-10 -o /archive/2026-09 --key /secure/audit.key
    pgoutbox audit verify --archive /archive/2026-09 --public-key audit.pub

A checkpoint is two files: the signed JSON document and its heads file (``<name>.heads.gz``,
one line per operation), kept together where the database's owner cannot write.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import asyncpg
import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

import pgoutbox_proof as proof
from pgoutbox import anchor, archive
from pgoutbox.audit import AuditProblem
from pgoutbox.cli_errors import DATABASE_ERRORS, CliError, Refused, database_error
from pgoutbox.db import create_pool
from pgoutbox.settings import DatabaseSettings

T = TypeVar("T")


class _HasDatabase(Protocol):
    def database(self) -> DatabaseSettings: ...


def _run(obj: _HasDatabase, action: Callable[[asyncpg.Connection, str], Awaitable[T]]) -> T:
    """Run ``action(conn, schema)`` on one connection; a database that cannot be reached or
    used exits 2 naming the server, a checkpoint that does not check exits 1 naming it."""
    import asyncio

    settings = obj.database()

    async def go() -> T:
        pool = await create_pool(settings, max_size=1)
        try:
            async with pool.acquire() as conn:
                return await action(conn, settings.schema_name)
        finally:
            await pool.close()

    try:
        return asyncio.run(go())
    except anchor.CheckpointError as exc:
        raise Refused(str(exc)) from None
    except DATABASE_ERRORS as exc:
        raise database_error(exc, settings) from exc


def _public_key(path: str) -> Any:
    try:
        return proof.load_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise CliError(f"cannot read the public key {path!r}: {exc}") from None
    except (proof.ProofError, ValueError) as exc:
        raise CliError(f"public key {path!r}: {exc}") from None


def _progress(label: str) -> tuple[Progress | None, Callable[[int], None] | None]:
    """A row counter on standard error when it is a terminal (else nothing)."""
    console = Console(stderr=True)
    if not console.is_terminal:
        return None, None
    bar = Progress(
        SpinnerColumn(), TextColumn(label + " {task.completed:,} rows"), TimeElapsedColumn()
    )
    task = bar.add_task(label, total=None)
    return bar, lambda rows: bar.update(task, completed=rows)


@click.command("keygen")
@click.option(
    "-o",
    "--output",
    "prefix",
    required=True,
    metavar="PREFIX",
    help="Writes PREFIX.key (the secret signing key, mode 600) and PREFIX.pub.",
)
def keygen(prefix: str) -> None:
    """Create an Ed25519 key pair for signing checkpoints. Keep the .key away from the
    database's owner (the signer's host, a secret store); give the .pub to auditors."""
    private_path, public_path = Path(prefix + ".key"), Path(prefix + ".pub")
    for path in (private_path, public_path):
        if path.exists():
            raise CliError(f"{str(path)!r} exists already: choose another PREFIX (nothing written)")
    try:
        private, public = anchor.generate_key()
    except anchor.CheckpointError as exc:
        raise CliError(str(exc)) from None
    try:
        private_path.touch(mode=0o600)
        private_path.write_bytes(private)
        public_path.write_bytes(public)
    except OSError as exc:
        raise CliError(f"cannot write the key pair at {prefix!r}: {exc}") from None
    key = proof.load_public_key(public)
    click.echo(
        f"wrote {private_path} (secret) and {public_path}; key id "
        f"{proof.key_id(proof.public_key_raw(key))}"
    )


@click.command("checkpoint")
@click.option(
    "--key",
    "key_path",
    metavar="FILE",
    help="The signing key (PEM); default: the PGOUTBOX_AUDIT_KEY environment variable.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, writable=True),
    help="The checkpoint's JSON file; its heads go next to it as NAME.heads.gz.",
)
@click.option(
    "--no-record", is_flag=True, help="Do not keep a copy in the database's audit_checkpoints."
)
@click.pass_obj
def checkpoint(obj: _HasDatabase, key_path: str | None, output: str, no_record: bool) -> None:
    """Sign a Merkle root over every operation's audit chain head in one snapshot, and write
    the checkpoint (JSON) and its heads file. Store both where the database's owner cannot
    write."""
    try:
        key = anchor.private_key_from(key_path)
    except anchor.CheckpointError as exc:
        raise CliError(str(exc)) from None
    path = Path(output)
    heads = anchor.heads_path_for(path)
    bar, advance = _progress("reading chain heads")

    async def take(conn: asyncpg.Connection, schema: str) -> dict[str, Any]:
        document = await anchor.take_checkpoint(
            conn, schema, key, heads, record=not no_record, progress=advance
        )
        anchor.write_checkpoint(document, path)
        return document

    if bar is not None:
        with bar:
            document = _run(obj, take)
    else:
        document = _run(obj, take)
    click.echo(
        f"checkpoint {path} ({heads.name}): {document['size']} operations, "
        f"{document['rows']} audit rows, root {document['root']}, taken at "
        f"{document['taken_at']}"
    )


def verify_against(
    obj: _HasDatabase,
    checkpoint_file: str | None,
    public_key: str | None,
    heads: str | None,
    archives: tuple[str, ...] = (),
) -> None:
    """``audit verify --checkpoint FILE --public-key KEY`` (or ``--rules`` alone, without a
    checkpoint; ``--archive DIR`` also proves each archive's files and the database's record of
    it): exit 1 with one FAILED line per problem (operation, seq, rule), else one OK line."""
    if public_key is None and archives:
        raise click.UsageError("--archive DIR needs --public-key KEY (the archive's signer)")
    if (checkpoint_file is None) != (public_key is None) and not archives:
        raise click.UsageError("--checkpoint FILE and --public-key KEY go together")
    document: dict[str, Any] | None = None
    head_stream: Iterator[anchor.Head] | None = None
    manifests: list[dict[str, Any]] = []
    if archives and public_key is not None:
        key = _public_key(public_key)
        try:
            manifests = [archive.read_manifest(Path(d), key) for d in archives]
        except anchor.CheckpointError as exc:
            raise Refused(str(exc)) from None
    if checkpoint_file is not None and public_key is not None:
        key = _public_key(public_key)
        try:
            document = anchor.read_checkpoint(Path(checkpoint_file), key)
            heads_path = (
                Path(heads)
                if heads
                else Path(checkpoint_file).with_name(str(document.get("heads_file", "")))
            )
            head_stream = anchor.read_heads(heads_path)
        except anchor.CheckpointError as exc:
            raise Refused(str(exc)) from None  # the check failed: exit 1, as a broken chain does
    bar, advance = _progress("verifying audit chains")

    async def walk(conn: asyncpg.Connection, schema: str) -> anchor.AnchoredVerification:
        result = await anchor.verify_against_checkpoint(
            conn, schema, document, head_stream, progress=advance
        )
        for manifest in manifests:
            if manifest["schema"] != schema:
                raise anchor.CheckpointError(
                    f"archive {manifest['archive_id']} is of schema {manifest['schema']!r}, "
                    f"not {schema!r}"
                )
            for failure in await archive.verify_archive_heads(conn, schema, manifest):
                result.problems.append(AuditProblem(0, 0, f"[archive] {failure}"))
        return result

    if bar is not None:
        with bar:
            result = _run(obj, walk)
    else:
        result = _run(obj, walk)
    report(result)


def report(result: anchor.AnchoredVerification) -> None:
    """Print a walk's outcome; exit 1 on any problem."""
    if not result.ok:
        for failure in result.failures():
            click.echo(f"FAILED: {failure}", err=True)
        if len(result.problems) >= anchor.MAX_PROBLEMS:
            click.echo(f"(the first {anchor.MAX_PROBLEMS} problems only)", err=True)
        sys.exit(1)
    where = ""
    if result.checkpoint is not None:
        where = (
            f"; {result.covered_operations} operations as the checkpoint of "
            f"{result.checkpoint['taken_at']} covered them"
        )
    click.echo(f"OK: {result.rows} audit rows of {result.operations} operations verified{where}")


@click.command("prove")
@click.argument("operation_id", type=click.IntRange(min=1, max=2**63 - 1))
@click.option("--checkpoint", "checkpoint_file", required=True, type=click.Path(dir_okay=False))
@click.option("--heads", type=click.Path(dir_okay=False), help="Default: the checkpoint's own.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, writable=True))
@click.pass_obj
def prove(
    obj: _HasDatabase,
    operation_id: int,
    checkpoint_file: str,
    heads: str | None,
    output: str,
) -> None:
    """Write an inclusion proof of OPERATION_ID's audit rows covered by a checkpoint, which
    `pgoutbox audit check-proof` (or `python -m pgoutbox_proof`) checks without the
    database."""
    try:
        document = json.loads(Path(checkpoint_file).read_text(encoding="utf-8"))
        heads_path = (
            Path(heads) if heads else Path(checkpoint_file).with_name(document["heads_file"])
        )
        anchor.read_heads(heads_path)  # a missing or foreign heads file fails here
    except anchor.CheckpointError as exc:
        raise Refused(str(exc)) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CliError(f"cannot read the checkpoint {checkpoint_file!r}: {exc}") from None

    async def build(conn: asyncpg.Connection, schema: str) -> dict[str, Any]:
        return await anchor.prove(conn, schema, operation_id, document, heads_path)

    result = _run(obj, build)
    Path(output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    click.echo(
        f"proof {output}: operation {operation_id}, rows 1 to {len(result['rows'])}, leaf "
        f"{result['leaf_index']} of {document['size']}"
    )


@click.command("check-proof")
@click.argument("proof_file", type=click.Path(dir_okay=False))
@click.option("--public-key", required=True, type=click.Path(dir_okay=False))
def check_proof(proof_file: str, public_key: str) -> None:
    """Check a proof offline (no database): the checkpoint's signature, the rows' hash chain,
    the intent and the path to the signed root. Exit 1 naming what failed."""
    key = _public_key(public_key)
    try:
        document = json.loads(Path(proof_file).read_text(encoding="utf-8"))
        click.echo(proof.check_proof(document, key))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        click.echo(f"FAILED: {exc}", err=True)
        sys.exit(1)


def _instant(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not an ISO-8601 time: write e.g. 2026-11-30T12:00Z"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@click.command("as-of")
@click.argument("instant")
@click.option("--type", "types", multiple=True, help="Only this operation type (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Every operation's state, as JSON.")
@click.pass_obj
def as_of(obj: _HasDatabase, instant: str, types: tuple[str, ...], as_json: bool) -> None:
    """The state of every operation at INSTANT (ISO-8601, UTC unless it has an offset), from
    the audit log alone, with counts by state."""
    at = _instant(instant)

    async def read(conn: asyncpg.Connection, schema: str) -> anchor.HistoryAsOf:
        return await anchor.as_of(conn, schema, at, types=list(types))

    history = _run(obj, read)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "at": history.at.isoformat(),
                    "counts": history.counts,
                    "operations": [
                        {
                            "operation_id": o.operation_id,
                            "operation_type": o.operation_type,
                            "state": o.state,
                            "seq": o.seq,
                            "since": o.since.isoformat(),
                        }
                        for o in history.operations
                    ],
                },
                indent=2,
            )
        )
        return
    click.echo(f"as of {history.at.isoformat()}: {len(history.operations)} operations")
    for state, count in history.counts.items():
        click.echo(f"  {state:<12} {count}")


@click.command("archive")
@click.option(
    "--before",
    "month",
    required=True,
    metavar="YYYY-MM",
    help="Archive every month before this one (UTC): 2026-10 takes September and earlier.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False),
    help="A new or empty directory for the CSV files, the checkpoint and the signed manifest.",
)
@click.option(
    "--key",
    "key_path",
    type=click.Path(dir_okay=False),
    help="The Ed25519 private key (PEM); default: the PGOUTBOX_AUDIT_KEY environment variable.",
)
@click.pass_obj
def archive_command(obj: _HasDatabase, month: str, output: str, key_path: str | None) -> None:
    """Export the audit log's months before YYYY-MM to CSV files with a signed checkpoint
    covering them, verify the export and what is left against it, then drop those months'
    partitions. Run as the schema's owner; store DIR where the owner cannot write."""
    try:
        before = archive.parse_month(month)
        key = anchor.private_key_from(key_path)
    except (archive.ArchiveError, anchor.CheckpointError) as exc:
        raise CliError(str(exc)) from None

    async def run(conn: asyncpg.Connection, schema: str) -> archive.ArchiveResult:
        return await archive.archive(
            conn, schema, before, Path(output), key, progress=lambda m: click.echo(m, err=True)
        )

    try:
        result = _run(obj, run)
    except archive.ArchiveError as exc:
        raise Refused(str(exc)) from None
    click.echo(
        f"archive {result.archive_id}: {result.rows} audit rows of {result.operations} "
        f"operations recorded before {before:%Y-%m-%d} ({', '.join(result.partitions)}) are in "
        f"{result.directory}, verified, and dropped from the database"
    )


def register(audit: click.Group) -> None:
    """Add the anchored audit's commands to the ``audit`` group."""
    for command in (keygen, checkpoint, prove, check_proof, as_of, archive_command):
        audit.add_command(command)
