"""The embedded Store (engine/store/protocol.py): one file in the state
directory (WAL, synchronous=NORMAL: a commit survives the process being
killed; power loss may lose the last commits, which resuming tolerates since
it re-attests every card). Every failure of the state directory (read-only,
full, the journal deleted under a running engine) is a StateDirError.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.lowlevel

from orchestrator.engine.placement import Group
from orchestrator.engine.state import CardTransition, HostTransition, KnownGood
from orchestrator.engine.store.protocol import (
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
from orchestrator.engine.store.schema import CARD_COLUMNS, SQLITE_MIGRATIONS
from orchestrator.errors import StateDirError


class SQLiteStore:
    """The embedded Store: one SQLite connection, used from the event loop's thread."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        self._inode = 0
        self._checked = 0.0
        self._batch: _Batch | None = None
        try:
            if read_only:
                self._db = _open_read_only(path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, isolation_level=None)
                self._inode = os.stat(path).st_ino
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StateDirError(path, f"cannot open the journal: {_why(exc)}") from None

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        for number, script in enumerate(SQLITE_MIGRATIONS[version:], start=version + 1):
            statements = script if isinstance(script, tuple) else script.split(";")
            with self._transaction():
                for statement in filter(str.strip, statements):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- cards --------------------------------------------------------------------

    async def ensure_cards(self, host: str, cards: Sequence[tuple[int, int, int]]
                           ) -> list[CardRecord]:
        """The records of a host's cards, given as (device, group, partition): created
        PENDING if new, their group and partition as given; one transaction."""
        now = time.time()
        with self._transaction():
            return [card_record(self._db.execute(
                "INSERT INTO cards (host, device, grp, partition, state, updated) "  # noqa: S608 - constant columns
                "VALUES (?, ?, ?, ?, 'PENDING', ?) ON CONFLICT(host, device) DO UPDATE SET "
                f"grp = excluded.grp, partition = excluded.partition RETURNING {CARD_COLUMNS}",
                (host, device, group, partition, now)).fetchone())
                for device, group, partition in cards]

    async def card(self, host: str, device: int) -> CardRecord | None:
        row = self._read(f"SELECT {CARD_COLUMNS} FROM cards WHERE host = ? AND device = ?",  # noqa: S608 - constant columns
                         (host, device)).fetchone()
        return None if row is None else card_record(row)

    async def cards(self) -> list[CardRecord]:
        rows = self._read(f"SELECT {CARD_COLUMNS} FROM cards ORDER BY host, device")  # noqa: S608 - constant columns
        return [card_record(row) for row in rows]

    async def record_card(self, t: CardTransition, *, load: LoadSent | None = None,
                          concludes: tuple[int, str] | None = None) -> Recorded:
        """One row, which a trigger applies to the card's current row (and the load it
        announces or ends); committed with the other moves of the same instant (group
        commit), returned once committed."""
        good = t.known_good or KnownGood("", "", "", -1)
        rows: list[tuple[str, tuple[object, ...]]] = [(
            "INSERT INTO transitions (ts, host, device, card_id, from_state, to_state, "
            "boot_counter, session_id, reason, program_id, attempts, good_card_id, "
            "good_session, good_program, good_partition) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (t.at, t.host, t.device, t.card_id, t.previous.value, t.state.value,
             t.boot_counter, t.session_id, t.reason, t.program_id, t.attempts, good.card_id,
             good.session_id, good.program_id, good.partition))]
        if concludes is not None:
            rows.append(_finish_load_row(*concludes))
        if load is not None:
            rows.append((
                "INSERT INTO loads (ts, host, device, card_id, session_id, program_id, "
                "partition) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (t.at, t.host, t.device, t.card_id, t.session_id, load.program_id,
                 load.partition)))
        written = await self._group_commit(rows)
        return Recorded(written[-1][0] if load is not None else 0, written[0][1])

    # --- hosts --------------------------------------------------------------------

    async def record_host(self, t: HostTransition, address: str) -> int:
        with self._transaction():
            self._db.execute(
                "INSERT INTO host_transitions (ts, host, from_state, to_state, reason) "
                "VALUES (?, ?, ?, ?, ?)", (t.at, t.host, t.previous.value, t.state.value,
                                           t.reason))
            self._db.execute(
                "INSERT INTO hosts VALUES (?, ?, ?, ?, ?) ON CONFLICT(host) DO UPDATE SET "
                "address = excluded.address, state = excluded.state, "
                "reason = excluded.reason, updated = excluded.updated",
                (t.host, address, t.state.value, t.reason, t.at))
            return self._revision()

    async def hosts(self) -> list[HostRecord]:
        rows = self._read("SELECT host, address, state, reason, updated FROM hosts "
                          "ORDER BY host")
        return [HostRecord(*row) for row in rows]

    # --- loads and stages ---------------------------------------------------------

    async def finish_load(self, load_id: int, outcome: str) -> None:
        await self._group_commit([_finish_load_row(load_id, outcome)])

    async def loads(self) -> list[LoadRecord]:
        """Every load sent, in order."""
        rows = self._read("SELECT host, device, session_id, program_id, partition, outcome "
                          "FROM loads ORDER BY id")
        return [LoadRecord(*row) for row in rows]

    async def record_stage(self, host: str, program_id: str) -> None:
        self._write("INSERT OR IGNORE INTO stages VALUES (?, ?, ?)",
                    (host, program_id, time.time()))

    async def record_unseal(self, replica: str, token: str, kek: str, blob: str) -> None:
        """The MEK was unsealed by a token (who, which KEK, which blob; never key bytes)."""
        with self._transaction():
            self._db.execute("INSERT INTO unseals (ts, replica, token, kek, blob) "
                             "VALUES (?, ?, ?, ?, ?)", (time.time(), replica, token, kek, blob))

    async def unseals(self) -> list[tuple[float, str, str, str, str]]:
        rows = self._read("SELECT ts, replica, token, kek, blob FROM unseals ORDER BY id")
        return [tuple(row) for row in rows]

    async def transitions(self, limit: int = 50) -> list[TransitionRecord]:
        rows = self._read("SELECT ts, host, device, from_state, to_state, reason FROM "
                          "transitions ORDER BY id DESC LIMIT ?", (limit,))
        return [TransitionRecord(*row) for row in rows][::-1]

    async def record_command(self, who: str, role: str, command: str, outcome: str
                             ) -> None:
        self._write("INSERT INTO commands (ts, who, role, command, outcome) VALUES "
                    "(?, ?, ?, ?, ?)", (time.time(), who, role, command, outcome))

    async def placements(self) -> dict[str, list[Group]]:
        """Where each deployment's groups were placed (docs/deployments.md)."""
        placed: dict[str, list[Group]] = {}
        for host, devices, deployment in self._read("SELECT host, devices, deployment FROM "
                                                    "placements ORDER BY host, devices"):
            placed.setdefault(str(deployment), []).append(
                Group(str(host), tuple(int(d) for d in json.loads(devices))))
        return placed

    async def record_placements(self, placed: Mapping[str, Sequence[Group]]) -> None:
        now = time.time()
        with self._transaction():
            self._db.execute("DELETE FROM placements")
            self._db.executemany("INSERT INTO placements VALUES (?, ?, ?, ?)", [
                (g.host, json.dumps(list(g.devices)), name, now)
                for name, groups in placed.items() for g in groups])

    async def forget_card(self, host: str, device: int) -> None:
        self._write("DELETE FROM cards WHERE host = ? AND device = ?", (host, device))

    async def fleet_identity(self) -> str:
        if not self.read_only:
            self._write("INSERT INTO identity VALUES (1, ?, ?) ON CONFLICT DO NOTHING",
                        (new_identity(), time.time()))
        row = self._read("SELECT fleet FROM identity").fetchone()
        return str(row[0]) if row else ""

    async def cordons(self) -> dict[str, str]:
        return {str(host): str(who) for host, who in self._read("SELECT host, who FROM "
                                                                "cordons")}

    async def set_cordon(self, host: str, who: str | None) -> bool:
        if who is None:
            return self._write("DELETE FROM cordons WHERE host = ?", (host,)).rowcount > 0
        return self._write("INSERT INTO cordons VALUES (?, ?, ?) ON CONFLICT (host) DO "
                           "NOTHING", (host, who, time.time())).rowcount > 0

    async def changes(self, after: int, limit: int = 1000) -> list[ChangeRecord]:
        rows = self._read("SELECT revision, ts, kind, body FROM changes WHERE revision > ? "
                          "ORDER BY revision LIMIT ?", (after, limit))
        return [ChangeRecord.of(row) for row in rows]

    async def revisions(self) -> tuple[int, int]:
        oldest = self._read("SELECT coalesce(min(revision), 0) FROM changes").fetchone()[0]
        newest = self._read("SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE "
                            "name = 'changes'").fetchone()[0]
        return int(oldest), int(newest)

    async def trim_changes(self, keep: int, seconds: float) -> None:
        self._write("DELETE FROM changes WHERE revision < (SELECT max(revision) FROM "
                    "changes) AND (revision <= (SELECT max(revision) FROM changes) - ? "
                    "OR ts < ?)", (keep, time.time() - seconds))

    async def card_transitions(self, host: str, device: int, limit: int = 50
                               ) -> list[TransitionRecord]:
        """One card's history, oldest first (the last ``limit`` moves)."""
        rows = self._read("SELECT ts, host, device, from_state, to_state, reason FROM "
                          "transitions WHERE host = ? AND device = ? ORDER BY id DESC "
                          "LIMIT ?", (host, device, limit))
        return [TransitionRecord(*row) for row in rows][::-1]

    # --- plumbing -----------------------------------------------------------------

    # --- the seam for the journal's other tables (the rollout ledger) ------------------

    def query(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        """Read from the journal; StateDirError if it cannot be read."""
        return self._read(sql, args)

    def execute(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        """One write, atomic on its own; StateDirError if it cannot be written."""
        return self._write(sql, args)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Callable[[str, tuple[object, ...]], sqlite3.Cursor]]:
        """Several writes in one commit: yields the statement runner of the
        transaction; StateDirError if the disk fails (nothing is written then)."""
        with self._transaction():
            yield self._db.execute

    def _read(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StateDirError(self.path, f"cannot read the journal: {_why(exc)}") from None

    def _revision(self) -> int:
        """The newest revision given (in the transaction: the change just written)."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'"
                               ).fetchone()
        return int(row[0]) if row else 0

    async def _group_commit(self, rows: list[tuple[str, tuple[object, ...]]]
                            ) -> list[tuple[int, int]]:
        """Write-ahead at the price of one commit per event-loop turn, not per row.

        The first writer of a turn yields once so the others can join, then commits
        them all in one transaction; everyone returns when that commit is done (or
        raises its StateDirError), with the rowids its statements wrote. Shielded: a
        row handed in is committed, and its writer gets to apply its move, even if it
        is being cancelled."""
        batch = self._batch
        leader = batch is None
        if batch is None:
            batch = self._batch = _Batch()
        mine = slice(len(batch.rows), len(batch.rows) + len(rows))
        batch.rows.extend(rows)
        with anyio.CancelScope(shield=True):
            if not leader:
                await batch.done.wait()
                if batch.error is not None:
                    raise batch.error
                return list(zip(batch.rowids[mine], batch.revisions[mine], strict=True))
            try:
                await anyio.lowlevel.checkpoint()
                self._batch = None
                with self._transaction():
                    revision = 0   # of the change the last changing statement made
                    for statement, values in batch.rows:
                        batch.rowids.append(self._db.execute(statement, values).lastrowid or 0)
                        changing = statement.startswith(_CHANGING)
                        if changing:   # each writes one change (its trigger), and no one
                            # else can in our transaction: read once, then counted
                            revision = revision + 1 if revision else self._revision()
                        batch.revisions.append(revision if changing else 0)
            except StateDirError as err:
                batch.error = err
                raise
            finally:
                self._batch = None
                batch.done.set()
        return list(zip(batch.rowids[mine], batch.revisions[mine], strict=True))

    def _write(self, sql: str, args: tuple[object, ...]) -> sqlite3.Cursor:
        """One statement, atomic on its own (autocommit): no BEGIN/COMMIT round trips."""
        if self.read_only:
            raise StateDirError(self.path, "the journal was opened read-only")
        self._check_still_there()
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StateDirError(self.path, f"cannot write the journal: {_why(exc)}") from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT; any failure of the disk is a StateDirError."""
        if self.read_only:
            raise StateDirError(self.path, "the journal was opened read-only")
        self._check_still_there()
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
            raise StateDirError(self.path, f"cannot write the journal: {_why(exc)}") from None

    def _check_still_there(self) -> None:
        # SQLite keeps writing to an unlinked file without a word: every later run
        # would then start from nothing. A stat at most every 0.1 s: the engine
        # stops within that of the journal's deletion.
        now = time.monotonic()
        if now - self._checked < 0.1:
            return
        self._checked = now
        try:
            inode = os.stat(self.path).st_ino
        except OSError:
            inode = None
        if inode != self._inode:
            raise StateDirError(self.path, "the journal was deleted or replaced while the "
                                "engine was running (its record of the fleet is gone)")


def _finish_load_row(load_id: int, outcome: str) -> tuple[str, tuple[object, ...]]:
    return "UPDATE loads SET outcome = ? WHERE id = ?", (outcome, load_id)


# the statements whose row makes a change (a trigger writes it: schema.py)
_CHANGING = ("INSERT INTO transitions", "INSERT INTO host_transitions")


@dataclass(slots=True)
class _Batch:
    rows: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)
    rowids: list[int] = field(default_factory=list)
    revisions: list[int] = field(default_factory=list)   # the newest after each row
    done: anyio.Event = field(default_factory=anyio.Event)
    error: StateDirError | None = None


def _open_read_only(path: Path) -> sqlite3.Connection:
    """Read without writing anything, even on a read-only filesystem (`status`)."""
    if not path.exists():
        raise FileNotFoundError(path)
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError:
        # A WAL journal on a read-only filesystem cannot get its shared-memory
        # file: read it as an immutable snapshot instead.
        db = sqlite3.connect(f"file:{path}?immutable=1", uri=True, isolation_level=None)
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


class StateDirLock:
    """One orchestrator per SQLite state directory: an exclusive flock on STATE/lock,
    which holds the owner's pid. Released by the kernel when the process dies.
    Replicas of a shared store may share a state directory (its caches are written
    atomically): each locks STATE/lock-REPLICA."""

    def __init__(self, state_dir: Path, name: str = "lock") -> None:
        self.path = state_dir / name
        self._fd: int | None = None

    def __enter__(self) -> StateDirLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateDirError(self.path.parent, f"cannot use the state directory: "
                                f"{_why(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateDirError(self.path.parent, f"in use by pid {owner} (another modelip "
                                f"deploy or watch on this state directory"
                                f"{'' if self.path.name == 'lock' else ' as this replica'})"
                                ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            os.close(fd)
            raise StateDirError(self.path.parent, f"cannot write the lock: {_why(exc)}"
                                ) from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None
