"""The journal's record of what a fleet with deployments runs, and the changed plans
`modelip apply` hands to the watch running it (docs/deployments.md "Applying"). Its
own connection to the journal: `apply` writes a request from its process, the watch
reads and answers it from its own."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import StateDirError

REQUESTED, APPLIED, REFUSED = "requested", "applied", "refused"


@dataclass(frozen=True, slots=True)
class ApplyRequest:
    id: int
    plan: Path
    digest: str       # SHA-256 of the plan file as `apply` read it
    who: str
    state: str
    said: str


class Applies:
    def __init__(self, journal: Path) -> None:
        self.path = journal

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        except sqlite3.Error as exc:
            raise StateDirError(self.path, f"cannot open the journal: {exc}") from None
        try:
            yield db
        except sqlite3.Error as exc:
            raise StateDirError(self.path, f"the journal: {exc}") from None
        finally:
            db.close()

    def running(self) -> dict[str, dict[str, Any]]:
        """The deployments the fleet runs, by name: their specs as the plan said."""
        with self._db() as db:
            return {str(name): json.loads(spec)
                    for name, spec in db.execute("SELECT name, spec FROM deployments")}

    def record_running(self, specs: Mapping[str, Mapping[str, Any]]) -> None:
        now = time.time()
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM deployments")
            db.executemany("INSERT INTO deployments VALUES (?, ?, ?)",
                           [(name, json.dumps(spec, sort_keys=True), now)
                            for name, spec in specs.items()])
            db.execute("COMMIT")

    def request(self, plan: Path, digest: str, who: str) -> int:
        with self._db() as db:
            cursor = db.execute("INSERT INTO applies (ts, plan, digest, who) VALUES "
                                "(?, ?, ?, ?)", (time.time(), str(plan), digest, who))
            return int(cursor.lastrowid or 0)

    def pending(self) -> ApplyRequest | None:
        """The oldest request no watch has answered."""
        return self._one("WHERE state = ? ORDER BY id LIMIT 1", (REQUESTED,))

    def get(self, number: int) -> ApplyRequest | None:
        return self._one("WHERE id = ?", (number,))

    def answer(self, number: int, state: str, said: str) -> None:
        with self._db() as db:
            db.execute("UPDATE applies SET state = ?, said = ?, done = ? WHERE id = ?",
                       (state, said, time.time(), number))

    def _one(self, where: str, args: tuple[object, ...]) -> ApplyRequest | None:
        with self._db() as db:
            row = db.execute("SELECT id, plan, digest, who, state, said FROM applies "  # noqa: S608 - constant clauses
                             + where, args).fetchone()
        return None if row is None else ApplyRequest(int(row[0]), Path(row[1]), str(row[2]),
                                                      str(row[3]), str(row[4]), str(row[5]))
