"""Calls about one card each, sent many to a call (docs/protocol.md "Batches").

Callers ask one thing each (``submit``) and get their own answer or their own error;
what was asked within a window of the first (up to ``limit`` things; the window
grows while others keep joining) goes in one call. Nothing is merged or shared but
the call: each card keeps its own request, answer and error. The first caller of a
batch sends it; if that caller is cancelled, so is the call (nothing is held up by a
shield), and the others of its batch ask again, in a batch of their own.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import anyio
import anyio.lowlevel

Asked = TypeVar("Asked")
Answer = TypeVar("Answer")
Send = Callable[[Sequence[Asked]], Awaitable[Sequence[Answer | BaseException]]]


class _Batch(Generic[Asked, Answer]):
    __slots__ = ("answers", "asked", "done", "failed")

    def __init__(self) -> None:
        self.asked: list[Asked] = []
        self.answers: Sequence[Answer | BaseException] = ()
        self.failed: BaseException | None = None
        self.done = anyio.Event()


class Coalescer(Generic[Asked, Answer]):
    def __init__(self, send: Send[Asked, Answer], *, limit: int, window: float = 0.0,
                 most: int = 1) -> None:
        """A batch stays open ``window`` seconds (0: the rest of this turn of the event
        loop) for others to join, and another window while some keep joining, at most
        ``most`` windows: a burst fills a batch, a lone caller waits one window."""
        self._send = send
        self.limit = limit
        self.window = window
        self.most = most
        self._open: _Batch[Asked, Answer] | None = None
        self.calls = 0          # batches sent (a caller alone is a batch of one)

    async def submit(self, asked: Asked) -> Answer:
        while True:
            batch = self._open
            leader = batch is None or len(batch.asked) >= self.limit
            if leader:
                batch = self._open = _Batch()
            assert batch is not None  # noqa: S101 - just made, or open
            index = len(batch.asked)
            batch.asked.append(asked)
            if leader:
                await self._lead(batch)
            else:
                await batch.done.wait()
            if batch.failed is _ABANDONED:
                continue  # its sender was cancelled: ask again
            if batch.failed is not None:
                raise batch.failed
            answer = batch.answers[index]
            if isinstance(answer, BaseException):
                raise answer
            return answer

    async def _lead(self, batch: _Batch[Asked, Answer]) -> None:
        try:
            joined, windows = -1, 0
            while joined != len(batch.asked) and len(batch.asked) < self.limit \
                    and windows < self.most:
                joined, windows = len(batch.asked), windows + 1
                await anyio.sleep(self.window)  # who asks meanwhile joins (0: this turn)
            if self._open is batch:
                self._open = None
            self.calls += 1
            batch.answers = await self._send(batch.asked)
        except Exception as error:  # noqa: BLE001 - every caller of the batch gets it
            batch.failed = error
        except BaseException:
            batch.failed = _ABANDONED  # cancelled: the others ask again
            raise
        finally:
            if self._open is batch:
                self._open = None
            batch.done.set()


class _Abandoned(Exception):
    """A batch whose sender was cancelled before it was answered."""


_ABANDONED = _Abandoned()
