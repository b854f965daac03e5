"""Schema integrity: pgoutbox's triggers and functions are still the ones its migrations made.

The database enforces the audit log with triggers, and the schema's owner can weaken them
without a trace in the log: ``DISABLE TRIGGER USER`` then ``ENABLE TRIGGER USER`` turns the
``ENABLE ALWAYS`` triggers into ordinary ones (which ``session_replication_role = replica``
then skips), ``CREATE OR REPLACE FUNCTION`` swaps a trigger function's body, ``ALTER FUNCTION``
drops its ``SECURITY DEFINER`` or ``search_path``, a trigger can be dropped, or one added.

:func:`check_schema_integrity` compares what the catalog holds for the schema -- every trigger
on its tables, every function in it, and the rules, row-level security and policies on its
tables -- with a manifest shipped inside the package (``pgoutbox/migrations/integrity.json``),
never with anything stored in the database, which the owner could rewrite as well. The manifest
has one entry per revision: what a schema migrated to that revision holds. Names of the schema
itself are replaced by a placeholder, so any schema name gives the same entry.

The manifest is generated, never edited: ``python -m pgoutbox.integrity --write DSN`` migrates
a throwaway schema on that server through every revision, reads the catalog after each and
writes the file; ``--check DSN`` says whether the shipped file is still what the migrations
produce. Run ``--write`` after adding or changing a migration.

What this does not cover: an owner who can change the database can usually also change the
host, the installed package or the pgoutbox version that checks; this finds quiet weakening
inside the database, not a compromised host.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import re
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg

from pgoutbox.settings import DatabaseSettings, validate_identifier

__all__ = [
    "MANIFEST_PATH",
    "REGENERATE_COMMAND",
    "FunctionState",
    "IntegrityProblem",
    "RelationState",
    "SchemaState",
    "TriggerState",
    "build_manifest",
    "check",
    "check_schema_integrity",
    "compare_states",
    "defining_revisions",
    "load_manifest",
    "manifest_differences",
    "manifest_text",
    "parse_manifest",
    "read_schema_state",
    "report",
]

MANIFEST_PATH = Path(__file__).resolve().parent / "migrations" / "integrity.json"
MANIFEST_FORMAT = 1
REGENERATE_COMMAND = "python -m pgoutbox.integrity --write DSN"

# The schema's own name, wherever a definition spells it, becomes this. Every "@" already in a
# text is doubled first, so two different texts never normalise to the same one.
_PLACEHOLDER = "@schema@"

# pg_trigger.tgenabled: what ALTER TABLE ... <this> TRIGGER sets it, and how it reads.
_ENABLED = {
    "A": ("ENABLE ALWAYS", "ENABLE ALWAYS"),
    "O": ("ENABLE", "ENABLE (origin only)"),
    "R": ("ENABLE REPLICA", "ENABLE REPLICA (replica only)"),
    "D": ("DISABLE", "DISABLED"),
}
_ENABLED_WORDS = {"A": "always", "O": "origin", "R": "replica", "D": "disabled"}
_ENABLED_LETTERS = {word: letter for letter, word in _ENABLED_WORDS.items()}

_KINDS = {"f": "function", "p": "procedure", "a": "aggregate", "w": "window function"}
_VOLATILITY = {"i": "immutable", "s": "stable", "v": "volatile"}
_PARALLEL = {"s": "safe", "r": "restricted", "u": "unsafe"}


@dataclass(frozen=True)
class TriggerState:
    """One trigger on a table of the schema, as the catalog describes it."""

    table: str
    name: str
    enabled: str  # always, origin, replica or disabled (pg_trigger.tgenabled A, O, R, D)
    definition: str  # pg_get_triggerdef with the schema in search_path: no schema name


@dataclass(frozen=True)
class FunctionState:
    """One function of the schema: everything that decides what calling it does."""

    signature: str  # name(argument types), as regprocedure prints it
    kind: str
    language: str
    arguments: str
    result: str | None
    security_definer: bool
    config: tuple[str, ...]  # its SET clauses, e.g. "search_path=pg_catalog, pg_temp"
    volatility: str
    strict: bool
    leakproof: bool
    parallel: str
    body_sha256: str  # of its source text (prosrc), the schema's name replaced


@dataclass(frozen=True)
class RelationState:
    """A rule, a row-level security policy, or row-level security switched on, on a table."""

    kind: str  # "rule", "policy" or "row-level security"
    table: str
    name: str
    definition: str


@dataclass(frozen=True)
class SchemaState:
    """What the catalog says of a schema's triggers, functions, rules and row security."""

    triggers: tuple[TriggerState, ...]
    functions: tuple[FunctionState, ...]
    relations: tuple[RelationState, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The manifest entry for this state (lists sorted, so the file diffs well)."""
        return {
            "triggers": [asdict(t) for t in sorted(self.triggers, key=_trigger_key)],
            "functions": [
                {**asdict(f), "config": list(f.config)}
                for f in sorted(self.functions, key=lambda f: f.signature)
            ],
            "relations": [asdict(r) for r in sorted(self.relations, key=_relation_key)],
        }

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> SchemaState:
        """The state a manifest entry describes."""
        return cls(
            triggers=tuple(TriggerState(**t) for t in entry["triggers"]),
            functions=tuple(
                FunctionState(**{**f, "config": tuple(f["config"])}) for f in entry["functions"]
            ),
            relations=tuple(RelationState(**r) for r in entry.get("relations", ())),
        )


@dataclass(frozen=True)
class IntegrityProblem:
    """One way the schema differs from what its revision installed.

    ``subject`` names the object ("trigger a_operations_immutable on pgoutbox.operations"),
    ``problem`` what is wrong with it, ``fix`` (when there is a one-line fix) what to run.
    """

    subject: str
    problem: str
    fix: str | None = None

    def __str__(self) -> str:
        text = f"{self.subject} {self.problem}"
        return f"{text}: {self.fix}" if self.fix else text


# -- reading the catalog -------------------------------------------------------------------------

# A partition's copy of its table's trigger (tgparentid) is reported as the table's (the
# partition's name in its definition made the table's): one line per trigger whatever the number
# of partitions, unless a copy differs from the table's, which is then reported instead.
_TRIGGERS = """
SELECT c.relname, t.tgname, t.tgenabled::pg_catalog.text AS tgenabled,
       pg_catalog.pg_get_triggerdef(t.oid, true) AS definition,
       pt.relname AS parent
FROM pg_catalog.pg_trigger t
JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.tgrelid
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
LEFT JOIN pg_catalog.pg_trigger parent_trigger
    ON parent_trigger.oid OPERATOR(pg_catalog.=) t.tgparentid
LEFT JOIN pg_catalog.pg_class pt ON pt.oid OPERATOR(pg_catalog.=) parent_trigger.tgrelid
WHERE n.nspname OPERATOR(pg_catalog.=) $1 AND NOT t.tgisinternal
"""

_FUNCTIONS = """
SELECT p.proname, p.oid::pg_catalog.regprocedure::pg_catalog.text AS identity,
       pg_catalog.pg_get_function_arguments(p.oid) AS arguments,
       pg_catalog.pg_get_function_result(p.oid) AS result,
       p.prokind::pg_catalog.text AS prokind, l.lanname, p.prosecdef, p.proconfig,
       p.provolatile::pg_catalog.text AS provolatile, p.proisstrict, p.proleakproof,
       p.proparallel::pg_catalog.text AS proparallel, p.prosrc
FROM pg_catalog.pg_proc p
JOIN pg_catalog.pg_language l ON l.oid OPERATOR(pg_catalog.=) p.prolang
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
WHERE n.nspname OPERATOR(pg_catalog.=) $1
"""

_RULES = """
SELECT c.relname, r.rulename, r.ev_enabled::pg_catalog.text AS ev_enabled,
       pg_catalog.pg_get_ruledef(r.oid, true) AS definition
FROM pg_catalog.pg_rewrite r
JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) r.ev_class
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE n.nspname OPERATOR(pg_catalog.=) $1 AND r.rulename OPERATOR(pg_catalog.<>) '_RETURN'
"""

_POLICIES = """
SELECT c.relname, p.polname, p.polcmd::pg_catalog.text AS polcmd, p.polpermissive,
       ARRAY(SELECT CASE WHEN r OPERATOR(pg_catalog.=) 0 THEN 'public'
                         ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(r)) END
             FROM pg_catalog.unnest(p.polroles) AS r ORDER BY 1) AS roles,
       pg_catalog.pg_get_expr(p.polqual, p.polrelid, true) AS using_expr,
       pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid, true) AS check_expr
FROM pg_catalog.pg_policy p
JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) p.polrelid
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE n.nspname OPERATOR(pg_catalog.=) $1
"""

_ROW_SECURITY = """
SELECT c.relname, c.relforcerowsecurity
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
WHERE n.nspname OPERATOR(pg_catalog.=) $1 AND c.relrowsecurity
"""

_POLICY_COMMANDS = {"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE", "*": "ALL"}
_RULE_ENABLED = {"O": "", "D": " (disabled)", "R": " (ENABLE REPLICA)", "A": " (ENABLE ALWAYS)"}


def _normalise(text: str, schema: str) -> str:
    """``text`` with the schema's quoted name (as the migrations write it) replaced by the
    placeholder; every "@" doubled first, so distinct texts stay distinct."""
    return text.replace("@", "@@").replace(f'"{schema}"', _PLACEHOLDER)


def _denormalise(text: str, quoted_schema: str) -> str:
    """A normalised text as it reads in the schema ``quoted_schema`` (for messages)."""
    return re.sub("@@|" + _PLACEHOLDER, lambda m: "@" if m[0] == "@@" else quoted_schema, text)


def _normalise_setting(setting: str, schema: str, quoted: str) -> str:
    """One ``name=value`` of a function's SET clauses, normalised: in ``search_path`` the schema
    is an element, quoted only when it needs to be."""
    name, _, value = setting.partition("=")
    if name != "search_path":
        return f"{name}={_normalise(value, schema)}"
    elements = [element.strip() for element in value.split(",")]
    return "search_path=" + ", ".join(
        _PLACEHOLDER if element in (quoted, f'"{schema}"') else element.replace("@", "@@")
        for element in elements
    )


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


async def read_schema_state(conn: asyncpg.Connection, schema: str) -> SchemaState:
    """What the catalog holds for ``schema``: every non-internal trigger on its tables, every
    function in it, its tables' rules, policies and row-level security.

    Definitions are read with the schema in ``search_path`` (after pg_catalog; restored
    afterwards), so PostgreSQL prints the schema's own objects without its name and any schema
    name gives the same state. Any role with USAGE on the schema can read it: the catalogs and
    ``pg_get_*def`` are open to everyone.
    """
    schema = validate_identifier(schema, "schema name")
    async with conn.transaction():
        quoted: str = await conn.fetchval("SELECT pg_catalog.quote_ident($1)", schema)
        previous: str = await conn.fetchval("SELECT pg_catalog.current_setting('search_path')")
        # pg_catalog first: the queries below resolve nothing to the schema's own objects.
        await conn.execute(
            "SELECT pg_catalog.set_config('search_path', $1, true)",
            f"pg_catalog, {quoted}, pg_temp",
        )
        triggers = await conn.fetch(_TRIGGERS, schema)
        functions = await conn.fetch(_FUNCTIONS, schema)
        rules = await conn.fetch(_RULES, schema)
        policies = await conn.fetch(_POLICIES, schema)
        row_security = await conn.fetch(_ROW_SECURITY, schema)
        await conn.execute("SELECT pg_catalog.set_config('search_path', $1, true)", previous)

    def norm(text: str) -> str:
        return _normalise(text, schema)

    relations = [
        RelationState(
            "rule",
            r["relname"],
            r["rulename"],
            norm(r["definition"]) + _RULE_ENABLED.get(r["ev_enabled"], f" ({r['ev_enabled']})"),
        )
        for r in rules
    ]
    relations += [
        RelationState(
            "policy",
            p["relname"],
            p["polname"],
            norm(
                f"AS {'PERMISSIVE' if p['polpermissive'] else 'RESTRICTIVE'} "
                f"FOR {_POLICY_COMMANDS.get(p['polcmd'], p['polcmd'])} "
                f"TO {', '.join(p['roles'])}"
                + (f" USING ({p['using_expr']})" if p["using_expr"] is not None else "")
                + (f" WITH CHECK ({p['check_expr']})" if p["check_expr"] is not None else "")
            ),
        )
        for p in policies
    ]
    relations += [
        RelationState(
            "row-level security",
            r["relname"],
            "",
            "ENABLE, FORCE" if r["relforcerowsecurity"] else "ENABLE",
        )
        for r in row_security
    ]
    states: dict[tuple[str, str], TriggerState] = {}
    copies = []
    for t in sorted(triggers, key=lambda t: (t["relname"], t["tgname"])):
        state = TriggerState(
            table=t["relname"],
            name=t["tgname"],
            enabled=_ENABLED_WORDS.get(t["tgenabled"], t["tgenabled"]),
            definition=norm(t["definition"]),
        )
        if t["parent"] is None:
            states[_trigger_key(state)] = state
        else:
            copies.append((t["parent"], state))
    for parent, copy in copies:
        as_parent = TriggerState(
            table=parent,
            name=copy.name,
            enabled=copy.enabled,
            definition=copy.definition.replace(f" ON {copy.table} ", f" ON {parent} ", 1),
        )
        if states.get(_trigger_key(as_parent)) != as_parent:
            states[_trigger_key(as_parent)] = as_parent
    return SchemaState(
        triggers=tuple(sorted(states.values(), key=_trigger_key)),
        functions=tuple(
            FunctionState(
                signature=norm(f["identity"]),
                kind=_KINDS.get(f["prokind"], f["prokind"]),
                language=f["lanname"],
                arguments=norm(f["arguments"]),
                result=None if f["result"] is None else norm(f["result"]),
                security_definer=f["prosecdef"],
                config=tuple(
                    sorted(_normalise_setting(s, schema, quoted) for s in f["proconfig"] or ())
                ),
                volatility=_VOLATILITY.get(f["provolatile"], f["provolatile"]),
                strict=f["proisstrict"],
                leakproof=f["proleakproof"],
                parallel=_PARALLEL.get(f["proparallel"], f["proparallel"]),
                body_sha256=_sha256(norm(f["prosrc"] or "")),
            )
            for f in sorted(functions, key=lambda f: (f["proname"], f["identity"]))
        ),
        relations=tuple(sorted(relations, key=_relation_key)),
    )


def _trigger_key(t: TriggerState) -> tuple[str, str]:
    return (t.table, t.name)


def _relation_key(r: RelationState) -> tuple[str, str, str]:
    return (r.kind, r.table, r.name)


# -- comparing -----------------------------------------------------------------------------------


def compare_states(
    expected: SchemaState,
    found: SchemaState,
    *,
    quoted_schema: str,
    revision: str,
    defined_in: Mapping[str, str] | None = None,
) -> list[IntegrityProblem]:
    """Every difference between the state ``revision`` installs and the one ``found`` in the
    schema (named ``quoted_schema`` in messages, as PostgreSQL's ``quote_ident`` prints it):
    missing, unexpected and changed triggers, functions, rules, policies, row security.
    ``defined_in`` names, per function signature, the revision whose migration last defined it
    (:func:`defining_revisions`), for the fixes."""
    qs = quoted_schema
    problems: list[IntegrityProblem] = []
    problems += _compare_triggers(expected.triggers, found.triggers, qs, revision)
    problems += _compare_functions(
        expected.functions, found.functions, qs, revision, defined_in or {}
    )
    problems += _compare_relations(expected.relations, found.relations, qs, revision)
    return problems


def _enabled_sql(word: str) -> tuple[str, str]:
    return _ENABLED.get(_ENABLED_LETTERS.get(word, ""), (word, word))


def _compare_triggers(
    expected: Iterable[TriggerState], found: Iterable[TriggerState], qs: str, revision: str
) -> list[IntegrityProblem]:
    want = {_trigger_key(t): t for t in expected}
    have = {_trigger_key(t): t for t in found}
    problems = []
    for key in sorted(want.keys() | have.keys()):
        table, name = key
        subject = f"trigger {name} on {qs}.{table}"
        w, h = want.get(key), have.get(key)
        if h is None:
            problems.append(
                IntegrityProblem(
                    subject,
                    f"is missing (revision {revision} creates it)",
                    _recreate_trigger(w, qs) if w else None,
                )
            )
        elif w is None:
            problems.append(
                IntegrityProblem(
                    f"unexpected trigger {name} on {qs}.{table}",
                    f"(revision {revision} creates no such trigger; it runs on every matching "
                    "write and can change what is recorded)",
                    f"if nobody can say why it is there, DROP TRIGGER {name} ON {qs}.{table}",
                )
            )
        else:
            if h.definition != w.definition:
                problems.append(
                    IntegrityProblem(
                        subject,
                        f"differs from the one revision {revision} installed: it is now "
                        f"`{_denormalise(h.definition, qs)}`, not "
                        f"`{_denormalise(w.definition, qs)}`",
                        _recreate_trigger(w, qs, drop=True),
                    )
                )
            if h.enabled != w.enabled:
                found_text = _enabled_sql(h.enabled)[1]
                want_sql, want_text = _enabled_sql(w.enabled)
                problems.append(
                    IntegrityProblem(
                        subject,
                        f"is {found_text}, not {want_text}",
                        f"run ALTER TABLE {qs}.{table} {want_sql} TRIGGER {name}",
                    )
                )
    return problems


def _recreate_trigger(trigger: TriggerState, qs: str, *, drop: bool = False) -> str:
    """The statements that put a trigger back as the manifest describes it (its definition
    names the schema's objects without the schema, so the schema goes in search_path)."""
    enable = _enabled_sql(trigger.enabled)[0]
    dropping = f"DROP TRIGGER {trigger.name} ON {qs}.{trigger.table}; " if drop else ""
    return (
        f"recreate it: SET search_path = pg_catalog, {qs}; {dropping}"
        f"{_denormalise(trigger.definition, qs)}; "
        f"ALTER TABLE {qs}.{trigger.table} {enable} TRIGGER {trigger.name}; RESET search_path"
    )


def _settings_text(config: Sequence[str], qs: str) -> str:
    return "; ".join(f"SET {_denormalise(s, qs)}" for s in config) if config else "no SET clause"


def _function_differences(w: FunctionState, h: FunctionState, qs: str) -> list[str]:
    out = []
    if h.body_sha256 != w.body_sha256:
        out.append("its body is not the one installed")
    if h.security_definer != w.security_definer:
        out.append(
            "it is SECURITY DEFINER, not SECURITY INVOKER"
            if h.security_definer
            else "it is SECURITY INVOKER, not SECURITY DEFINER"
        )
    if h.config != w.config:
        out.append(f"it has {_settings_text(h.config, qs)}, not {_settings_text(w.config, qs)}")
    for label, attribute in (
        ("kind", "kind"),
        ("language", "language"),
        ("arguments", "arguments"),
        ("result", "result"),
        ("volatility", "volatility"),
        ("parallel safety", "parallel"),
    ):
        now, then = getattr(h, attribute), getattr(w, attribute)
        if now != then:
            out.append(f"its {label} is {now!r}, not {then!r}")
    for flag, attribute in (("STRICT", "strict"), ("LEAKPROOF", "leakproof")):
        now = getattr(h, attribute)
        if now != getattr(w, attribute):
            was = "was not" if now else "was"
            out.append(f"it is {'' if now else 'not '}{flag} (the installed one {was})")
    return out


def defining_revisions(manifest: Mapping[str, SchemaState], revision: str) -> dict[str, str]:
    """For each function of ``revision``'s entry in ``manifest``, the oldest revision from
    which on it has been exactly as ``revision`` has it: the migration whose statements define
    it (a manifest's revisions are in migration order)."""
    order = list(manifest)
    if revision not in manifest:
        return {}
    since: dict[str, str] = {}
    for function in manifest[revision].functions:
        for r in reversed(order[: order.index(revision) + 1]):
            if function not in manifest[r].functions:
                break
            since[function.signature] = r
    return since


def _restore_function(signature: str, defined_in: Mapping[str, str]) -> str:
    revision = defined_in.get(signature)
    if revision is None:
        return "restore it as pgoutbox's migrations define it, or from a backup"
    return (
        f"restore it as revision {revision} left it (the last of pgoutbox's migrations to change "
        f"it: pgoutbox/migrations/versions/{revision}.py), or from a backup"
    )


def _compare_functions(
    expected: Iterable[FunctionState],
    found: Iterable[FunctionState],
    qs: str,
    revision: str,
    defined_in: Mapping[str, str],
) -> list[IntegrityProblem]:
    want = {f.signature: f for f in expected}
    have = {f.signature: f for f in found}
    problems = []
    for signature in sorted(want.keys() | have.keys()):
        name = f"{qs}.{_denormalise(signature, qs)}"
        w, h = want.get(signature), have.get(signature)
        fix = _restore_function(signature, defined_in)
        if h is None:
            problems.append(
                IntegrityProblem(
                    f"function {name}",
                    f"is missing (revision {revision} creates it)",
                    fix,
                )
            )
        elif w is None:
            problems.append(
                IntegrityProblem(
                    f"unexpected function {name}",
                    f"(revision {revision} creates no such function in pgoutbox's schema)",
                    f"if nobody can say why it is there, DROP FUNCTION {name}",
                )
            )
        else:
            differences = _function_differences(w, h, qs)
            if differences:
                problems.append(
                    IntegrityProblem(
                        f"function {name}",
                        f"differs from the one revision {revision} installed: "
                        + "; ".join(differences),
                        fix,
                    )
                )
    return problems


_RELATION_WHY = {
    "rule": "a rule rewrites the statements run on its table",
    "policy": "a policy decides which rows a role sees or writes, an auditor's included",
    "row-level security": "its policies decide which rows a role sees or writes",
}


def _relation_fix(r: RelationState, qs: str) -> str:
    if r.kind == "rule":
        return f"DROP RULE {r.name} ON {qs}.{r.table}"
    if r.kind == "policy":
        return f"DROP POLICY {r.name} ON {qs}.{r.table}"
    return f"ALTER TABLE {qs}.{r.table} NO FORCE ROW LEVEL SECURITY, DISABLE ROW LEVEL SECURITY"


def _compare_relations(
    expected: Iterable[RelationState], found: Iterable[RelationState], qs: str, revision: str
) -> list[IntegrityProblem]:
    want = {_relation_key(r): r for r in expected}
    have = {_relation_key(r): r for r in found}
    problems = []
    for key in sorted(want.keys() | have.keys()):
        kind, table, name = key
        subject = f"{kind} {name} on {qs}.{table}" if name else f"{kind} on {qs}.{table}"
        w, h = want.get(key), have.get(key)
        if h is None:
            problems.append(
                IntegrityProblem(subject, f"is missing (revision {revision} creates it)")
            )
        elif w is None:
            problems.append(
                IntegrityProblem(
                    f"unexpected {subject}",
                    f"({_denormalise(h.definition, qs)}; revision {revision} has none: "
                    f"{_RELATION_WHY.get(kind, 'it changes what statements on the table do')})",
                    f"if nobody can say why it is there, {_relation_fix(h, qs)}",
                )
            )
        elif h.definition != w.definition:
            problems.append(
                IntegrityProblem(
                    subject,
                    f"differs from the one revision {revision} installed: it is now "
                    f"`{_denormalise(h.definition, qs)}`, not `{_denormalise(w.definition, qs)}`",
                )
            )
    return problems


# -- checking a schema ---------------------------------------------------------------------------


async def check_schema_integrity(
    conn: asyncpg.Connection,
    schema: str,
    *,
    manifest: Mapping[str, SchemaState] | None = None,
) -> list[IntegrityProblem]:
    """Every way ``schema``'s triggers, functions, rules and row security differ from what the
    revision it is at installed, according to the manifest shipped in the package (``manifest``
    overrides it, for tests). An empty list: nothing was weakened.

    A schema at a revision the manifest does not cover is one problem saying so (it cannot be
    checked), and so is a schema without pgoutbox or one the connected role may not use. Runs
    in the caller's transaction if there is one (as a savepoint), else in its own; any role
    with USAGE on the schema and SELECT on ``schema_revision`` (the auditor) can run it.

    Usage::

        problems = await check_schema_integrity(conn, "pgoutbox")
        for problem in problems:
            print(problem)
    """
    schema = validate_identifier(schema, "schema name")
    row = await conn.fetchrow(
        "SELECT pg_catalog.quote_ident(nspname) AS quoted, "
        "pg_catalog.has_schema_privilege(oid, 'USAGE') AS usage, current_user AS role "
        "FROM pg_catalog.pg_namespace WHERE nspname OPERATOR(pg_catalog.=) $1",
        schema,
    )
    if row is None:
        return [
            IntegrityProblem(
                f"schema {schema}",
                "does not exist",
                "name pgoutbox's schema (--schema or PGOUTBOX_DATABASE__SCHEMA)",
            )
        ]
    qs: str = row["quoted"]
    if not row["usage"]:
        return [
            IntegrityProblem(
                f"schema {qs}",
                f"cannot be checked by role {row['role']}, which has no USAGE on it",
                f"grant it what an auditor needs: pgoutbox db grant --auditor {row['role']}",
            )
        ]
    revision = await _schema_revision(conn, schema)
    if revision is None:
        return [
            IntegrityProblem(
                f"schema {qs}",
                "has no schema_revision table: pgoutbox is not installed there",
                "run pgoutbox db upgrade, or name the schema pgoutbox is in",
            )
        ]
    shipped = load_manifest() if manifest is None else manifest
    expected = shipped.get(revision)
    if expected is None:
        return [_uncovered(qs, revision, shipped)]
    found = await read_schema_state(conn, schema)
    return compare_states(
        expected,
        found,
        quoted_schema=qs,
        revision=revision,
        defined_in=defining_revisions(shipped, revision),
    )


async def _schema_revision(conn: asyncpg.Connection, schema: str) -> str | None:
    table = f'"{schema}".schema_revision'
    if not await conn.fetchval("SELECT pg_catalog.to_regclass($1) IS NOT NULL", table):
        return None
    revision = await conn.fetchval(f"SELECT revision FROM {table}")
    return None if revision is None else str(revision)


def _uncovered(qs: str, revision: str, shipped: Mapping[str, SchemaState]) -> IntegrityProblem:
    from pgoutbox.migrations import head_revision

    known = _revisions()
    covered = f"it covers {', '.join(shipped)}" if shipped else "it is empty"
    if revision in known:
        return IntegrityProblem(
            f"schema {qs}",
            f"is at revision {revision}, which the integrity manifest shipped with this pgoutbox "
            f"does not cover ({covered}): the manifest is older than the migrations",
            f"regenerate it from a checkout: {REGENERATE_COMMAND}",
        )
    return IntegrityProblem(
        f"schema {qs}",
        f"is at revision {revision}, which this pgoutbox does not know (its newest is "
        f"{head_revision()}), so its triggers and functions cannot be checked",
        "check it with the pgoutbox version that migrated it",
    )


async def check(settings: DatabaseSettings) -> list[IntegrityProblem]:
    """:func:`check_schema_integrity` of the schema ``settings`` point at, on a connection of
    its own (what ``pgoutbox db check`` runs)."""
    conn = await asyncpg.connect(**settings.connect_kwargs())
    try:
        return await check_schema_integrity(conn, settings.schema_name)
    finally:
        await conn.close()


def report(problems: Sequence[IntegrityProblem]) -> bool:
    """Print each problem as a ``FAILED: ...`` line on standard error, then what to do; True
    when there was any (``pgoutbox db check`` exits 1 then)."""
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    if any(not problem.subject.startswith("schema ") for problem in problems):
        print(
            f"{len(problems)} integrity problem(s): pgoutbox's triggers and functions are not "
            "what its migrations installed, which only the schema's owner or a superuser can "
            "do; find out who changed them and why, restore them, then run `pgoutbox audit "
            "verify` (docs/audit.md, 'Integrity of the triggers and functions')",
            file=sys.stderr,
        )
    return bool(problems)


# -- the manifest --------------------------------------------------------------------------------


@cache
def load_manifest() -> Mapping[str, SchemaState]:
    """The manifest shipped in the package: revision id -> the state it installs. Empty when
    the file is missing (every revision is then reported as not covered)."""
    source = resources.files("pgoutbox.migrations").joinpath(MANIFEST_PATH.name)
    if not source.is_file():
        return {}
    return parse_manifest(source.read_text(encoding="utf-8"))


def parse_manifest(text: str) -> dict[str, SchemaState]:
    """A manifest file's revisions; ``ValueError`` naming the problem for a file of another
    format."""
    document = json.loads(text)
    if document.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"integrity manifest format {document.get('format')!r} is not {MANIFEST_FORMAT}: "
            f"regenerate it with {REGENERATE_COMMAND}"
        )
    return {
        revision: SchemaState.from_json(entry) for revision, entry in document["revisions"].items()
    }


def manifest_text(states: Mapping[str, SchemaState]) -> str:
    """The manifest file for ``states`` (revision id -> state), in migration order."""
    document = {
        "comment": (
            "What each pgoutbox revision installs: triggers, functions, rules and row security "
            "of its schema (the schema's name replaced by @schema@, '@' doubled). Generated by "
            f"`{REGENERATE_COMMAND}`; never edit it by hand."
        ),
        "format": MANIFEST_FORMAT,
        "revisions": {revision: state.to_json() for revision, state in states.items()},
    }
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def _revisions() -> list[str]:
    """pgoutbox's revision ids, oldest first."""
    from alembic.script import ScriptDirectory

    from pgoutbox.migrations import alembic_config

    script = ScriptDirectory.from_config(alembic_config("pgoutbox"))
    return [s.revision for s in reversed(list(script.walk_revisions()))]


async def build_manifest(dsn: str) -> dict[str, SchemaState]:
    """Migrate a throwaway schema on ``dsn``'s server through every revision, read the state
    after each, drop the schema; revision id -> state, oldest first."""
    from pgoutbox import migrations

    schema = f"pgoutbox_manifest_{uuid.uuid4().hex[:12]}"
    settings = DatabaseSettings(dsn=dsn, schema_name=schema)
    states: dict[str, SchemaState] = {}
    conn = await asyncpg.connect(**settings.connect_kwargs())
    try:
        for revision in _revisions():
            await migrations.upgrade(settings, revision)
            at = await _schema_revision(conn, schema)
            if at != revision:
                raise RuntimeError(
                    f"after migrating to {revision}, schema_revision says {at!r}: revision "
                    f"{revision} must record itself in schema_revision"
                )
            states[revision] = await read_schema_state(conn, schema)
    finally:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()
    return states


def manifest_differences(
    shipped: Mapping[str, SchemaState], built: Mapping[str, SchemaState]
) -> list[str]:
    """How the shipped manifest differs from what the migrations install now, one line each
    (empty: it is up to date)."""
    out = [f"revision {r} is missing from the manifest" for r in built if r not in shipped]
    out += [
        f"revision {r} is in the manifest but not a migration" for r in shipped if r not in built
    ]
    for revision, state in built.items():
        if revision in shipped:
            for problem in compare_states(
                shipped[revision], state, quoted_schema="<schema>", revision=revision
            ):
                # The manifest as what "was installed", the migrations' catalog as what is found.
                out.append(
                    f"revision {revision}, migrated now: {problem.subject} {problem.problem}"
                )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pgoutbox.integrity --write DSN | --check DSN``."""
    parser = argparse.ArgumentParser(
        prog="python -m pgoutbox.integrity",
        description=(
            "Generate (--write) or check (--check) the integrity manifest shipped in "
            f"{MANIFEST_PATH}, by migrating a throwaway schema on DSN's server through every "
            "revision (the schema is dropped afterwards)."
        ),
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", metavar="DSN", help="regenerate the manifest file")
    action.add_argument("--check", metavar="DSN", help="exit 1 if the manifest is out of date")
    args = parser.parse_args(argv)
    built = asyncio.run(build_manifest(args.write or args.check))
    if args.write:
        MANIFEST_PATH.write_text(manifest_text(built), encoding="utf-8")
        print(f"wrote {MANIFEST_PATH}: revisions {', '.join(built)}")
        return 0
    shipped = parse_manifest(MANIFEST_PATH.read_text(encoding="utf-8"))
    differences = manifest_differences(shipped, built)
    for line in differences:
        print(line, file=sys.stderr)
    if differences:
        print(f"the manifest is out of date: run {REGENERATE_COMMAND}", file=sys.stderr)
        return 1
    print(f"{MANIFEST_PATH} is up to date: revisions {', '.join(built)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
