"""The changes the control API serves, read from the store once for every watcher
(docs/api.md "Revisions"): each change as a message and as an entry of a batch on
the wire, serialized once."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable

import anyio
from anyio.abc import TaskStatus

from orchestrator._proto.modelip.v1 import control_pb2
from orchestrator.engine.store.protocol import ChangeRecord, Store
from orchestrator.errors import ModelIPError

C = control_pb2.Change
LOOK_EVERY = 0.25         # seconds between looks at the store when nothing says it moved
SETTLE = 0.02             # seconds of moves read and sent at once (one write per watcher)
PAGE = 500                # changes read at once
_log = logging.getLogger("modelip.api")


def entry(message: control_pb2.Change) -> bytes:
    """``message`` as one entry of a ChangeBatch on the wire (field 1, length-delimited):
    a batch is its entries one after the other, so each change is serialized once, for
    every watcher."""
    body = message.SerializeToString()
    size, head = len(body), bytearray(b"\x0a")
    while size > 0x7F:
        head.append(size & 0x7F | 0x80)
        size >>= 7
    head.append(size)
    return bytes(head) + body


def change_message(change: ChangeRecord) -> control_pb2.Change:
    """A journaled change as the API sends it."""
    body = change.body
    if change.kind == "card":
        return C(revision=change.revision, type=C.CARD, ts=change.ts, card=control_pb2.Card(
            host=body["host"], device=body["device"], card_id=body["card_id"],
            state=body["state"], previous=body["previous"],
            boot_counter=body["boot_counter"], session_id=body["session_id"],
            program_id=body["program_id"], reason=body["reason"],
            attempts=body["attempts"]))
    if change.kind == "host":
        return C(revision=change.revision, type=C.HOST, ts=change.ts, host=control_pb2.Host(
            host=body["host"], state=body["state"], previous=body["previous"],
            reason=body["reason"], cordoned_by=body.get("cordoned_by", "")))
    if change.kind == "command":
        return C(revision=change.revision, type=C.COMMAND, ts=change.ts,
                 command=control_pb2.Command(who=body["who"], role=body["role"],
                                             command=body["command"],
                                             outcome=body["outcome"]))
    return C(revision=change.revision, type=C.ROLLOUT, ts=change.ts,
             rollout=control_pb2.RolloutStep(rollout=body["rollout"], wave=body["wave"],
                                             phase=body["phase"], what=body["what"],
                                             deployment=body.get("deployment", "")))


class ChangeFeed:
    """The newest changes, read from the store once for every watcher (as an API
    server's watch cache does): one reader wakes when the engine says something moved
    (else every LOOK_EVERY), keeps the last ``keep`` changes as messages, and tells
    the watchers (``look_every``: when the engine runs in another process, the
    store is all there is to look at). A watcher behind what it keeps reads the store itself."""

    def __init__(self, store: Store, changed: Callable[[], Awaitable[None]] | None,
                 keep: int = 10_000, look_every: float = LOOK_EVERY) -> None:
        self.store = store
        self.changed = changed
        self.look_every = look_every
        self.keep = keep
        self.recent: deque[tuple[int, bytes]] = deque()   # (revision, its batch entry)
        self.floor = 0     # every change after this revision is in ``recent``
        self.newest = 0
        self._moved = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                  ) -> None:
        _, self.newest = await self.store.revisions()
        self.floor = self.newest
        task_status.started()
        while True:
            try:
                changes = await self.store.changes(self.newest, PAGE)
            except ModelIPError as err:  # the store is away (replicas wait it out): again
                _log.warning("control API: cannot read the changes: %s", err)
                await anyio.sleep(max(self.look_every, LOOK_EVERY))
                continue
            for change in changes:
                self.recent.append((change.revision, entry(change_message(change))))
            if len(self.recent) > self.keep:
                while len(self.recent) > self.keep:
                    self.floor = self.recent.popleft()[0]
            if changes:
                self.newest = changes[-1].revision
                self._moved.set()
                self._moved = anyio.Event()
            if len(changes) < PAGE:
                await self._wait()

    async def _wait(self) -> None:
        with anyio.move_on_after(self.look_every):
            if self.changed is not None:
                await self.changed()
                await anyio.sleep(SETTLE)  # the moves of these milliseconds, in one look
            else:
                await anyio.sleep_forever()

    def after(self, revision: int) -> tuple[int, bytes] | None:
        """The batch entries of the changes after ``revision`` and the newest of them
        (``revision`` if none); None if they are not all held."""
        if revision < self.floor:
            return None
        held: list[bytes] = []
        newest = revision
        for number, encoded in reversed(self.recent):
            if number <= revision:
                break
            newest = max(newest, number)
            held.append(encoded)
        held.reverse()
        return newest, b"".join(held)

    async def moved(self) -> None:
        await self._moved.wait()
