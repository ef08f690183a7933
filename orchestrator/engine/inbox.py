"""What wakes a card's driver (docs/engine.md). Level-triggered: a hint (a host's
event, its device list, a refused call, a rollout's switch) is a reason to look
again, never a fact. Hints coalesce: the first one since the last look is the
reason given for the next; the time something first looked wrong is kept for the
outage it may begin; a look answers every hint before it.

No work on stale news. An event names the boot of the card it is about (a
RESET or OFFLINE ends boot b, an ONLINE begins it); a row of the host's device
list was true when the host answered. When the driver takes its hints, one
about a boot older than the one its last verified answer saw (a late "reset"
for a card already re-keyed since), or a listing the host answered before the
driver sent the request whose verified answer it last acted on, is dropped and
counted, not acted on: the card has been seen since. Every other hint (a
refused call, a switch) is always acted on, and the periodic check stands: a
host that sends stale news on purpose only hides what it could hide by sending
nothing, and its next listing is not stale."""

from __future__ import annotations

import time

import anyio

from orchestrator.engine.state import Trigger

_NOT_A_SIGN = (Trigger.PERIODIC, Trigger.SWITCH)   # looked at on schedule, or on purpose
_MOST_PENDING = 64   # event hints kept between two looks (a flood says no more than one)


class Inbox:
    def __init__(self) -> None:
        self._wake = anyio.Event()
        # the hints since the last look: (reason, stale from this verified boot on,
        # stale if the driver has sent a request answered verified since this time)
        self._pending: list[tuple[Trigger, int | None, float | None]] = []
        self.first_sign = 0.0   # monotonic time something first looked wrong; 0 = nothing
        self.looked_at = 0.0    # monotonic time the last look started
        self._rung = False      # woken with no reason since the last take
        self._overflow: set[Trigger] = set()   # kinds of hints a flood left out
        self._deaf: frozenset[Trigger] = frozenset()   # what does not end the current wait

    def hint(self, trigger: Trigger, *, stale_from: int | None = None,
             true_at: float | None = None) -> None:
        """Something may have changed: look again, for this reason. ``stale_from``: the
        news is old once a verified answer has seen this boot counter (or a later one);
        ``true_at``: the news was true at this monotonic time (a listing: when the host
        answered), old once a request sent after it is answered verified."""
        if not self.first_sign and trigger not in _NOT_A_SIGN:
            self.first_sign = time.monotonic()
        if len(self._pending) < _MOST_PENDING or (stale_from is None and true_at is None):
            self._pending.append((trigger, stale_from, true_at))
        else:
            self._overflow.add(trigger)   # not kept (a flood), but it woke the driver
        if trigger not in self._deaf:
            self._wake.set()

    def ring(self) -> None:
        """Wake the driver with no reason to look (the run ends, a verdict, the host)."""
        self._rung = True
        self._wake.set()

    async def wait(self, seconds: float, *, unless: frozenset[Trigger] = frozenset()
                   ) -> bool:
        """Until a hint or a ring, at most ``seconds``; True if woken. A hint of a kind
        in ``unless`` does not end the wait (it says what the caller knows already); it
        is kept for the next take."""
        self._deaf = unless
        try:
            if unless and not self._rung and self._overflow <= unless \
                    and all(t in unless for t, _, _ in self._pending):
                self._wake = anyio.Event()
            with anyio.move_on_after(seconds):
                await self._wake.wait()
        finally:
            self._deaf = frozenset()
        return self._wake.is_set()

    def take(self, verified_boot: int | None = None, verified_since: float = 0.0
             ) -> tuple[Trigger | None, int]:
        """The reason to look (None: no hint came, or only stale news), and how many
        hints were stale news: about a boot older than ``verified_boot``, the boot
        counter the last verified answer saw, or true before ``verified_since``, when
        the request of that answer was sent. Emptied."""
        self._wake, self._rung = anyio.Event(), False
        self._overflow.clear()
        pending, self._pending = self._pending, []
        fresh = [reason for reason, stale_from, true_at in pending
                 if not is_stale(stale_from, true_at, verified_boot, verified_since)]
        if not fresh and self.first_sign and pending:
            self.first_sign = 0.0   # the only signs of trouble were old news
        return (fresh[0] if fresh else None), len(pending) - len(fresh)

    def look(self) -> float:
        """A look starts now (returned): every hint so far is answered by it."""
        self.looked_at = time.monotonic()
        self.take()
        return self.looked_at

    def since_first_sign(self) -> float | None:
        """Seconds since something first looked wrong, and forget it (None: nothing)."""
        first, self.first_sign = self.first_sign, 0.0
        return time.monotonic() - first if first else None


def is_stale(stale_from: int | None, true_at: float | None, verified_boot: int | None,
             verified_since: float) -> bool:
    """News about boot ``stale_from`` - 1 or earlier, or true at ``true_at``, is old
    once a verified answer saw boot ``verified_boot`` to a request sent at
    ``verified_since`` (see the module's text)."""
    if stale_from is not None and verified_boot is not None and verified_boot >= stale_from:
        return True
    return true_at is not None and true_at <= verified_since


__all__ = ["Inbox", "is_stale"]
