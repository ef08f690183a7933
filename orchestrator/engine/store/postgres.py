"""The shared Store: PostgreSQL through psycopg 3 (async, a connection pool).

Several replicas of the orchestrator share one fleet through it: the journal's
tables, and ``seals`` (the salt each body was encrypted with, so every replica
produces the same body), on top of the lease ledger (engine/store/leases.py:
connections, fencing, leases). docs/replicas.md describes the protocol.
No MEK, key or plaintext is ever written here.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio

from orchestrator.engine.placement import Group
from orchestrator.engine.state import CardTransition, HostTransition, KnownGood
from orchestrator.engine.store.leases import LIVE_OWNER, Conn, LeaseLedger
from orchestrator.engine.store.protocol import (
    ROLLOUT_LEASE,
    CardRecord,
    ChangeRecord,
    HostRecord,
    LoadRecord,
    LoadSent,
    Recorded,
    TransitionRecord,
    card_record,
    new_identity,
)
from orchestrator.engine.store.schema import CARD_COLUMNS
from orchestrator.terminal import terminal_safe

_OFFER_FLEET = "INSERT INTO fleet VALUES (1, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING"
_REPLACE_FLEET = ("INSERT INTO fleet VALUES (1, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE "
                  "SET digest = excluded.digest, what = excluded.what, "
                  "replica = excluded.replica, ts = excluded.ts")


@dataclass(frozen=True, slots=True)
class FleetPlan:
    """The plan a shared fleet runs: its digest (what replicas must agree on), what it
    is in words, which replica recorded it and when (unix seconds)."""

    digest: str
    what: str
    replica: str
    ts: float


_PLACEMENTS_LOCK = 0x6D6F64656C6971   # pg_advisory_xact_lock key: placements written


class PostgresStore(LeaseLedger):
    """A Store shared by replicas (engine/store/protocol.py), on the lease ledger."""

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

    # --- one fleet per store -----------------------------------------------------------

    async def fleet_plan(self) -> FleetPlan | None:
        """What the store's fleet runs, as the replica that set it said."""
        rows = await self._rows("SELECT digest, what, replica, ts FROM fleet WHERE id = 1")
        return FleetPlan(rows[0][0], terminal_safe(rows[0][1]), terminal_safe(rows[0][2]),
                         float(rows[0][3])) if rows else None

    async def offer_fleet_plan(self, digest: str, what: str, *, replace: bool = False
                               ) -> FleetPlan:
        """Record this replica's plan as the fleet's unless one is recorded already
        (``replace``: record it anyway, on purpose); returns the one recorded now."""
        async def offer(conn: Conn) -> None:
            await conn.execute(_REPLACE_FLEET if replace else _OFFER_FLEET,
                               (digest, what, self.replica, time.time()))
        await self._unfenced(offer)
        recorded = await self.fleet_plan()
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
                          concludes: tuple[int, str] | None = None) -> Recorded:
        good = t.known_good or KnownGood("", "", "", -1)
        epoch = self._epoch(t.host)
        if concludes is not None:
            # The load was sent under the lease; its outcome is a fact whoever holds
            # the lease now, so it is written even if this move is then refused.
            await self.finish_load(*concludes)

        async def write(conn: Conn) -> Recorded:
            # the card's row first: the history row's trigger reads it (revisions)
            await conn.execute(
                "UPDATE cards SET card_id = %s, state = %s, boot_counter = %s, "
                "session_id = %s, program_id = %s, attempts = %s, reason = %s, updated = %s, "
                "good_card_id = %s, good_session = %s, good_program = %s, "
                "good_partition = %s, replica = %s WHERE host = %s AND device = %s",
                (t.card_id, t.state.value, t.boot_counter, t.session_id, t.program_id,
                 t.attempts, t.reason, t.at, good.card_id, good.session_id, good.program_id,
                 good.partition, self.replica, t.host, t.device))
            await conn.execute(
                "INSERT INTO transitions (ts, host, device, card_id, from_state, to_state, "
                "boot_counter, session_id, reason, replica, epoch) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (t.at, t.host, t.device, t.card_id, t.previous.value, t.state.value,
                 t.boot_counter, t.session_id, t.reason, self.replica, epoch))
            revision = await _revision(conn)
            if load is None:
                return Recorded(0, revision)
            row = await (await conn.execute(
                "INSERT INTO loads (ts, host, device, card_id, session_id, program_id, "
                "partition, replica, epoch) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                "RETURNING id", (t.at, t.host, t.device, t.card_id, t.session_id,
                                 load.program_id, load.partition, self.replica,
                                 epoch))).fetchone()
            assert row is not None  # noqa: S101 - RETURNING
            return Recorded(int(row[0]), revision)
        return await self._fenced(t.host, write)

    async def record_host(self, t: HostTransition, address: str) -> int:
        async def write(conn: Conn) -> int:
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
            return await _revision(conn)
        return await self._fenced(t.host, write)

    async def hosts(self) -> list[HostRecord]:
        """Every host; ``owner`` only while a live replica holds its lease, and its
        expiry no later than now + the lease TTL (what a replica can have set)."""
        held = "l.expires > now() AND EXISTS (" + LIVE_OWNER + ")"
        rows = await self._rows(
            "SELECT l.host, coalesce(h.address, ''), coalesce(h.state, 'PENDING'), "  # noqa: S608 - constants only
            "coalesce(h.reason, ''), coalesce(h.updated, 0), "
            f"CASE WHEN {held} THEN l.owner ELSE '' END, "
            f"CASE WHEN {held} THEN extract(epoch FROM least(l.expires, now() + "
            "make_interval(secs => %s))) END "
            "FROM leases l LEFT JOIN hosts h ON h.host = l.host WHERE l.host <> %s AND "
            "l.host NOT LIKE %s ORDER BY l.host",
            (self.lease_ttl, self.lease_ttl, self.lease_ttl, self.lease_ttl, self.lease_ttl,
             ROLLOUT_LEASE, ROLLOUT_LEASE + ":%"))
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

    async def record_command(self, who: str, role: str, command: str, outcome: str
                             ) -> None:
        await self._rows("INSERT INTO commands (ts, who, role, command, outcome) VALUES "
                         "(%s, %s, %s, %s, %s) RETURNING id",
                         (time.time(), who, role, command, outcome))

    async def cordons(self) -> dict[str, str]:
        return {str(host): str(who) for host, who in await self._rows(
            "SELECT host, who FROM cordons")}

    async def placements(self) -> dict[str, list[Group]]:
        placed: dict[str, list[Group]] = {}
        for host, devices, deployment in await self._rows(
                "SELECT host, devices, deployment FROM placements ORDER BY host, devices"):
            placed.setdefault(str(deployment), []).append(
                Group(str(host), tuple(int(d) for d in json.loads(devices))))
        return placed

    async def record_placements(self, placed: Mapping[str, Sequence[Group]]) -> None:
        """Replicas place alike (a pure function of the same plan and the same record):
        the last to write writes what the first wrote. Replicas starting at once write
        one after the other (an advisory lock: each one's delete sees the other's
        rows)."""
        now = time.time()

        async def write(conn: Conn) -> None:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PLACEMENTS_LOCK,))
            await conn.execute("DELETE FROM placements")
            for name, groups in placed.items():
                for g in groups:
                    await conn.execute("INSERT INTO placements VALUES (%s, %s, %s, %s)",
                                       (g.host, json.dumps(list(g.devices)), name, now))
        await self._unfenced(write)

    async def forget_card(self, host: str, device: int) -> None:
        await self._rows("DELETE FROM cards WHERE host = %s AND device = %s RETURNING 1",
                         (host, device))

    async def fleet_identity(self) -> str:
        rows = await self._rows("INSERT INTO identity VALUES (1, %s, %s) ON CONFLICT (id) DO "
                                "UPDATE SET id = 1 RETURNING fleet", (new_identity(), time.time()))
        return str(rows[0][0])

    async def set_cordon(self, host: str, who: str | None) -> bool:
        if who is None:
            return bool(await self._rows("DELETE FROM cordons WHERE host = %s RETURNING 1",
                                         (host,)))
        return bool(await self._rows("INSERT INTO cordons VALUES (%s, %s, %s) ON CONFLICT "
                                     "DO NOTHING RETURNING 1", (host, who, time.time())))

    async def changes(self, after: int, limit: int = 1000) -> list[ChangeRecord]:
        rows = await self._rows("SELECT revision, ts, kind, body FROM changes WHERE "
                                "revision > %s ORDER BY revision LIMIT %s", (after, limit))
        return [ChangeRecord.of(row) for row in rows]

    async def revisions(self) -> tuple[int, int]:
        rows = await self._rows("SELECT coalesce(min(revision), 0), coalesce(max(revision), 0) "
                                "FROM changes")
        return int(rows[0][0]), int(rows[0][1])

    async def trim_changes(self, keep: int, seconds: float) -> None:
        await self._rows("DELETE FROM changes WHERE revision < (SELECT max(revision) FROM "
                         "changes) AND (revision <= (SELECT max(revision) FROM changes) - %s "
                         "OR ts < %s) RETURNING 1", (keep, time.time() - seconds))

    async def card_transitions(self, host: str, device: int, limit: int = 50
                               ) -> list[TransitionRecord]:
        rows = await self._rows("SELECT ts, host, device, from_state, to_state, reason FROM "
                                "transitions WHERE host = %s AND device = %s "
                                "ORDER BY id DESC LIMIT %s", (host, device, limit))
        return [TransitionRecord(*row) for row in rows][::-1]


async def _revision(conn: Conn) -> int:
    """The revision the change just written in this transaction got (its trigger drew
    it from the changes sequence in this session)."""
    row = await (await conn.execute(
        "SELECT currval(pg_get_serial_sequence('changes', 'revision'))")).fetchone()
    return int(row[0]) if row else 0


@asynccontextmanager
async def opened(url: str, replica: str, *, lease_ttl: float, migrate: bool = True
                 ) -> AsyncIterator[PostgresStore]:
    """The shared store at ``url``, open as ``replica`` (its schema made or migrated
    unless not ``migrate``: then StoreUnavailable if there is none), closed at the end."""
    store = PostgresStore(url, replica, lease_ttl=lease_ttl)
    await store.open(migrate=migrate)
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.close()
