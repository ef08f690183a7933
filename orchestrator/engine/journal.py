"""The journal: SQLite (stdlib) in the state directory, written ahead of action.

Every card transition is committed before the engine acts on it, and every
LoadProgram before it is sent, so an orchestrator killed at any instant and
started again knows what it was doing. The MEK is never stored here.
WAL mode with synchronous=NORMAL: a commit survives the process being killed
(the case that matters here); power loss may lose the last commits, which the
resume path tolerates (it re-verifies every card with a fresh attestation).
docs/operations.md describes the tables.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import FileInputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS cards (
    host TEXT NOT NULL, device INTEGER NOT NULL, card_id TEXT NOT NULL DEFAULT '',
    grp INTEGER NOT NULL, partition INTEGER NOT NULL, state TEXT NOT NULL,
    boot_counter INTEGER NOT NULL DEFAULT 0, session_id TEXT NOT NULL DEFAULT '',
    program_id TEXT NOT NULL DEFAULT '', attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '', updated REAL NOT NULL,
    PRIMARY KEY (host, device));
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, host TEXT NOT NULL, device INTEGER NOT NULL,
    card_id TEXT NOT NULL, from_state TEXT NOT NULL, to_state TEXT NOT NULL,
    boot_counter INTEGER NOT NULL, session_id TEXT NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS loads (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, host TEXT NOT NULL, device INTEGER NOT NULL,
    card_id TEXT NOT NULL, session_id TEXT NOT NULL, program_id TEXT NOT NULL,
    partition INTEGER NOT NULL, outcome TEXT NOT NULL DEFAULT 'sent');
CREATE TABLE IF NOT EXISTS stages (
    host TEXT NOT NULL, program_id TEXT NOT NULL, ts REAL NOT NULL,
    PRIMARY KEY (host, program_id));
"""


@dataclass(frozen=True, slots=True)
class CardRecord:
    host: str
    device: int
    card_id: str
    group: int
    partition: int
    state: str
    boot_counter: int
    session_id: str
    program_id: str
    attempts: int
    reason: str
    updated: float


class Journal:
    """One SQLite connection, used from the event loop's thread only."""

    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise FileInputError(path, f"cannot open the journal: {exc}") from None
        self.path = path
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- cards --------------------------------------------------------------------

    def ensure_card(self, host: str, device: int, group: int, partition: int) -> CardRecord:
        self._db.execute(
            "INSERT INTO cards (host, device, grp, partition, state, updated) "
            "VALUES (?, ?, ?, ?, 'PENDING', ?) ON CONFLICT(host, device) DO UPDATE SET "
            "grp = excluded.grp, partition = excluded.partition",
            (host, device, group, partition, time.time()))
        record = self.card(host, device)
        assert record is not None  # noqa: S101 - just written
        return record

    def card(self, host: str, device: int) -> CardRecord | None:
        row = self._db.execute(
            "SELECT host, device, card_id, grp, partition, state, boot_counter, session_id, "
            "program_id, attempts, reason, updated FROM cards WHERE host = ? AND device = ?",
            (host, device)).fetchone()
        return None if row is None else CardRecord(*row)

    def cards(self) -> list[CardRecord]:
        rows = self._db.execute(
            "SELECT host, device, card_id, grp, partition, state, boot_counter, session_id, "
            "program_id, attempts, reason, updated FROM cards ORDER BY host, device")
        return [CardRecord(*row) for row in rows]

    def record_transition(self, host: str, device: int, *, card_id: str, from_state: str,
                          to_state: str, boot_counter: int, session_id: str, program_id: str,
                          attempts: int, reason: str) -> None:
        """One transaction: the history row and the card's current row."""
        now = time.time()
        with self._transaction():
            self._db.execute(
                "INSERT INTO transitions (ts, host, device, card_id, from_state, to_state, "
                "boot_counter, session_id, reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (now, host, device, card_id, from_state, to_state, boot_counter, session_id,
                 reason))
            self._db.execute(
                "UPDATE cards SET card_id = ?, state = ?, boot_counter = ?, session_id = ?, "
                "program_id = ?, attempts = ?, reason = ?, updated = ? "
                "WHERE host = ? AND device = ?",
                (card_id, to_state, boot_counter, session_id, program_id, attempts, reason,
                 now, host, device))

    def record_load(self, host: str, device: int, *, card_id: str, session_id: str,
                    program_id: str, partition: int) -> int:
        cursor = self._db.execute(
            "INSERT INTO loads (ts, host, device, card_id, session_id, program_id, partition) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (time.time(), host, device, card_id, session_id, program_id, partition))
        return int(cursor.lastrowid or 0)

    def finish_load(self, load_id: int, outcome: str) -> None:
        self._db.execute("UPDATE loads SET outcome = ? WHERE id = ?", (outcome, load_id))

    def loads(self) -> list[tuple[str, int, str, str, str]]:
        """(host, device, session id, program id, outcome) of every load sent, in order."""
        rows = self._db.execute(
            "SELECT host, device, session_id, program_id, outcome FROM loads ORDER BY id")
        return [(str(h), int(d), str(s), str(p), str(o)) for h, d, s, p, o in rows]

    def transitions(self, limit: int = 50) -> list[tuple[float, str, int, str, str, str]]:
        rows = self._db.execute(
            "SELECT ts, host, device, from_state, to_state, reason FROM transitions "
            "ORDER BY id DESC LIMIT ?", (limit,))
        return [(float(t), str(h), int(d), str(f), str(to), str(r)) for t, h, d, f, to, r
                in rows][::-1]

    # --- stages -------------------------------------------------------------------

    def record_stage(self, host: str, program_id: str) -> None:
        self._db.execute("INSERT OR IGNORE INTO stages VALUES (?, ?, ?)",
                         (host, program_id, time.time()))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
