"""The one SQL layer: named queries loaded once from ``queries.sql``.

A query is written once with ``:name`` parameters and ``{s}`` for the schema, and rendered for
either driver: ``$1, $2, ...`` for asyncpg (the hot path), a SQLAlchemy ``TextClause`` (the
user's session, for publishing) or ``%(name)s`` for psycopg 3 (a synchronous publisher's own
connection). A line holding only ``{other_query}`` is replaced by that
query's statement, so one statement can run another as a CTE without restating it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from asyncpg import Connection, Record
from sqlalchemy import TextClause, text

from pgoutbox.migrations import quote_schema

_BLOCK = re.compile(r"^-- name: (\w+)\n((?:--[^\n]*\n)*)(.*?)(?=^-- name: |\Z)", re.M | re.S)
# `{name}` on a line of its own: another query's statement, used as a CTE of this one.
_INCLUDE = re.compile(r"^\{(\w+)\}$", re.M)
# `:name` but not the `::` of a cast.
_PARAM = re.compile(r"(?<![:\w]):([a-z_][a-z0-9_]*)")


@dataclass(frozen=True)
class Query:
    """One named statement, rendered for one schema."""

    name: str
    sql: str  # with :name parameters and the schema filled in
    params: tuple[str, ...]  # distinct parameter names, in order of first use
    asyncpg_sql: str  # the same with $1.. placeholders
    psycopg_sql: str = ""  # the same with %(name)s placeholders (and % doubled)

    def args(self, **values: Any) -> list[Any]:
        """Positional arguments for asyncpg, in ``$n`` order."""
        return [values[name] for name in self.params]

    def clause(self) -> TextClause:
        """The statement for ``session.execute(query.clause(), {...})``."""
        return text(self.sql)

    async def fetch(self, conn: Connection, **values: Any) -> list[Record]:
        """Run on an asyncpg connection (or pool); every row."""
        rows: list[Record] = await conn.fetch(self.asyncpg_sql, *self.args(**values))
        return rows

    async def fetchrow(self, conn: Connection, **values: Any) -> Record | None:
        """Run on an asyncpg connection (or pool); the first row, or None."""
        row: Record | None = await conn.fetchrow(self.asyncpg_sql, *self.args(**values))
        return row

    async def fetchval(self, conn: Connection, **values: Any) -> Any:
        """Run on an asyncpg connection (or pool); the first column of the first row."""
        return await conn.fetchval(self.asyncpg_sql, *self.args(**values))

    async def execute(self, conn: Connection, **values: Any) -> str:
        """Run on an asyncpg connection (or pool); the command's status."""
        status: str = await conn.execute(self.asyncpg_sql, *self.args(**values))
        return status


@functools.cache
def _raw() -> dict[str, str]:
    source = resources.files(__package__).joinpath("queries.sql").read_text()
    bodies = {m.group(1): m.group(3).strip().rstrip(";") for m in _BLOCK.finditer(source)}
    return {name: _INCLUDE.sub(lambda m: bodies[m.group(1)], body) for name, body in bodies.items()}


def _positional(names: tuple[str, ...]) -> Callable[[re.Match[str]], str]:
    return lambda match: f"${names.index(match.group(1)) + 1}"


@functools.cache
def queries(schema: str) -> dict[str, Query]:
    """Every named query, rendered for ``schema`` (validated and quoted)."""
    quoted = quote_schema(schema)
    rendered: dict[str, Query] = {}
    for name, body in _raw().items():
        sql = body.replace("{s}", quoted)
        names = tuple(dict.fromkeys(_PARAM.findall(sql)))
        asyncpg_sql = _PARAM.sub(_positional(names), sql)
        psycopg_sql = _PARAM.sub(r"%(\1)s", sql.replace("%", "%%"))
        rendered[name] = Query(name, sql, names, asyncpg_sql, psycopg_sql)
    return rendered
