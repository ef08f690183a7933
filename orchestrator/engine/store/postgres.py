"""The shared Store: PostgreSQL through psycopg 3 (async, a connection pool).

Several replicas of the orchestrator share one fleet through it. Besides the
journal's tables it keeps ``leases`` (which replica drives which host, and the
lease's epoch), ``replicas`` (heartbeats) and ``seals`` (the salt each body
was encrypted with, so every replica produces the same body). docs/replicas.md
describes the protocol; times that decide anything are the database's own
clock (``now()``), never a replica's.

Fencing: a write about a host runs in a transaction that first locks that
host's lease row (FOR SHARE) and checks owner, epoch and expiry; otherwise it
is LeaseLost and nothing is written. A claim needs the row exclusively, so
no write of an old holder can commit after a new holder's claim.

The store rides out a restart of the database: a failed statement is retried
(new connection, backoff) as long as the lease it serves is still valid here,
then it is LeaseLost (host writes) or StoreUnavailable (the rest).
No MEK, key or plaintext is ever written here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import anyio
import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from orchestrator.engine.state import CardTransition, HostTransition, KnownGood
from orchestrator.engine.store.schema import CARD_COLUMNS, POSTGRES_MIGRATIONS
from orchestrator.engine.store.sqlite import (
    CardRecord,
    HostRecord,
    LoadRecord,
    LoadSent,
    TransitionRecord,
    card_record,
)
from orchestrator.errors import LeaseLost, ReplicaNameInUse, StoreUnavailable

# The pool's own complaints (reconnects while the database restarts) are ours to
# report, once, as events: not log lines on stderr.
logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[tuple[Any, ...]]

_MIGRATION_LOCK = 0x6D6F64656C6970  # "modelip": pg_advisory_lock key for migrations


# libpq parameters that carry a secret (a URL may carry them in its query)
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def redact(url: str) -> str:
    """The URL without its secrets, in the user part or the query (for messages and
    status: never printed, logged or journaled otherwise)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL we can take apart: show none of it
        return "(a store URL that cannot be parsed)"
    netloc, query = parts.netloc, parts.query
    if password is not None:
        user = netloc.rsplit("@", 1)[0].split(":", 1)[0]
        netloc = f"{user}:***@{netloc.rsplit('@', 1)[1]}"
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key.lower() in SECRET_PARAMETERS for key, _ in pairs):
        query = "&".join(f"{key}={'***' if key.lower() in SECRET_PARAMETERS else value}"
                         for key, value in pairs)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


# A lease's owner exists: a replica of that name, not stopped, whose heartbeat is not
# from the future (a heartbeat written a year ahead is no heartbeat) and was seen
# within three lease periods (a replica beats every third of one: a late beat under
# load is not death; a real death is seen sooner, when its leases expire).
_LIVE_OWNER = ("SELECT 1 FROM replicas r WHERE r.name = l.owner AND NOT r.stopped "
               "AND r.heartbeat > now() - 3 * make_interval(secs => %s) "
               "AND r.heartbeat <= now() + make_interval(secs => %s)")


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


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


class PostgresStore:
    """A Store shared by replicas; also the leases' ledger (``claim``/``renew``/...)."""

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
            raise StoreUnavailable(self.label, f"cannot connect: {_why(exc)}") from None
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
            for statement in filter(str.strip, script.split(";")):
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
                    raise on_give_up(_why(exc)) from None
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
                "AND (l.owner = '' OR l.expires <= now() OR NOT EXISTS (" + _LIVE_OWNER + ")) "
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

    # --- seals: one body for every replica ----------------------------------------------

    async def seal(self, source_key: str) -> tuple[bytes, str] | None:
        """(salt, program id) recorded for this source, MEK and settings, if any."""
        rows = await self._rows("SELECT salt, program_id FROM seals WHERE source_key = %s",
                                (source_key,))
        return (bytes(rows[0][0]), rows[0][1]) if rows else None

    async def offer_seal(self, source_key: str, salt: bytes, program_id: str
                         ) -> tuple[bytes, str]:
        """Record this replica's encryption unless another was first; returns the winner."""
        async def offer(conn: Conn) -> None:
            await conn.execute("INSERT INTO seals VALUES (%s, %s, %s, %s, %s) "
                               "ON CONFLICT DO NOTHING",
                               (source_key, salt, program_id, self.replica, time.time()))
        await self._unfenced(offer)
        recorded = await self.seal(source_key)
        assert recorded is not None  # noqa: S101 - inserted or there already
        return recorded

    # --- the Store interface ------------------------------------------------------------

    async def ensure_cards(self, host: str, cards: Sequence[tuple[int, int, int]]
                           ) -> list[CardRecord]:
        now = time.time()

        async def ensure(conn: Conn) -> list[CardRecord]:
            records = []
            for device, group, partition in cards:
                row = await (await conn.execute(
                    "INSERT INTO cards (host, device, grp, partition, state, updated) "  # noqa: S608 - constant columns
                    "VALUES (%s, %s, %s, %s, 'PENDING', %s) ON CONFLICT (host, device) "
                    "DO UPDATE SET grp = excluded.grp, partition = excluded.partition "
                    f"RETURNING {CARD_COLUMNS}".encode(),
                    (host, device, group, partition, now))).fetchone()
                assert row is not None  # noqa: S101 - RETURNING
                records.append(card_record(row))
            return records
        return await self._unfenced(ensure)

    async def card(self, host: str, device: int) -> CardRecord | None:
        rows = await self._rows(f"SELECT {CARD_COLUMNS} FROM cards "  # noqa: S608 - constant
                                "WHERE host = %s AND device = %s", (host, device))
        return card_record(rows[0]) if rows else None

    async def cards(self) -> list[CardRecord]:
        rows = await self._rows(f"SELECT {CARD_COLUMNS} FROM cards "  # noqa: S608 - constant
                                "ORDER BY host, device")
        return [card_record(row) for row in rows]

    async def record_card(self, t: CardTransition, *, load: LoadSent | None = None,
                          concludes: tuple[int, str] | None = None) -> int:
        good = t.known_good or KnownGood("", "", "", -1)
        epoch = self._epoch(t.host)
        if concludes is not None:
            # The load was sent under the lease; its outcome is a fact whoever holds
            # the lease now, so it is written even if this move is then refused.
            await self.finish_load(*concludes)

        async def write(conn: Conn) -> int:
            await conn.execute(
                "INSERT INTO transitions (ts, host, device, card_id, from_state, to_state, "
                "boot_counter, session_id, reason, replica, epoch) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (t.at, t.host, t.device, t.card_id, t.previous.value, t.state.value,
                 t.boot_counter, t.session_id, t.reason, self.replica, epoch))
            await conn.execute(
                "UPDATE cards SET card_id = %s, state = %s, boot_counter = %s, "
                "session_id = %s, program_id = %s, attempts = %s, reason = %s, updated = %s, "
                "good_card_id = %s, good_session = %s, good_program = %s, "
                "good_partition = %s, replica = %s WHERE host = %s AND device = %s",
                (t.card_id, t.state.value, t.boot_counter, t.session_id, t.program_id,
                 t.attempts, t.reason, t.at, good.card_id, good.session_id, good.program_id,
                 good.partition, self.replica, t.host, t.device))
            if load is None:
                return 0
            row = await (await conn.execute(
                "INSERT INTO loads (ts, host, device, card_id, session_id, program_id, "
                "partition, replica, epoch) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "RETURNING id", (t.at, t.host, t.device, t.card_id, t.session_id,
                                 load.program_id, load.partition, self.replica,
                                 epoch))).fetchone()
            assert row is not None  # noqa: S101 - RETURNING
            return int(row[0])
        return await self._fenced(t.host, write)

    async def record_host(self, t: HostTransition, address: str) -> None:
        async def write(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO host_transitions (ts, host, from_state, to_state, reason, "
                "replica) VALUES (%s, %s, %s, %s, %s, %s)",
                (t.at, t.host, t.previous.value, t.state.value, t.reason, self.replica))
            await conn.execute(
                "INSERT INTO hosts VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (host) "
                "DO UPDATE SET address = excluded.address, state = excluded.state, "
                "reason = excluded.reason, updated = excluded.updated, "
                "replica = excluded.replica",
                (t.host, address, t.state.value, t.reason, t.at, self.replica))
        await self._fenced(t.host, write)

    async def hosts(self) -> list[HostRecord]:
        """Every host; ``owner`` only while a live replica holds its lease, and its
        expiry no later than now + the lease TTL (what a replica can have set)."""
        held = "l.expires > now() AND EXISTS (" + _LIVE_OWNER + ")"
        rows = await self._rows(
            "SELECT l.host, coalesce(h.address, ''), coalesce(h.state, 'PENDING'), "  # noqa: S608 - constants only
            "coalesce(h.reason, ''), coalesce(h.updated, 0), "
            f"CASE WHEN {held} THEN l.owner ELSE '' END, "
            f"CASE WHEN {held} THEN extract(epoch FROM least(l.expires, now() + "
            "make_interval(secs => %s))) END "
            "FROM leases l LEFT JOIN hosts h ON h.host = l.host ORDER BY l.host",
            (self.lease_ttl, self.lease_ttl, self.lease_ttl, self.lease_ttl, self.lease_ttl))
        return [HostRecord(host, address, state, reason, float(updated), owner,
                           None if expires is None else float(expires))
                for host, address, state, reason, updated, owner, expires in rows]

    async def finish_load(self, load_id: int, outcome: str) -> None:
        # The load was sent under the lease; its outcome is a fact whoever holds it now.
        async def write(conn: Conn) -> None:
            await conn.execute("UPDATE loads SET outcome = %s WHERE id = %s",
                               (outcome, load_id))
        await self._unfenced(write)

    async def loads(self) -> list[LoadRecord]:
        rows = await self._rows("SELECT host, device, session_id, program_id, partition, "
                                "outcome, replica FROM loads ORDER BY id")
        return [LoadRecord(*row) for row in rows]

    async def record_stage(self, host: str, program_id: str) -> None:
        async def write(conn: Conn) -> None:
            await conn.execute("INSERT INTO stages VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                               (host, program_id, time.time()))
        await self._fenced(host, write)

    async def record_unseal(self, replica: str, token: str, kek: str, blob: str) -> None:
        async def write(conn: Conn) -> None:
            await conn.execute("INSERT INTO unseals (ts, replica, token, kek, blob) "
                               "VALUES (%s, %s, %s, %s, %s)",
                               (time.time(), replica, token, kek, blob))
        await self._unfenced(write)

    async def unseals(self) -> list[tuple[float, str, str, str, str]]:
        rows = await self._rows("SELECT ts, replica, token, kek, blob FROM unseals ORDER BY id")
        return [(float(ts), r, token, kek, blob) for ts, r, token, kek, blob in rows]

    async def transitions(self, limit: int = 50) -> list[TransitionRecord]:
        rows = await self._rows("SELECT ts, host, device, from_state, to_state, reason FROM "
                                "transitions ORDER BY id DESC LIMIT %s", (limit,))
        return [TransitionRecord(*row) for row in rows][::-1]

    async def card_transitions(self, host: str, device: int, limit: int = 50
                               ) -> list[TransitionRecord]:
        rows = await self._rows("SELECT ts, host, device, from_state, to_state, reason FROM "
                                "transitions WHERE host = %s AND device = %s "
                                "ORDER BY id DESC LIMIT %s", (host, device, limit))
        return [TransitionRecord(*row) for row in rows][::-1]

    def _epoch(self, host: str) -> int:
        fence = self.fences.get(host)
        if fence is None:
            raise LeaseLost(host, "not held")
        return fence.epoch


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] or type(exc).__name__
