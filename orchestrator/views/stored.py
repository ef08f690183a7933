"""A snapshot of what a store last recorded (`modelip status`): the live view's picture
of a fleet, with no engine running."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from orchestrator.engine.events import (
    CardChanged,
)
from orchestrator.engine.snapshot import CardView, HostView, Snapshot
from orchestrator.engine.store.protocol import CardRecord, HostRecord, TransitionRecord


def stored_snapshot(cards: Sequence[CardRecord], hosts: Sequence[HostRecord],
                    transitions: Sequence[TransitionRecord], *, now: float) -> Snapshot:
    """The view of what a store last recorded (``modelip status``): same screen, no engine."""
    views = tuple(CardView(c.host, c.device, c.card_id, c.group, c.partition, c.state, "",
                           c.boot_counter, c.attempts, "", c.reason, max(0.0, now - c.updated))
                  for c in cards)
    groups: dict[tuple[str, int], bool] = {}
    for c in cards:
        groups[(c.host, c.group)] = groups.get((c.host, c.group), True) and c.state == "SERVING"
    counts = Counter(c.state for c in cards)
    per_host = Counter(c.host for c in cards)
    serving = Counter(c.host for c in cards if c.state == "SERVING")
    known = {h.host: h for h in hosts}
    host_views = tuple(
        HostView(name, known[name].address if name in known else name,
                 known[name].state if name in known else "PENDING",
                 known[name].reason if name in known else "", per_host[name], serving[name],
                 0, max(0.0, now - known[name].updated) if name in known else 0.0,
                 known[name].owner if name in known else "")
        for name in sorted(set(per_host) | set(known)))
    events = tuple(CardChanged(ts=t.ts, host=t.host, device=t.device, card_id="", group=0,
                               partition=0, previous=t.previous, state=t.state,
                               reason=t.reason, boot_counter=0, session="", attempts=0)
                   for t in transitions)
    return Snapshot(views, host_views, dict(counts), sum(groups.values()), len(groups),
                    events, 0, None, None, 0, 0.0, 0.0, live=False)
