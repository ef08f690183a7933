"""What a card driver decides, as pure functions with no I/O (docs/engine.md).

When it checks a serving card: what the check observed and why it looked ->
``decide_serving``. When a try at bringing a card up fails: what failed, how
many tries so far, how long the card has been offline -> ``after_failure``.
Errors are sorted into what they mean for a card in one place (``classify``).
The driver observes, classifies, asks and applies; tests/test_decide.py takes
every row of both tables."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from orchestrator.engine.state import CardMachine, CardState, Trigger
from orchestrator.errors import (
    DeviceOffline,
    InputError,
    ProgramNotLoaded,
    ProgramNotStaged,
    SessionInvalidError,
    TransportError,
    VerificationError,
)
from orchestrator.transport.types import DeviceState, DeviceStatus


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


class Failure(enum.Enum):
    """What an error means for a card (``classify``)."""

    OFFLINE = "offline"          # the card is rebooting: it will answer again
    NOT_STAGED = "not staged"    # the host lost the program's body: send it again
    TRANSIENT = "transient"      # the host, a deadline, a session gone: try again
    REFUTED = "refuted"          # the evidence or a receipt does not verify
    INVALID = "invalid"          # nothing a retry changes (a program the card refuses)


def classify(err: BaseException) -> Failure | None:
    """The one place errors are sorted for cards; None: not an error about a card (a
    bug, a cancellation), which the driver does not handle."""
    if isinstance(err, DeviceOffline):
        return Failure.OFFLINE
    if isinstance(err, ProgramNotStaged):
        return Failure.NOT_STAGED
    if isinstance(err, SessionInvalidError | TransportError | TimeoutError | ProgramNotLoaded):
        return Failure.TRANSIENT
    if isinstance(err, VerificationError):
        return Failure.REFUTED
    if isinstance(err, InputError):
        return Failure.INVALID
    return None


# what one failed check of a serving card saw, by what failed
CHECK_SAW = {Failure.OFFLINE: Seen.OFFLINE, Failure.NOT_STAGED: Seen.UNANSWERED,
             Failure.TRANSIENT: Seen.UNANSWERED, Failure.REFUTED: Seen.REFUTED}


class Next(enum.Enum):
    """The move after a failed try at bringing a card up."""

    WAIT_ONLINE = "wait"          # RETRY_WAIT until the card answers (not an attempt)
    RESTAGE = "restage"           # send the body again, then try again at once
    RETRY = "retry"               # RETRY_WAIT, back off, try again
    FAIL = "fail"                 # FAILED: out of attempts, offline too long, or invalid
    QUARANTINE = "quarantine"     # a security verdict: sticky


def after_failure(failure: Failure, *, attempt: int, attempts: int, offline_for: float,
                  limit: float) -> Next:
    """After try ``attempt`` (of ``attempts``) failed with ``failure``; ``offline_for``:
    seconds the card has been rebooting in this bring-up, bounded by ``limit``."""
    if failure is Failure.OFFLINE:
        return Next.FAIL if offline_for > limit else Next.WAIT_ONLINE
    if failure is Failure.REFUTED:
        return Next.QUARANTINE
    if failure is Failure.INVALID or give_up(attempt, attempts):
        return Next.FAIL
    return Next.RESTAGE if failure is Failure.NOT_STAGED else Next.RETRY


def listing_says(status: DeviceStatus, machine: CardMachine) -> tuple[Trigger, int] | None:
    """What a row of the host's device list means to the card's driver: a reason to
    look again, with the boot counter from which that is old news once verified
    (engine/inbox.py); None: it agrees, or says nothing the driver waits for."""
    if machine.state is CardState.SERVING and (
            status.state is not DeviceState.LOADED or status.boot_counter != machine.boot_counter
            or status.program_id != machine.program_id or status.partition != machine.partition):
        return Trigger.RESYNC, status.boot_counter + 1
    if machine.state in (CardState.RETRY_WAIT, CardState.REKEYING) \
            and status.state is not DeviceState.OFFLINE:
        return Trigger.ONLINE_HINT, status.boot_counter   # ends a wait for a rebooting card
    return None


def backoff_delay(attempt: int, base: float, cap: float, draw: float) -> float:
    """Seconds to wait before try ``attempt`` + 1 (``draw``: uniform in [0, 1)). While
    the delay grows (``base`` doubling), 0.5-1.5x of it, never above ``cap``; once it
    has reached the cap, full jitter, 0 to the cap: retriers that reached the cap
    together (a rack of hosts back after an outage) do not stay in step around it."""
    grown = base * 2.0 ** (max(attempt, 1) - 1)
    if grown < cap:
        return min(cap, grown * (0.5 + draw))
    return cap * draw


__all__ = ["CHECK_SAW", "Act", "Decision", "Failure", "Next", "Seen", "after_failure",
           "backoff_delay", "classify", "listing_says", "decide_serving", "give_up"]
