"""What a card driver decides when it checks a serving card: a pure function of what
the check observed and why it looked, with no I/O (docs/engine.md). The driver
observes (one fresh attestation), classifies what it saw into ``Seen`` (in one
place), asks ``decide_serving`` and applies the ``Decision``; tests/test_decide.py
takes every row of the table."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Seen(enum.Enum):
    """What one check of a SERVING card observed."""

    OURS = "ours"                     # same session, our program, verified
    NEW_SESSION = "new session"       # the card rebooted: its session (and program) are gone
    NOTHING = "nothing"               # same session, nothing loaded
    OTHER_VERSION = "other version"   # same session, another version this fleet serves
    FOREIGN = "foreign"               # same session, a program the owner never sent it
    OFFLINE = "offline"               # the card is rebooting
    UNANSWERED = "unanswered"         # the check failed (host, deadline): nothing is known
    REFUTED = "refuted"               # the evidence does not verify: a security verdict


class Act(enum.Enum):
    KEEP = "keep serving"             # the card holds our program: nothing to do
    LOOK_AGAIN = "look again"         # one missed periodic check: look again soon
    REKEY = "re-key"                  # REKEYING, then attest, wrap and load (or confirm)
    QUARANTINE = "quarantine"         # sticky: never retried by itself


@dataclass(frozen=True, slots=True)
class Decision:
    act: Act
    outage: bool = False       # this begins (or continues) an outage of the card
    forget: bool = False       # what was known good of the card no longer holds
    disproved: bool = False    # a hint (or an earlier failed check) is disproved


def decide_serving(seen: Seen, *, hinted: bool, suspected: bool) -> Decision:
    """The move for a serving card after a check. ``hinted``: something (an event, the
    host's list, a refused call) said to look; ``suspected``: an earlier check had
    already found something wrong (an outage may be under way)."""
    if seen is Seen.OURS:
        return Decision(Act.KEEP, disproved=hinted or suspected)
    if seen in (Seen.REFUTED, Seen.FOREIGN):
        return Decision(Act.QUARANTINE)
    if seen is Seen.UNANSWERED and not hinted and not suspected:
        return Decision(Act.LOOK_AGAIN, outage=True)
    if seen is Seen.OTHER_VERSION:  # a rollout switched its group: not an outage
        return Decision(Act.REKEY)
    return Decision(Act.REKEY, outage=True,
                    forget=seen in (Seen.NEW_SESSION, Seen.NOTHING))


def give_up(attempt: int, attempts: int) -> bool:
    """After ``attempt`` failed tries of ``attempts`` allowed: stop (FAILED)."""
    return attempt >= attempts


__all__ = ["Act", "Decision", "Seen", "decide_serving", "give_up"]
