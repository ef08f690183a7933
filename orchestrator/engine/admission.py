"""A host's share of the fleet's concurrency, handed out by priority (docs/engine.md
"Admission"): when more cards want to attest or load than the share allows, the
ones whose work restores the most go first, not the ones that asked first. A card
of an MDP group whose other cards all serve (one card brings the whole group back)
goes before a card of a group that is down anyway; bringing cards back goes before
the routine check of a serving card. In order of asking among equals."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

# Classes of work, most urgent first.
RECOVER = 0   # a card is being brought up, or a hint said to look at it
ROUTINE = 1   # the periodic check of a serving card


class PriorityLimiter:
    def __init__(self, total: int) -> None:
        self.total = total
        self.borrowed = 0
        self._waiting: list[tuple[tuple[int, ...], int, anyio.Event]] = []
        self._order = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @asynccontextmanager
    async def admit(self, priority: tuple[int, ...]) -> AsyncIterator[None]:
        """Hold one of the ``total`` places while the block runs; lower ``priority``
        first (a tuple: the class of work, then what ranks it within the class)."""
        if self.borrowed < self.total and not self._waiting:
            self.borrowed += 1
        else:
            entry = (priority, next(self._order), anyio.Event())
            heapq.heappush(self._waiting, entry)
            try:
                await entry[2].wait()
            except BaseException:
                if entry[2].is_set():       # granted as it was cancelled: pass it on
                    self._release()
                else:
                    self._waiting.remove(entry)
                    heapq.heapify(self._waiting)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        if self._waiting:   # the place goes straight to the first in line
            heapq.heappop(self._waiting)[2].set()
        else:
            self.borrowed -= 1


__all__ = ["RECOVER", "ROUTINE", "PriorityLimiter"]
