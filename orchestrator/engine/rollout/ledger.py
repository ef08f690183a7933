"""What the journal keeps of rollouts (docs/rollouts.md): the programs the fleet
has served, the one it serves now, and every rollout with the history of its
waves and its verdict. The running engine writes it; `modelip rollout pause |
resume | undo` write a request into it that the running engine (or the next
one) carries out.
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from orchestrator.engine.store.sqlite import SQLiteStore
from orchestrator.errors import InvalidTransition


class Phase(enum.Enum):
    SWITCHING = "switching"        # the current wave's groups are being switched
    GATING = "gating"              # the wave's groups: serving, smoke, soak
    ROLLING_BACK = "rolling back"  # every switched group back to the previous version
    COMMITTING = "committing"      # every group to the version with the raised floor
    COMMITTED = "committed"
    ROLLED_BACK = "rolled back"

    @property
    def ended(self) -> bool:
        return self in (Phase.COMMITTED, Phase.ROLLED_BACK)

    def __repr__(self) -> str:
        return self.name


P = Phase
# A rollout's moves (docs/rollouts.md), as cards and hosts have theirs: a wave is
# switched then gated; a gate passes to the next wave, to committing (the version with
# the raised floor) or to committed (the candidate was that version already), or
# fails and rolls back; an undo rolls back from switching or gating.
PHASE_MOVES: dict[Phase, frozenset[Phase]] = {
    P.SWITCHING: frozenset({P.GATING, P.ROLLING_BACK}),
    P.GATING: frozenset({P.SWITCHING, P.COMMITTING, P.COMMITTED, P.ROLLING_BACK}),
    P.COMMITTING: frozenset({P.COMMITTED}),
    P.ROLLING_BACK: frozenset({P.ROLLED_BACK}),
    P.COMMITTED: frozenset(),
    P.ROLLED_BACK: frozenset(),
}


@dataclass(frozen=True, slots=True)
class ProgramRecord:
    program_id: str
    model_id: str
    version: int
    floor: int
    body: str


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    id: int
    started: float
    updated: float
    ended: float | None
    from_program: str      # what the fleet served before
    candidate: str         # the new version, sealed with the old floor (a way back)
    to_program: str        # the new version as the plan seals it (loaded at commit)
    waves: tuple[int, ...]  # cumulative group counts at the end of each wave
    wave: int              # 0-based: the wave being switched or gated
    phase: Phase
    paused: bool
    undo: bool
    verdict: str
    manual: tuple[int, ...] = ()  # the waves that wait for an operator's approval
    approved: int = -1            # the last of them approved

    @property
    def groups(self) -> int:
        return self.waves[-1]

    def awaits_approval(self, wave: int) -> bool:
        """Wave ``wave`` (0-based) is not to be switched yet: it waits for an approval."""
        return wave in self.manual and self.approved < wave


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    ts: float
    wave: int
    phase: str
    what: str


ROLLOUT_COLUMNS = ("id, started, updated, ended, from_program, candidate, to_program, waves, wave, "
            "phase, paused, undo, verdict, manual, approved")


def rollout_record(row: tuple[object, ...]) -> RolloutRecord:
    values = list(row)
    values[7] = tuple(json.loads(str(values[7])))
    values[9] = Phase(values[9])
    values[10], values[11] = bool(values[10]), bool(values[11])
    values[13] = tuple(json.loads(str(values[13])))
    return RolloutRecord(*values)  # type: ignore[arg-type]


class Ledger(Protocol):
    """Where rollouts are recorded: the embedded journal (RolloutLedger) or the shared
    store (rollout/shared.py SharedLedger, whose leader's writes are fenced by the
    rollout's lease)."""

    async def record_program(self, program: ProgramRecord) -> None: ...
    async def program(self, program_id: str) -> ProgramRecord | None: ...
    async def fleet_program(self) -> str | None: ...
    async def set_fleet_program(self, program_id: str) -> None:
        """The leader's: the fleet serves this program now (a commit)."""
    async def offer_fleet_program(self, program_id: str, *, replace: bool = False) -> None:
        """The fleet's program, unless one is recorded already (``replace``: anyway: a
        new version without a rollout replaces the old at once)."""
    async def active(self) -> RolloutRecord | None: ...
    async def latest(self, from_program: str | None = None, to_program: str | None = None
                     ) -> RolloutRecord | None: ...
    async def get(self, rollout_id: int) -> RolloutRecord: ...
    async def start(self, from_program: str, candidate: str, to_program: str,
                    waves: list[int], what: str, manual: list[int] | None = None
                    ) -> RolloutRecord:
        """A new rollout; the one in progress instead, if another started it first."""
    async def advance(self, rollout: RolloutRecord, phase: Phase, what: str, *,
                      wave: int | None = None, verdict: str | None = None
                      ) -> RolloutRecord: ...
    async def request(self, rollout: RolloutRecord, *, paused: bool | None = None,
                      undo: bool = False, approved: int | None = None, what: str) -> None: ...
    async def history(self, rollout_id: int) -> list[HistoryRecord]: ...
    async def targets(self, rollout_id: int) -> dict[int, str]:
        """The groups the leader switched and the program each is to run."""
    async def set_target(self, rollout_id: int, group: int, program_id: str) -> None:
        """The leader's: ``group`` is to run ``program_id``, for every replica."""
    async def leader(self) -> str:
        """The replica leading the rollout now ("": none, or one process)."""


_OFFER_FLEET_PROGRAM = "INSERT INTO fleet_program VALUES (1, ?, ?) ON CONFLICT(id) DO NOTHING"
_REPLACE_FLEET_PROGRAM = ("INSERT INTO fleet_program VALUES (1, ?, ?) ON CONFLICT(id) DO UPDATE "
                          "SET program_id = excluded.program_id, ts = excluded.ts")
_OFFER_DEPLOYMENT_PROGRAM = ("INSERT INTO deployment_programs VALUES (?, ?, ?) ON "
                             "CONFLICT(deployment) DO NOTHING")
_REPLACE_DEPLOYMENT_PROGRAM = ("INSERT INTO deployment_programs VALUES (?, ?, ?) ON "
                               "CONFLICT(deployment) DO UPDATE SET program_id = "
                               "excluded.program_id, ts = excluded.ts")


class RolloutLedger:
    """Rollout records in the embedded journal (same file, same write-ahead rules).
    One process drives every group, so the groups' targets live in its drivers.
    ``deployment``: the rollouts of that deployment of the fleet, and the program it
    serves ("": the fleet's one model)."""

    def __init__(self, store: SQLiteStore, deployment: str = "") -> None:
        self.store = store
        self.deployment = deployment

    # --- programs ----------------------------------------------------------------------

    async def record_program(self, program: ProgramRecord) -> None:
        self.store.execute(
            "INSERT INTO programs VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(program_id) DO "
            "UPDATE SET body = excluded.body",
            (program.program_id, program.model_id, program.version, program.floor,
             program.body, time.time()))

    async def program(self, program_id: str) -> ProgramRecord | None:
        row = self.store.query("SELECT program_id, model_id, version, floor, body FROM "
                               "programs WHERE program_id = ?", (program_id,)).fetchone()
        return None if row is None else ProgramRecord(*row)

    async def fleet_program(self) -> str | None:
        """The program the whole fleet (or the deployment) is meant to serve (None:
        never recorded)."""
        if self.deployment:
            row = self.store.query("SELECT program_id FROM deployment_programs WHERE "
                                   "deployment = ?", (self.deployment,)).fetchone()
        else:
            row = self.store.query("SELECT program_id FROM fleet_program").fetchone()
        return None if row is None else str(row[0])

    async def set_fleet_program(self, program_id: str) -> None:
        await self.offer_fleet_program(program_id, replace=True)

    async def offer_fleet_program(self, program_id: str, *, replace: bool = False) -> None:
        if self.deployment:
            self.store.execute(_REPLACE_DEPLOYMENT_PROGRAM if replace else
                               _OFFER_DEPLOYMENT_PROGRAM,
                               (self.deployment, program_id, time.time()))
        else:
            self.store.execute(_REPLACE_FLEET_PROGRAM if replace else _OFFER_FLEET_PROGRAM,
                               (program_id, time.time()))

    async def targets(self, rollout_id: int) -> dict[int, str]:
        return {}

    async def set_target(self, rollout_id: int, group: int, program_id: str) -> None:
        return None

    async def leader(self) -> str:
        return ""

    # --- rollouts ----------------------------------------------------------------------

    async def active(self) -> RolloutRecord | None:
        row = self.store.query(f"SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE ended IS NULL "  # noqa: S608 - constant columns
                               "AND deployment = ? ORDER BY id DESC LIMIT 1",
                               (self.deployment,)).fetchone()
        return None if row is None else rollout_record(row)

    async def latest(self, from_program: str | None = None, to_program: str | None = None
                     ) -> RolloutRecord | None:
        """The newest rollout (of ``from_program`` to ``to_program`` if given)."""
        if from_program is None:
            row = self.store.query(f"SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE "  # noqa: S608 - constant columns
                                   "deployment = ? ORDER BY id DESC LIMIT 1",
                                   (self.deployment,)).fetchone()
        else:
            row = self.store.query(f"SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE from_program = ? "  # noqa: S608 - constant columns
                                   "AND to_program = ? AND deployment = ? ORDER BY id DESC "
                                   "LIMIT 1", (from_program, to_program, self.deployment)
                                   ).fetchone()
        return None if row is None else rollout_record(row)

    async def get(self, rollout_id: int) -> RolloutRecord:
        row = self.store.query(f"SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?",  # noqa: S608 - constant columns
                               (rollout_id,)).fetchone()
        return rollout_record(row)

    async def start(self, from_program: str, candidate: str, to_program: str,
                    waves: list[int], what: str, manual: list[int] | None = None
                    ) -> RolloutRecord:
        """A new rollout; ``manual``: the waves that wait for an operator's approval."""
        now = time.time()
        with self.store.transaction() as execute:
            cursor = execute(
                "INSERT INTO rollouts (started, updated, from_program, candidate, to_program, "
                "waves, wave, phase, manual, deployment) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                (now, now, from_program, candidate, to_program, json.dumps(waves),
                 Phase.SWITCHING.value, json.dumps(manual or []), self.deployment))
            rollout_id = int(cursor.lastrowid or 0)
            self._history(execute, rollout_id, 0, Phase.SWITCHING, what, now)
        return await self.get(rollout_id)

    async def advance(self, rollout: RolloutRecord, phase: Phase, what: str, *,
                      wave: int | None = None, verdict: str | None = None) -> RolloutRecord:
        """Move the rollout (journaled with a line of history) and return it as stored.
        InvalidTransition if PHASE_MOVES does not allow the move (nothing is written)."""
        if phase not in PHASE_MOVES[rollout.phase]:
            raise InvalidTransition(f"rollout {rollout.id}", rollout.phase.value, phase.value)
        now = time.time()
        wave = rollout.wave if wave is None else wave
        with self.store.transaction() as execute:
            execute(
                "UPDATE rollouts SET phase = ?, wave = ?, updated = ?, verdict = ?, "
                "ended = ? WHERE id = ?",
                (phase.value, wave, now, rollout.verdict if verdict is None else verdict,
                 now if phase.ended else None, rollout.id))
            self._history(execute, rollout.id, wave, phase, what, now)
        return await self.get(rollout.id)

    async def request(self, rollout: RolloutRecord, *, paused: bool | None = None,
                      undo: bool = False, approved: int | None = None, what: str) -> None:
        """An operator's request (pause, resume, undo, approve a wave), for the engine
        to carry out."""
        now = time.time()
        with self.store.transaction() as execute:
            execute(
                "UPDATE rollouts SET paused = ?, undo = ?, approved = ?, updated = ? "
                "WHERE id = ?",
                (rollout.paused if paused is None else paused, rollout.undo or undo,
                 rollout.approved if approved is None else max(approved, rollout.approved),
                 now, rollout.id))
            self._history(execute, rollout.id, rollout.wave, rollout.phase, what, now)

    async def history(self, rollout_id: int) -> list[HistoryRecord]:
        rows = self.store.query("SELECT ts, wave, phase, what FROM rollout_history WHERE "
                                "rollout = ? ORDER BY id", (rollout_id,))
        return [HistoryRecord(*row) for row in rows]

    @staticmethod
    def _history(execute: Callable[[str, tuple[object, ...]], object], rollout_id: int,
                 wave: int, phase: Phase, what: str, now: float) -> None:
        execute("INSERT INTO rollout_history (rollout, ts, wave, phase, what) "
                "VALUES (?, ?, ?, ?, ?)", (rollout_id, now, wave, phase.value, what))
