"""Rollouts in the shared PostgreSQL store (docs/replicas.md "Rollouts"): the same
records as the embedded journal's (engine/rollout/ledger.py), read by every replica.

One replica leads the rollout under the rollout's lease (``rollout_lease``, a row of
``leases`` like a host's; each deployment's rollout has its own): its writes (a
phase or wave, a group's target, the fleet's program at commit) are fenced by that
lease, so a leader paused past it writes nothing more once another has taken over.
Operators' requests (pause, resume, undo, approve) are not fenced: anyone allowed
to ask may write them, and whoever leads next reads them. Each replica keeps its own
path to a program's body (``program_bodies``): bodies live in each replica's state
directory.
"""

from __future__ import annotations

import json
import time
from typing import Any

from orchestrator.engine.rollout.ledger import (
    PHASE_MOVES,
    ROLLOUT_COLUMNS,
    HistoryRecord,
    Phase,
    ProgramRecord,
    RolloutRecord,
    rollout_record,
)
from orchestrator.engine.store.leases import Conn
from orchestrator.engine.store.postgres import PostgresStore
from orchestrator.engine.store.protocol import rollout_lease
from orchestrator.errors import InvalidTransition

_OFFER_PROGRAM = "INSERT INTO fleet_program VALUES (1, %s, %s) ON CONFLICT (id) DO NOTHING"
_REPLACE_PROGRAM = ("INSERT INTO fleet_program VALUES (1, %s, %s) ON CONFLICT (id) DO UPDATE "
                    "SET program_id = excluded.program_id, ts = excluded.ts")
_OFFER_DEPLOYMENT_PROGRAM = ("INSERT INTO deployment_programs VALUES (%s, %s, %s) ON "
                             "CONFLICT (deployment) DO NOTHING")
_REPLACE_DEPLOYMENT_PROGRAM = ("INSERT INTO deployment_programs VALUES (%s, %s, %s) ON "
                               "CONFLICT (deployment) DO UPDATE SET program_id = "
                               "excluded.program_id, ts = excluded.ts")


class SharedLedger:
    """engine/rollout/ledger.py ``Ledger`` on the shared store; ``deployment``: that
    deployment's rollouts and program ("": the fleet's one model), led under its own
    lease."""

    def __init__(self, store: PostgresStore, deployment: str = "") -> None:
        self.store = store
        self.deployment = deployment
        self.lease = rollout_lease(deployment)

    # --- programs ----------------------------------------------------------------------

    async def record_program(self, program: ProgramRecord) -> None:
        async def write(conn: Conn) -> None:
            await conn.execute("INSERT INTO programs VALUES (%s, %s, %s, %s, %s) "
                               "ON CONFLICT DO NOTHING",
                               (program.program_id, program.model_id, program.version,
                                program.floor, time.time()))
            await conn.execute("INSERT INTO program_bodies VALUES (%s, %s, %s) ON CONFLICT "
                               "(program_id, replica) DO UPDATE SET body = excluded.body",
                               (program.program_id, self.store.replica, program.body))
        await self.store.transact(write)

    async def program(self, program_id: str) -> ProgramRecord | None:
        """The program, with this replica's path to its body (another's if it has none:
        replicas sharing a state directory, or the same layout)."""
        rows = await self.store.query(
            "SELECT p.program_id, p.model_id, p.version, p.floor, coalesce((SELECT body FROM "
            "program_bodies b WHERE b.program_id = p.program_id ORDER BY b.replica <> %s, "
            "b.replica LIMIT 1), '') FROM programs p WHERE p.program_id = %s",
            (self.store.replica, program_id))
        return ProgramRecord(*rows[0]) if rows else None

    async def fleet_program(self) -> str | None:
        if self.deployment:
            rows = await self.store.query("SELECT program_id FROM deployment_programs WHERE "
                                          "deployment = %s", (self.deployment,))
        else:
            rows = await self.store.query("SELECT program_id FROM fleet_program")
        return str(rows[0][0]) if rows else None

    async def set_fleet_program(self, program_id: str) -> None:
        await self._fleet_program(program_id, replace=True, lease=self.lease)

    async def offer_fleet_program(self, program_id: str, *, replace: bool = False) -> None:
        await self._fleet_program(program_id, replace=replace, lease=None)

    async def _fleet_program(self, program_id: str, *, replace: bool, lease: str | None
                             ) -> None:
        async def write(conn: Conn) -> None:
            if self.deployment:
                await conn.execute(
                    _REPLACE_DEPLOYMENT_PROGRAM if replace else _OFFER_DEPLOYMENT_PROGRAM,
                    (self.deployment, program_id, time.time()))
            else:
                await conn.execute(_REPLACE_PROGRAM if replace else _OFFER_PROGRAM,
                                   (program_id, time.time()))
        await self.store.transact(write, lease=lease)

    # --- rollouts ----------------------------------------------------------------------

    async def active(self) -> RolloutRecord | None:
        return await self._one("WHERE ended IS NULL AND deployment = %s ORDER BY id DESC "
                               "LIMIT 1", (self.deployment,))

    async def latest(self, from_program: str | None = None, to_program: str | None = None
                     ) -> RolloutRecord | None:
        if from_program is None:
            return await self._one("WHERE deployment = %s ORDER BY id DESC LIMIT 1",
                                   (self.deployment,))
        return await self._one("WHERE from_program = %s AND to_program = %s AND deployment "
                               "= %s ORDER BY id DESC LIMIT 1",
                               (from_program, to_program, self.deployment))

    async def get(self, rollout_id: int) -> RolloutRecord:
        record = await self._one("WHERE id = %s", (rollout_id,))
        assert record is not None  # noqa: S101 - rollouts are never deleted
        return record

    async def start(self, from_program: str, candidate: str, to_program: str,
                    waves: list[int], what: str, manual: list[int] | None = None
                    ) -> RolloutRecord:
        """At most one rollout (of a deployment) is in progress (a unique index): a
        replica that starts one at the same time as another gets the other's."""
        now = time.time()

        async def write(conn: Conn) -> int | None:
            row = await (await conn.execute(
                "INSERT INTO rollouts (started, updated, from_program, candidate, to_program, "
                "waves, wave, phase, manual, deployment) VALUES (%s, %s, %s, %s, %s, %s, 0, "
                "%s, %s, %s) ON CONFLICT DO NOTHING RETURNING id",
                (now, now, from_program, candidate, to_program, json.dumps(waves),
                 Phase.SWITCHING.value, json.dumps(manual or []),
                 self.deployment))).fetchone()
            if row is None:
                return None
            await self._history(conn, int(row[0]), 0, Phase.SWITCHING, what, now)
            return int(row[0])
        rollout_id = await self.store.transact(write)
        record = await (self.get(rollout_id) if rollout_id is not None else self.active())
        assert record is not None  # noqa: S101 - inserted, or the other one in progress
        return record

    async def advance(self, rollout: RolloutRecord, phase: Phase, what: str, *,
                      wave: int | None = None, verdict: str | None = None) -> RolloutRecord:
        """The leader's move, fenced by the rollout's lease, and only from the phase it
        read (a leader whose view is stale writes nothing: InvalidTransition)."""
        if phase not in PHASE_MOVES[rollout.phase]:
            raise InvalidTransition(f"rollout {rollout.id}", rollout.phase.value, phase.value)
        now = time.time()
        wave = rollout.wave if wave is None else wave

        async def write(conn: Conn) -> None:
            moved = await (await conn.execute(
                "UPDATE rollouts SET phase = %s, wave = %s, updated = %s, verdict = %s, "
                "ended = %s WHERE id = %s AND phase = %s AND wave = %s RETURNING id",
                (phase.value, wave, now, rollout.verdict if verdict is None else verdict,
                 now if phase.ended else None, rollout.id, rollout.phase.value,
                 rollout.wave))).fetchone()
            if moved is None:
                raise InvalidTransition(f"rollout {rollout.id} (moved by another leader)",
                                        rollout.phase.value, phase.value)
            await self._history(conn, rollout.id, wave, phase, what, now)
        await self.store.transact(write, lease=self.lease)
        return await self.get(rollout.id)

    async def request(self, rollout: RolloutRecord, *, paused: bool | None = None,
                      undo: bool = False, approved: int | None = None, what: str) -> None:
        now = time.time()

        async def write(conn: Conn) -> None:
            await conn.execute(
                "UPDATE rollouts SET paused = coalesce(%s, paused), undo = undo OR %s, "
                "approved = greatest(approved, coalesce(%s, approved)), updated = %s "
                "WHERE id = %s", (paused, undo, approved, now, rollout.id))
            await self._history(conn, rollout.id, rollout.wave, rollout.phase, what, now)
        await self.store.transact(write)

    async def history(self, rollout_id: int) -> list[HistoryRecord]:
        rows = await self.store.query("SELECT ts, wave, phase, what FROM rollout_history "
                                      "WHERE rollout = %s ORDER BY id", (rollout_id,))
        return [HistoryRecord(*row) for row in rows]

    # --- the groups' targets -------------------------------------------------------------

    async def targets(self, rollout_id: int) -> dict[int, str]:
        rows = await self.store.query("SELECT DISTINCT ON (grp) grp, program_id FROM "
                                      "group_targets WHERE rollout = %s ORDER BY grp, id DESC",
                                      (rollout_id,))
        return {int(group): str(program) for group, program in rows}

    async def set_target(self, rollout_id: int, group: int, program_id: str) -> None:
        fence = self.store.fences.get(self.lease)
        epoch = fence.epoch if fence is not None else 0

        async def write(conn: Conn) -> None:
            await conn.execute(
                "INSERT INTO group_targets (grp, program_id, rollout, replica, epoch, ts) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (group, program_id, rollout_id, self.store.replica, epoch, time.time()))
        await self.store.transact(write, lease=self.lease)

    async def leader(self) -> str:
        rows = await self.store.query("SELECT owner FROM leases WHERE host = %s AND "
                                      "expires > now()", (self.lease,))
        return str(rows[0][0]) if rows else ""

    # --- reading -------------------------------------------------------------------------

    async def _one(self, where: str, args: tuple[Any, ...] = ()) -> RolloutRecord | None:
        rows = await self.store.query(f"SELECT {ROLLOUT_COLUMNS} FROM rollouts {where}", args)  # noqa: S608 - constant columns and clauses
        return rollout_record(rows[0]) if rows else None

    async def _history(self, conn: Conn, rollout_id: int, wave: int, phase: Phase, what: str,
                       now: float) -> None:
        await conn.execute("INSERT INTO rollout_history (rollout, ts, wave, phase, what, "
                           "replica) VALUES (%s, %s, %s, %s, %s, %s)",
                           (rollout_id, now, wave, phase.value, what, self.store.replica))
