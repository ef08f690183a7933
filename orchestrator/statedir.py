"""The plan's state directory (docs/plans.md): modelip's own, owner-only, held by one
orchestrator (or replica) at a time; an OS failure inside it is a StateDirError."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from orchestrator.atomicfile import private_tree, write_bytes_atomic
from orchestrator.engine.store.sqlite import StateDirLock
from orchestrator.errors import FileInputError, StateDirError, UsageError
from orchestrator.plan.model import Plan

T = TypeVar("T")


@contextmanager
def state_lock(plan: Plan, name: str) -> Iterator[None]:
    if plan.state_dir.exists() and not plan.state_dir.is_dir():
        raise StateDirError(plan.state_dir, "the plan's state_dir is not a directory")
    in_state_dir(plan, lambda: claim_state_dir(plan.state_dir))
    # owner-only before anything is written into it (the plaintext package cache is)
    in_state_dir(plan, lambda: private_tree(plan.state_dir))
    with StateDirLock(plan.state_dir, name):
        yield


STATE_MARK = ".modelip-state"
STATE_MARK_TEXT = b"modelip state directory: modelip keeps it owner-only (docs/plans.md)\n"


# what modelip writes into a state directory: one that holds nothing else, and no
# mark, is an earlier version's (before the mark existed)
# (and the temporary file of one being written atomically: another process, say a
# second replica sharing the directory, may be writing the mark right now)
_STATE_FILES = (r"(journal\.sqlite(-wal|-shm|-journal)?|mek\.dat|cache|emulated-pki|deployments"
                r"|engine\.log|lock(-.+)?|" + re.escape(STATE_MARK) + ")")
STATE_NAMES = re.compile(rf"{_STATE_FILES}|\.{_STATE_FILES}\..+\.tmp")


def claim_state_dir(state_dir: Path) -> None:
    """The state directory is modelip's own: created by it (and marked so), or empty,
    or an earlier version's (it holds only what modelip writes). Any other directory
    is refused before anything in it is touched: a plan naming /srv/www or ~ would
    otherwise make every file there owner-only. Raises UsageError, OSError."""
    mark = state_dir / STATE_MARK
    if mark.is_file():
        return
    if state_dir.is_dir() and not all(STATE_NAMES.fullmatch(entry.name)
                                      for entry in state_dir.iterdir()):
        raise UsageError(f"state_dir {state_dir}: a directory modelip did not create, and "
                         "not empty; modelip makes everything in its state directory "
                         "owner-only: name a new or empty directory")
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        write_bytes_atomic(mark, STATE_MARK_TEXT, mode=0o600, overwrite=True)
    except FileNotFoundError:
        # two replicas claiming one new directory at once: one's temporary mark was
        # seen gone under it once (CI); the directory is claimed if the other's is there
        if not mark.is_file():
            raise


def in_state_dir(plan: Plan, work: Callable[[], T]) -> T:
    """Run ``work``; an OS failure inside the state directory (full, read-only) is a
    StateDirError, elsewhere a FileInputError naming the file."""
    try:
        return work()
    except OSError as exc:
        name = exc.filename or plan.state_dir
        inside = Path(name).resolve().is_relative_to(plan.state_dir.resolve())
        if inside:
            raise StateDirError(plan.state_dir, f"cannot write {name}: "
                                f"{exc.strerror or exc}") from None
        raise FileInputError(name, exc.strerror or str(exc)) from None


__all__ = ["STATE_MARK", "claim_state_dir", "in_state_dir", "state_lock"]
