"""The leases on a fleet's hosts, in the shared PostgreSQL database (docs/replicas.md).

Which replica drives which host is a row of ``leases`` (owner, epoch, expiry);
replicas say they are alive in ``replicas`` (heartbeats). Times that decide
anything are the database's own clock (``now()``), never a replica's.

Fencing: a write about a host runs in a transaction that first locks that
host's lease row (FOR SHARE) and checks owner, epoch and expiry; otherwise it
is LeaseLost and nothing is written. A claim needs the row exclusively, so
no write of an old holder can commit after a new holder's claim.

Statements ride out a restart of the database: a failed one is retried (new
connection, backoff) as long as the lease it serves is still valid here, then
it is LeaseLost (host writes) or StoreUnavailable (the rest).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from orchestrator.engine.store.schema import POSTGRES_MIGRATIONS
from orchestrator.errors import LeaseLost, ReplicaNameInUse, StoreUnavailable
from orchestrator.plan.storeurl import redact

# The pool's own complaints (reconnects while the database restarts) are ours to
# report, once, as events: not log lines on stderr.
logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[tuple[Any, ...]]

_MIGRATION_LOCK = 0x6D6F64656C6970  # "modelip": pg_advisory_lock key for migrations


# A lease's owner exists: a replica of that name, not stopped, whose heartbeat is not
# from the future (a heartbeat written a year ahead is no heartbeat) and was seen
# within three lease periods (a replica beats every third of one: a late beat under
# load is not death; a real death is seen sooner, when its leases expire).
LIVE_OWNER = ("SELECT 1 FROM replicas r WHERE r.name = l.owner AND NOT r.stopped "
              "AND r.heartbeat > now() - 3 * make_interval(secs => %s) "
              "AND r.heartbeat <= now() + make_interval(secs => %s)")


@dataclass(slots=True)
class Fence:
    """This replica's hold on one host: the lease's epoch, and until when (here,
    monotonic) it may act on it. Ends before the database's expiry: it is counted
    from before the renewal was sent, and cut short by a safety margin."""

    epoch: int
    valid_until: float

    def remaining(self) -> float:
        return self.valid_until - time.monotonic()


@dataclass(frozen=True, slots=True)
class Claimed:
    host: str
    epoch: int
    previous_owner: str


@dataclass(frozen=True, slots=True)
class ReplicaRecord:
    name: str
    started: float
    heartbeat: float
    alive: bool


class LeaseLedger:
    """The shared database as replicas hold it: its connections (statements retried
    while the database is away; a write about a host fenced by its lease) and the
    leases (``heartbeat``, ``renew``, ``claim``, ``release``, ``stop``). PostgresStore
    is the journal on top of it."""

    def __init__(self, url: str, replica: str, *, lease_ttl: float) -> None:
        self.url = url
        self.label = redact(url)
        self.replica = replica
        self.lease_ttl = lease_ttl
        self.fences: dict[str, Fence] = {}
        self.instance = f"{replica}:{time.time_ns()}"
        self._pool = AsyncConnectionPool(
            url, min_size=1, max_size=16, open=False, timeout=max(5.0, lease_ttl),
            kwargs={"autocommit": True, "connect_timeout": max(1, math.ceil(lease_ttl / 2)),
                    # A replica frozen inside a transaction (SIGSTOP, a VM paused) would
                    # keep its row locks, and a fenced write's lock on its host's lease
                    # row keeps every other replica from taking the host over (claims
                    # skip locked rows). The server ends such a session after a lease
                    # TTL: the locks go with it; the frozen replica, thawed, finds its
                    # connection gone and its lease lost.
                    "options": "-c idle_in_transaction_session_timeout="
                               f"{max(100, round(lease_ttl * 1000))}"},
            check=AsyncConnectionPool.check_connection, name=f"modelip-{replica}")

    async def open(self, *, migrate: bool = True) -> None:
        """Connect; create or migrate the schema (``migrate``), or check it is there."""
        try:  # one direct attempt first: the database's own words, at once
            probe = await psycopg.AsyncConnection.connect(
                self.url, connect_timeout=max(1, math.ceil(self.lease_ttl / 2)))
            await probe.close()
            await self._pool.open(wait=True, timeout=max(5.0, self.lease_ttl))
        except (psycopg.Error, PoolTimeout) as exc:
            await self._pool.close()
            raise StoreUnavailable(self.label, f"cannot connect: {problem_of(exc)}") from None
        try:
            await self._unfenced(self._migrate if migrate else self._check_schema)
        except BaseException:
            await self._pool.close()
            raise

    async def _check_schema(self, conn: Conn) -> None:
        row = await (await conn.execute("SELECT to_regclass('modelip_schema')")).fetchone()
        if row is None or row[0] is None:
            raise StoreUnavailable(self.label, "holds no modelip fleet yet (start a replica "
                                   "with `modelip watch PLAN --store URL` first)")

    async def close(self) -> None:
        await self._pool.close()

    async def _migrate(self, conn: Conn) -> None:
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute("CREATE TABLE IF NOT EXISTS modelip_schema (version INTEGER)")
        row = await (await conn.execute("SELECT max(version) FROM modelip_schema")).fetchone()
        version = int(row[0] or 0) if row else 0
        if version > len(POSTGRES_MIGRATIONS):
            raise StoreUnavailable(self.label, f"schema version {version} is newer than "
                                   f"this modelip knows ({len(POSTGRES_MIGRATIONS)}): "
                                   "upgrade modelip")
        for number, script in enumerate(POSTGRES_MIGRATIONS[version:], start=version + 1):
            # a script is statements split at ";", or a tuple of them (a function body
            # has its own semicolons)
            statements = script if isinstance(script, tuple) else script.split(";")
            for statement in filter(str.strip, statements):
                await conn.execute(statement.encode())
            await conn.execute("INSERT INTO modelip_schema VALUES (%s)", (number,))

    # --- running statements -------------------------------------------------------------

    async def _attempt(self, work: Callable[[Conn], Awaitable[T]], limit: float,
                       on_give_up: Callable[[str], Exception]) -> T:
        delay = 0.05
        while True:
            try:
                # Shielded: a cancelled query would cost the pool its connection; each
                # attempt is bounded by the pool's and the server's timeouts.
                with anyio.CancelScope(shield=True):
                    async with self._pool.connection() as conn, conn.transaction():
                        return await work(conn)
            # (a session the server ended, idle in a transaction: this process stalled)
            except (psycopg.OperationalError, psycopg.errors.IdleInTransactionSessionTimeout,
                    PoolTimeout) as exc:
                if time.monotonic() + delay > limit:
                    raise on_give_up(problem_of(exc)) from None
            await anyio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _unfenced(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """One transaction, retried for a lease TTL (at least 10 s) while the database is
        away."""
        return await self._attempt(
            work, time.monotonic() + max(10.0, self.lease_ttl),
            lambda why: StoreUnavailable(self.label, f"unreachable: {why}"))

    async def _fenced(self, host: str, work: Callable[[Conn], Awaitable[T]]) -> T:
        """One transaction about ``host``, committed only under this replica's lease."""
        fence = self.fences.get(host)
        if fence is None or fence.remaining() <= 0:
            self.fences.pop(host, None)
            raise LeaseLost(host, "expired here" if fence else "not held")
        epoch = fence.epoch

        async def checked(conn: Conn) -> T:
            row = await (await conn.execute(
                "SELECT owner, epoch, expires > now() FROM leases WHERE host = %s FOR SHARE",
                (host,))).fetchone()
            if row is None or row[0] != self.replica or row[1] != epoch or not row[2]:
                self.fences.pop(host, None)
                owner = row[0] if row else ""
                raise LeaseLost(host, f"held by {owner} now" if owner and owner != self.replica
                                else "expired")
            return await work(conn)

        def give_up(why: str) -> Exception:
            self.fences.pop(host, None)
            return LeaseLost(host, f"the store is unreachable: {why}")

        return await self._attempt(checked, fence.valid_until, give_up)

    async def _rows(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        async def read(conn: Conn) -> list[tuple[Any, ...]]:
            return await (await conn.execute(sql.encode(), args)).fetchall()
        return await self._unfenced(read)

    async def query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement (its rows), retried while the database is away."""
        return await self._rows(sql, args)

    async def transact(self, work: Callable[[Conn], Awaitable[T]], *,
                       lease: str | None = None) -> T:
        """One transaction; with ``lease`` committed only under this replica's hold on
        that lease (LeaseLost otherwise: nothing written)."""
        return await (self._fenced(lease, work) if lease else self._unfenced(work))

    # --- leases -------------------------------------------------------------------------

    async def heartbeat(self, hosts: list[str]) -> int:
        """Say this replica is alive, make sure every host has a lease row; returns how
        many replicas are alive (this one included). StoreUnavailable if another
        live process uses this replica's name."""
        ttl = self.lease_ttl

        async def beat(conn: Conn) -> int:
            row = await (await conn.execute(
                "INSERT INTO replicas (name, instance, started, heartbeat) "
                "VALUES (%s, %s, now(), now()) ON CONFLICT (name) DO UPDATE SET "
                "instance = excluded.instance, heartbeat = now(), stopped = false, "
                "started = CASE WHEN replicas.instance = excluded.instance "
                "THEN replicas.started ELSE now() END "
                "WHERE replicas.instance = excluded.instance OR replicas.stopped "
                "OR replicas.heartbeat < now() - make_interval(secs => %s) "
                "RETURNING name", (self.replica, self.instance, ttl))).fetchone()
            if row is None:
                raise ReplicaNameInUse(self.label, f"replica name {self.replica!r} is in use "
                                       "by another running replica (--replica NAME)")
            await conn.execute("INSERT INTO leases (host) SELECT unnest(%s::text[]) "
                               "ON CONFLICT DO NOTHING", (hosts,))
            alive = await (await conn.execute(
                "SELECT count(*) FROM replicas WHERE NOT stopped AND "
                "heartbeat > now() - make_interval(secs => %s)", (ttl,))).fetchone()
            return int(alive[0]) if alive else 1
        return await self._unfenced(beat)

    def _fence_from(self, sent_at: float) -> float:
        # 80% of the TTL, counted from before the request left: ends well before the
        # database's expiry (now() + ttl at the database, which is later).
        return sent_at + 0.8 * self.lease_ttl

    async def renew(self) -> set[str]:
        """Renew every lease held; returns the hosts lost (taken over or expired)."""
        if not self.fences:
            return set()
        sent_at = time.monotonic()
        held = {host: fence.epoch for host, fence in self.fences.items()}

        async def renew(conn: Conn) -> list[tuple[Any, ...]]:
            return await (await conn.execute(
                "UPDATE leases SET expires = now() + make_interval(secs => %s) "
                "WHERE owner = %s AND expires > now() AND host = ANY(%s) "
                "RETURNING host, epoch", (self.lease_ttl, self.replica, list(held)))).fetchall()
        kept = {host for host, epoch in await self._unfenced(renew) if held.get(host) == epoch}
        for host in kept:
            if host in self.fences:
                self.fences[host].valid_until = self._fence_from(sent_at)
        lost = set(held) - kept
        for host in lost:
            self.fences.pop(host, None)
        return lost

    async def claim(self, hosts: list[str], count: int) -> list[Claimed]:
        """Take up to ``count`` of ``hosts`` whose lease is free (epoch + 1): no owner,
        expired, or held by a name with no live heartbeat. A store writer could give
        every lease to a replica that does not exist, for a year: a lease is only as
        good as its holder's heartbeat (docs/security.md)."""
        if count <= 0:
            return []
        sent_at = time.monotonic()

        async def claim(conn: Conn) -> list[tuple[Any, ...]]:
            return await (await conn.execute(
                "WITH free AS (SELECT l.host, l.owner FROM leases l WHERE l.host = ANY(%s) "  # noqa: S608 - constants only
                "AND (l.owner = '' OR l.expires <= now() OR NOT EXISTS (" + LIVE_OWNER + ")) "
                "ORDER BY l.host LIMIT %s FOR UPDATE OF l SKIP LOCKED) "
                "UPDATE leases SET owner = %s, epoch = leases.epoch + 1, "
                "expires = now() + make_interval(secs => %s) FROM free "
                "WHERE leases.host = free.host RETURNING leases.host, leases.epoch, free.owner",
                (hosts, self.lease_ttl, self.lease_ttl, count, self.replica,
                 self.lease_ttl))).fetchall()
        rows = await self._unfenced(claim)
        claimed = [Claimed(host, epoch, owner) for host, epoch, owner in rows]
        for c in claimed:
            self.fences[c.host] = Fence(c.epoch, self._fence_from(sent_at))
        return claimed

    async def release(self, host: str) -> None:
        """Hand a host back (its supervisor has stopped): free at once for another."""
        fence = self.fences.pop(host, None)
        if fence is None:
            return

        async def release(conn: Conn) -> None:
            await conn.execute("UPDATE leases SET owner = '', expires = now() "
                               "WHERE host = %s AND owner = %s AND epoch = %s",
                               (host, self.replica, fence.epoch))
        await self._unfenced(release)

    async def stop(self) -> None:
        """A clean stop: this replica is no longer counted for fair shares."""
        async def stop(conn: Conn) -> None:
            await conn.execute("UPDATE replicas SET stopped = true WHERE name = %s AND "
                               "instance = %s", (self.replica, self.instance))
        await self._unfenced(stop)

    async def replicas(self) -> list[ReplicaRecord]:
        rows = await self._rows(
            "SELECT name, extract(epoch FROM started), extract(epoch FROM heartbeat), "
            "NOT stopped AND heartbeat > now() - make_interval(secs => %s) FROM replicas "
            "ORDER BY name", (self.lease_ttl,))
        return [ReplicaRecord(name, float(started), float(beat), bool(alive))
                for name, started, beat, alive in rows]

    def _epoch(self, host: str) -> int:
        fence = self.fences.get(host)
        if fence is None:
            raise LeaseLost(host, "not held")
        return fence.epoch


def problem_of(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__
