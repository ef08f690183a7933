"""What wakes a card's driver (docs/engine.md). Level-triggered: a hint (a host's
event, its device list, a refused call, a rollout's switch) is a reason to look
again, never a fact. Hints coalesce: the first one since the last look is the
reason given for the next; the time something first looked wrong is kept for the
outage it may begin; a look answers every hint before it."""

from __future__ import annotations

import time

import anyio

from orchestrator.engine.state import Trigger

_NOT_A_SIGN = (Trigger.PERIODIC, Trigger.SWITCH)   # looked at on schedule, or on purpose


class Inbox:
    def __init__(self) -> None:
        self._wake = anyio.Event()
        self._reason: Trigger | None = None
        self.first_sign = 0.0   # monotonic time something first looked wrong; 0 = nothing
        self.looked_at = 0.0    # monotonic time the last look started

    def hint(self, trigger: Trigger) -> None:
        """Something may have changed: look again, for this reason."""
        if not self.first_sign and trigger not in _NOT_A_SIGN:
            self.first_sign = time.monotonic()
        if self._reason is None:
            self._reason = trigger
        self._wake.set()

    def ring(self) -> None:
        """Wake the driver with no reason to look (the run ends, a verdict, the host)."""
        self._wake.set()

    async def wait(self, seconds: float) -> None:
        """Until a hint or a ring, at most ``seconds``."""
        with anyio.move_on_after(seconds):
            await self._wake.wait()

    def take(self) -> Trigger | None:
        """The reason to look (None: no hint came), emptied."""
        self._wake = anyio.Event()
        reason, self._reason = self._reason, None
        return reason

    def look(self) -> float:
        """A look starts now (returned): every hint so far is answered by it."""
        self.looked_at = time.monotonic()
        self.take()
        return self.looked_at

    def since_first_sign(self) -> float | None:
        """Seconds since something first looked wrong, and forget it (None: nothing)."""
        first, self.first_sign = self.first_sign, 0.0
        return time.monotonic() - first if first else None


__all__ = ["Inbox"]
