"""The PostgreSQL tests' databases: a few per test process, emptied between tests, none left.

A test gets a migrated database nobody else uses, as empty as the template it was made from.
Making one (CREATE DATABASE ... TEMPLATE) takes a few hundred milliseconds and dropping one
waits for a checkpoint (PostgreSQL 15 with fsync on syncs every file of the cluster's
databases: 40 s and more on a busy machine, with several test runs' drops queued behind each
other). So a test process makes a small pool of them, and between tests empties each one in
one statement, `TRUNCATE ... RESTART IDENTITY` of every table the test wrote (whose files
or recorded sizes are no longer the template's), puts back the rows the migrations wrote
(the template's own rows, `schema_migrations` and the like) and every sequence's position,
and resets the cumulative statistics, whose counts decide when autovacuum analyzes.
A database whose schema a test changed (a table renamed, a table's storage options set, the
planner's statistics gathered by ANALYZE) is not reused: a fresh one is made in its place;
a fingerprint of its catalog, compared with the template's, tells which.

Every database a process makes is named `flashsale_t_<pid>_<start>_...` (its pid and the
process' start time in clock ticks since boot, so a reused pid is not taken for it). They
are dropped as the process ends, however it ends, by a watchdog process it started (in a
session of its own, so that a signal to the test run's process group spares it), which sees
its pipe close; and every test process' start drops those of processes no longer running,
in case the watchdog was killed too.

`python -m tests.pgpool ADMIN_URL PREFIX` is the watchdog: it waits for end of file on its
standard input, then drops every database whose name starts with PREFIX.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Coroutine
from concurrent import futures
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from server.storage import migrate
from server.storage.database import Store

T = TypeVar("T")

PREFIX = "flashsale_t_"
_OURS = re.compile(rf"^{PREFIX}(\d+)_(\d+)_")

# Everything in the catalog of the database's own schemas that a test could change and a
# TRUNCATE would not put back. `regclass` names are schema-qualified where not on the
# search path; the database's objects keep their oids across TRUNCATE (only the files
# change), and TRUNCATE leaves the planner's statistics (pg_statistic) where ANALYZE put
# them: a database with any is not reused.
_USER_NAMESPACES = """
    SELECT oid FROM pg_namespace
    WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
"""
FINGERPRINT = f"""
SELECT md5(coalesce(string_agg(part, E'\\n' ORDER BY part), '')) FROM (
    SELECT 'namespace ' || nspname || ' ' || coalesce(nspacl::text, '')
        FROM pg_namespace WHERE oid IN ({_USER_NAMESPACES})
    UNION ALL
    SELECT format('relation %s %s %s %s %s %s %s', c.oid::regclass, c.relkind,
                  c.relpersistence, c.reloptions, c.relrowsecurity, c.relforcerowsecurity,
                  c.relacl)
        FROM pg_class c WHERE c.relnamespace IN ({_USER_NAMESPACES})
    UNION ALL
    SELECT format('column %s %s %s %s %s %s %s %s %s %s', a.attrelid::regclass, a.attnum,
                  a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
                  a.attisdropped, a.attidentity, a.attgenerated, a.attcollation,
                  pg_get_expr(d.adbin, d.adrelid))
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE c.relnamespace IN ({_USER_NAMESPACES}) AND a.attnum > 0
    UNION ALL
    SELECT format('constraint %s %s %s %s', conrelid::regclass, contypid::regtype, conname,
                  pg_get_constraintdef(oid))
        FROM pg_constraint WHERE connamespace IN ({_USER_NAMESPACES})
    UNION ALL
    SELECT 'index ' || pg_get_indexdef(i.indexrelid)
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE c.relnamespace IN ({_USER_NAMESPACES})
    UNION ALL
    SELECT format('trigger %s %s', pg_get_triggerdef(oid), tgenabled)
        FROM pg_trigger WHERE NOT tgisinternal
    UNION ALL
    SELECT 'rule ' || pg_get_ruledef(r.oid)
        FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
        WHERE c.relnamespace IN ({_USER_NAMESPACES})
    UNION ALL
    SELECT format('function %s %s %s', p.oid::regprocedure, md5(p.prosrc), p.proconfig)
        FROM pg_proc p WHERE p.pronamespace IN ({_USER_NAMESPACES})
    UNION ALL
    SELECT format('type %s %s', t.oid::regtype, t.typtype)
        FROM pg_type t WHERE t.typnamespace IN ({_USER_NAMESPACES})
    UNION ALL
    SELECT format('enum %s %s %s', enumtypid::regtype, enumsortorder, enumlabel)
        FROM pg_enum
    UNION ALL
    SELECT format('sequence %s %s %s %s %s %s %s %s', seqrelid::regclass, seqtypid::regtype,
                  seqstart, seqincrement, seqmax, seqmin, seqcache, seqcycle)
        FROM pg_sequence
    UNION ALL
    SELECT 'extension ' || extname || ' ' || extversion FROM pg_extension
    UNION ALL
    SELECT format('policy %s %s %s %s', polrelid::regclass, polname,
                  pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid))
        FROM pg_policy
    UNION ALL
    SELECT format('event trigger %s %s', evtname, evtenabled) FROM pg_event_trigger
    UNION ALL
    SELECT 'settings ' || array_to_string(setconfig, ',') FROM pg_db_role_setting
        WHERE setdatabase = (SELECT oid FROM pg_database WHERE datname = current_database())
    UNION ALL
    SELECT 'statistics ' || count(*) FROM pg_statistic s JOIN pg_class c ON c.oid = s.starelid
        WHERE c.relnamespace IN ({_USER_NAMESPACES})
    UNION ALL
    SELECT 'extended statistics ' || count(*) FROM pg_statistic_ext
    UNION ALL
    SELECT 'comments ' || count(*) FROM pg_description WHERE objoid >= 16384
    UNION ALL
    SELECT 'large objects ' || count(*) FROM pg_largeobject_metadata
) AS parts (part)
"""

_TABLES = f"""
SELECT c.oid::regclass::text AS name FROM pg_class c
WHERE c.relkind IN ('r', 'p') AND c.relnamespace IN ({_USER_NAMESPACES})
ORDER BY 1
"""

# The template's own rows, one INSERT per table that has any, as a JSON literal read back
# through the table's row type (the generated columns left to be generated again).
_SEED = """
SELECT format(
    'INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE'
    ' SELECT %s FROM json_populate_recordset(NULL::%s, %L)',
    $1::text,
    string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum),
    string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum),
    $1::text,
    (SELECT json_agg(t) FROM {table} t)
)
FROM pg_attribute a
WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped
    AND a.attgenerated = ''
"""

# What a table's writes leave behind: its files' sizes (a heap with no page has no row; a
# b-tree never shrinks) and what VACUUM and ANALYZE record in pg_class, of it and its
# indexes. A table whose state is still the template's is not truncated: TRUNCATE makes
# new files and builds each index again, syncing each to disk (~110 ms for the 15 tables,
# about what CREATE DATABASE costs), which a test's few written tables need, not all.
_STATE = f"""
SELECT c.oid::regclass::text AS name,
       concat_ws(' ', pg_total_relation_size(c.oid), c.relpages, c.reltuples,
                 c.relallvisible, (
                     SELECT string_agg(concat_ws(' ', i.relname, i.relpages, i.reltuples),
                                       ',' ORDER BY i.relname)
                     FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
                     WHERE x.indrelid = c.oid)) AS state
FROM pg_class c
WHERE c.relkind IN ('r', 'p') AND c.relnamespace IN ({_USER_NAMESPACES})
"""
# A table with rows in the template: its rows, as they lie.
_CONTENT = "SELECT '{table}', md5(coalesce(json_agg(t)::text, '')) FROM {table} t"

_SEQUENCES = """
SELECT format('SELECT setval(%L, %s, %s)', format('%I.%I', schemaname, sequencename),
              coalesce(last_value, start_value), last_value IS NOT NULL)
FROM pg_sequences
WHERE schemaname NOT LIKE 'pg\\_%' AND schemaname <> 'information_schema'
ORDER BY 1
"""

# What the template's pg_class says of each relation's size (pages, rows, all-visible pages),
# put back after TRUNCATE: it leaves each rebuilt index with 0 pages and -1 rows (unknown)
# where CREATE INDEX on an empty table recorded 1 and 0, and the planner reads them.
# (The database's relations keep the template's oids: the database is a copy of its files.)
_SIZES = """
SELECT format(
    'UPDATE pg_class AS c SET relpages = v.p, reltuples = v.t, relallvisible = v.a'
    ' FROM (VALUES %s) AS v (o, p, t, a) WHERE c.oid = v.o'
    ' AND (c.relpages, c.reltuples, c.relallvisible) IS DISTINCT FROM (v.p, v.t, v.a)',
    string_agg(format('(%s::oid, %s, %s::real, %s)', oid, relpages, reltuples, relallvisible),
               ', ' ORDER BY oid))
FROM pg_class WHERE oid >= 16384
"""

# (referencing, referenced) tables: TRUNCATE of a table needs those referencing it with it.
_REFERENCES = f"""
SELECT conrelid::regclass::text, confrelid::regclass::text FROM pg_constraint
WHERE contype = 'f' AND connamespace IN ({_USER_NAMESPACES})
"""

_OTHERS = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid()
"""


def process_start(pid: int) -> int | None:
    """The process' start time in clock ticks since boot (/proc/PID/stat's 22nd field), or
    None where no such process runs."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[19])


def own_prefix() -> str:
    """This process' databases' names start with this."""
    return f"{PREFIX}{os.getpid()}_{process_start(os.getpid())}_"


async def _connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=60)


async def drop_where(admin_url: str, keep: Any) -> list[str]:
    """Drop every database of ours (named by PREFIX, pid and start) for whose name
    `keep(name)` is false; the names dropped."""
    conn = await _connect(admin_url)
    try:
        names = [
            row["datname"]
            for row in await conn.fetch(
                "SELECT datname FROM pg_database WHERE starts_with(datname, $1) ORDER BY 1",
                PREFIX,
            )
        ]
        dropped = []
        for name in names:
            if _OURS.match(name) and not keep(name):
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                dropped.append(name)
        return dropped
    finally:
        await conn.close()


def _of_a_live_process(name: str) -> bool:
    match = _OURS.match(name)
    assert match is not None
    return process_start(int(match[1])) == int(match[2])


class PostgresDatabases:
    """A test process' PostgreSQL databases, from a template migrated once per session.

    `database()` hands out a clean one (made ahead, or emptied after its last test, on a
    thread of its own while tests run); `release(name)` empties it for the next test, or
    sets it aside if its schema changed; a database a test makes itself is named by
    `name()`; `close()` leaves them all to the watchdog, which drops them as this process
    ends (dropping waits for a checkpoint: none is dropped while tests run).
    """

    # Clean databases made ahead at the start: with one, each test would wait for the last
    # one's to be emptied.
    AHEAD = 2

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.prefix = own_prefix()
        self.template = f"{self.prefix}template"
        self._made = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="postgres-databases", daemon=True
        )
        self._clean: deque[Future[str]] = deque()
        self._fingerprint = ""
        self._seeds: dict[str, str] = {}
        self._state_sql = ""
        self._state: set[tuple[str, str]] = set()
        self._referencing: dict[str, set[str]] = {}
        self._sequences = ""
        self._sizes = ""
        self._watchdog: subprocess.Popen[bytes] | None = None
        # What the run did, for the session's summary: tests given a database, databases
        # emptied for reuse, made, and dropped because a test changed their schema.
        self.given = self.reused = self.created = self.changed = self.truncated = 0
        self.failures: list[str] = []

    def url(self, name: str) -> str:
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{name}"

    def name(self, what: str = "") -> str:
        """A new database name of this process' (swept up with the others)."""
        self._made += 1
        return f"{self.prefix}{self._made}{what}"

    async def _admin(self, sql: str) -> None:
        conn = await _connect(self.admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def setup(self) -> None:
        self._thread.start()
        self._submit(drop_where(self.admin_url, keep=_of_a_live_process)).result()
        self._watchdog = subprocess.Popen(
            [sys.executable, "-m", "tests.pgpool", self.admin_url, self.prefix],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=Path(__file__).parent.parent,
            start_new_session=True,
        )
        # It forks and its first process ends at once (so that nothing here waits for it, nor
        # warns of a child left running); the pipe's end here keeps the second one waiting.
        self._watchdog.wait()
        self._submit(self._setup()).result()
        self._clean.extend(self._submit(self._create()) for _ in range(self.AHEAD))

    async def _setup(self) -> None:
        await self._admin(f'CREATE DATABASE "{self.template}"')
        store = Store(self.url(self.template))
        await store.connect()
        try:
            await migrate.migrate(store)
        finally:
            await store.close()
        conn = await _connect(self.url(self.template))
        try:
            self._fingerprint = await conn.fetchval(FINGERPRINT)
            tables = [row["name"] for row in await conn.fetch(_TABLES)]
            state = [_STATE]
            for table in tables:
                if await conn.fetchval(f"SELECT EXISTS (SELECT FROM {table})"):
                    self._seeds[table] = await conn.fetchval(_SEED.format(table=table), table)
                    state.append(_CONTENT.format(table=table))
            self._state_sql = "\nUNION ALL\n".join(state)
            self._state = await self._table_states(conn)
            for referencing, referenced in await conn.fetch(_REFERENCES):
                self._referencing.setdefault(referenced, set()).add(referencing)
            self._sizes = await conn.fetchval(_SIZES)
            self._sequences = ";\n".join(row[0] for row in await conn.fetch(_SEQUENCES))
        finally:
            await conn.close()

    async def _table_states(self, conn: asyncpg.Connection) -> set[tuple[str, str]]:
        return {(row[0], row[1]) for row in await conn.fetch(self._state_sql)}

    def _with_referencing(self, tables: set[str]) -> list[str]:
        """The tables and those referencing them, and so on (TRUNCATE wants them all)."""
        todo, every = list(tables), set(tables)
        while todo:
            for referencing in self._referencing.get(todo.pop(), ()):
                if referencing not in every:
                    every.add(referencing)
                    todo.append(referencing)
        return sorted(every)

    def _submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    async def _create(self) -> str:
        name = self.name()
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        self.created += 1
        return name

    async def database(self) -> str:
        """A migrated database's name, as empty as the template, for this test alone."""
        self.given += 1
        ready = [made for made in self._clean if made.done()]
        if ready:  # an emptied one before one still being emptied
            self._clean.remove(ready[0])
            self._clean.appendleft(ready[0])
        while self._clean:
            made = self._clean.popleft()
            with contextlib.suppress(Exception):
                return await asyncio.wrap_future(made)
        return await asyncio.wrap_future(self._submit(self._create()))

    def release(self, name: str) -> None:
        """The test is done with it: empty it for the next one, in the background."""
        self._clean.append(self._submit(self._empty(name)))

    async def _empty(self, name: str) -> str:
        """The database emptied (every other connection to it ended first), or, if its schema
        is no longer the template's or it could not be emptied, another one made in its
        place (that one is dropped with the others at the end)."""
        try:
            same = await self._emptied(name)
        except Exception as exc:
            self.failures.append(f"{name}: {exc!r}")
            same = False
        if same:
            self.reused += 1
            return name
        self.changed += 1
        return await self._create()

    async def _emptied(self, name: str) -> bool:
        """Emptied if its schema is still the template's (then True)."""
        conn = await _connect(self.url(name))
        try:
            await conn.execute(_OTHERS)
            same = await conn.fetchval(FINGERPRINT) == self._fingerprint
            if same:
                changed = await self._table_states(conn) - self._state
                written = self._with_referencing({table for table, _ in changed})
                self.truncated += len(written)
                script = [f"TRUNCATE {', '.join(written)} RESTART IDENTITY"] if written else []
                script.extend(self._seeds[table] for table in written if table in self._seeds)
                script += [self._sizes] if written else []
                script += [self._sequences] if self._sequences else []
                script.append("SELECT pg_stat_reset()")
                await conn.execute(";\n".join(script))
                if os.environ.get("PGPOOL_CHECK"):
                    left = await self._table_states(conn) - self._state
                    assert not left, f"not as the template after emptying: {left}"
        finally:
            await conn.close()
        return bool(same)

    def drop(self, name: str) -> None:
        """Done with a database of this process' (named by `name()`): the watchdog drops it
        with the others as the process ends (a drop waits for a checkpoint: not here)."""

    def close(self) -> None:
        """Hand every database this process made to the watchdog, which drops them.

        Not dropped here: each drop waits for a checkpoint (seconds, minutes when several
        test runs drop at once), and pytest-xdist kills a worker that has not exited 10 s
        after its last test, which left the drops undone (hundreds of databases a day)."""
        if not self._thread.is_alive():
            return
        # What is still being made or emptied (a second or so), so that nothing is left
        # half done on the loop.
        futures.wait(self._clean, timeout=60)
        if os.environ.get("PGPOOL_STATS"):
            counts: dict[str, object] = {"given": self.given, "reused": self.reused}
            counts |= {"created": self.created, "changed": self.changed}
            counts |= {"tables truncated": self.truncated, "failures": self.failures}
            with open(os.environ["PGPOOL_STATS"], "a", encoding="utf-8") as stats:
                stats.write(json.dumps(counts) + "\n")
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        if self._watchdog is not None:
            assert self._watchdog.stdin is not None
            self._watchdog.stdin.close()


async def _drop_all(admin_url: str, prefix: str, *, within: float = 600) -> None:
    """Drop every database whose name starts with `prefix`, and any that a CREATE DATABASE
    still running then makes (its client may be gone: the server finishes it anyway)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        await drop_where(admin_url, keep=lambda name: not name.startswith(prefix))
        conn = await _connect(admin_url)
        try:
            busy = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND strpos(query, $1) > 0"
                " AND state = 'active'",
                prefix,
            )
        finally:
            await conn.close()
        if not busy or loop.time() > deadline:
            return
        await asyncio.sleep(1)


def _watch(admin_url: str, prefix: str) -> None:
    """Wait for the test process to end (end of file on stdin), then drop its databases."""
    if os.fork() != 0:
        os._exit(0)
    sys.stdin.buffer.read()
    asyncio.run(_drop_all(admin_url, prefix))


if __name__ == "__main__":
    _watch(sys.argv[1], sys.argv[2])
