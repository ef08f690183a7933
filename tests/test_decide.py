"""The card driver's decisions, every row of their tables: for a serving card, what
the check saw x whether a hint said to look x whether an earlier check had already
found something wrong -> the move; after a failed try at bringing a card up, what
failed x the attempts left x how long the card has been offline -> the move."""

from __future__ import annotations

import itertools
import random

import pytest

from orchestrator.engine.decide import (
    CHECK_SAW,
    Act,
    Decision,
    Failure,
    Next,
    Seen,
    after_failure,
    backoff_delay,
    classify,
    decide_serving,
    give_up,
    listing_says,
)
from orchestrator.engine.state import CardMachine, CardState, Trigger
from orchestrator.errors import (
    AttestationError,
    DeviceOffline,
    InputError,
    PolicyError,
    ProgramNotLoaded,
    ProgramNotStaged,
    SessionInvalidError,
    TransportError,
)
from orchestrator.transport.types import DeviceState, DeviceStatus

KEEP, LOOK, REKEY, QUARANTINE = Act.KEEP, Act.LOOK_AGAIN, Act.REKEY, Act.QUARANTINE
# seen -> {(hinted, suspected): (act, outage, forget, disproved)}
ANY = [(h, s) for h, s in itertools.product((False, True), repeat=2)]
TABLE: dict[Seen, dict[tuple[bool, bool], tuple[Act, bool, bool, bool]]] = {
    # the card holds our program: stay; a hint or an earlier miss is disproved
    Seen.OURS: {(False, False): (KEEP, False, False, False),
                (True, False): (KEEP, False, False, True),
                (False, True): (KEEP, False, False, True),
                (True, True): (KEEP, False, False, True)},
    # a reboot: the session and the program are gone
    Seen.NEW_SESSION: dict.fromkeys(ANY, (REKEY, True, True, False)),
    Seen.NOTHING: dict.fromkeys(ANY, (REKEY, True, True, False)),
    # a rollout switched its group: a planned re-key, not an outage
    Seen.OTHER_VERSION: dict.fromkeys(ANY, (REKEY, False, False, False)),
    Seen.OFFLINE: dict.fromkeys(ANY, (REKEY, True, False, False)),
    # one missed periodic check is looked at again before anything is concluded
    Seen.UNANSWERED: {(False, False): (LOOK, True, False, False),
                      (True, False): (REKEY, True, False, False),
                      (False, True): (REKEY, True, False, False),
                      (True, True): (REKEY, True, False, False)},
    # security verdicts: sticky
    Seen.REFUTED: dict.fromkeys(ANY, (QUARANTINE, False, False, False)),
    Seen.FOREIGN: dict.fromkeys(ANY, (QUARANTINE, False, False, False)),
}


def test_the_table_covers_every_observation() -> None:
    assert set(TABLE) == set(Seen)


@pytest.mark.parametrize(("seen", "trigger", "suspected"),
                         [(seen, t, s) for seen in Seen for t in Trigger for s in (False, True)])
def test_every_row_of_the_serving_card_decision(seen: Seen, trigger: Trigger,
                                                suspected: bool) -> None:
    """Every observation x every reason the driver looked (a trigger is a hint or not)."""
    hinted = trigger.is_hint
    act, outage, forget, disproved = TABLE[seen][(hinted, suspected)]
    assert decide_serving(seen, hinted=hinted, suspected=suspected) == Decision(
        act, outage=outage, forget=forget, disproved=disproved)


@pytest.mark.parametrize(("attempt", "attempts", "stop"),
                         [(1, 5, False), (4, 5, False), (5, 5, True), (6, 5, True),
                          (1, 1, True)])
def test_a_card_gives_up_after_its_attempts(attempt: int, attempts: int, stop: bool) -> None:
    assert give_up(attempt, attempts) is stop


# --- a failed try at bringing a card up ---------------------------------------------------

LIMIT = 10.0
# failure -> {(attempts left?, offline past the limit?): next}
MORE, LAST = True, False
FAILURES: dict[Failure, dict[tuple[bool, bool], Next]] = {
    # rebooting: waited for (not an attempt) until it has been offline too long
    Failure.OFFLINE: {(MORE, False): Next.WAIT_ONLINE, (LAST, False): Next.WAIT_ONLINE,
                      (MORE, True): Next.FAIL, (LAST, True): Next.FAIL},
    Failure.NOT_STAGED: {(MORE, False): Next.RESTAGE, (LAST, False): Next.FAIL,
                         (MORE, True): Next.RESTAGE, (LAST, True): Next.FAIL},
    Failure.TRANSIENT: {(MORE, False): Next.RETRY, (LAST, False): Next.FAIL,
                        (MORE, True): Next.RETRY, (LAST, True): Next.FAIL},
    Failure.REFUTED: dict.fromkeys(itertools.product((MORE, LAST), (False, True)),
                                   Next.QUARANTINE),
    Failure.INVALID: dict.fromkeys(itertools.product((MORE, LAST), (False, True)), Next.FAIL),
}


@pytest.mark.parametrize(("failure", "more", "long_offline"), [
    (f, m, o) for f in Failure for m in (MORE, LAST) for o in (False, True)])
def test_every_row_of_the_failed_try_decision(failure: Failure, more: bool,
                                              long_offline: bool) -> None:
    assert set(FAILURES) == set(Failure)
    attempt, attempts = (2, 5) if more else (5, 5)
    offline_for = LIMIT + 0.1 if long_offline else LIMIT
    assert after_failure(failure, attempt=attempt, attempts=attempts,
                         offline_for=offline_for, limit=LIMIT) is FAILURES[failure][
        (more, long_offline)]


@pytest.mark.parametrize(("error", "failure"), [
    (DeviceOffline("h:1", "card 0 is rebooting"), Failure.OFFLINE),       # before TransportError
    (ProgramNotStaged("no such program"), Failure.NOT_STAGED),
    (TransportError("h:1", "connection refused"), Failure.TRANSIENT),
    (TimeoutError(), Failure.TRANSIENT),
    (ProgramNotLoaded("nothing loaded"), Failure.TRANSIENT),
    (SessionInvalidError("session ended"), Failure.TRANSIENT),     # before VerificationError
    (AttestationError("bad signature"), Failure.REFUTED),
    (PolicyError("firmware below the floor"), Failure.REFUTED),
    (InputError("program refused"), Failure.INVALID),
    (RuntimeError("a bug"), None),
    (KeyboardInterrupt(), None),
])
def test_errors_are_sorted_for_cards_in_one_place(error: BaseException,
                                                  failure: Failure | None) -> None:
    assert classify(error) is failure


def test_a_failed_check_of_a_serving_card_is_an_observation() -> None:
    """What a serving card's check concludes from each failure; an invalid input is not
    an observation of the card (the driver lets it through as a bug)."""
    assert CHECK_SAW == {Failure.OFFLINE: Seen.OFFLINE, Failure.NOT_STAGED: Seen.UNANSWERED,
                         Failure.TRANSIENT: Seen.UNANSWERED, Failure.REFUTED: Seen.REFUTED}


# --- how long to wait before trying again ------------------------------------------------

@pytest.mark.parametrize(("attempt", "draw", "delay"), [
    (1, 0.0, 0.1), (1, 0.5, 0.2), (1, 0.999, 0.2998),     # 0.5-1.5x of 0.2
    (3, 0.5, 0.8),                                         # 0.2 doubling: 0.8
    (5, 0.999, 4.7968),                                    # 3.2, still growing
    (6, 0.0, 0.0), (6, 0.5, 2.5), (40, 0.999, 4.995),      # capped: 0 to the cap
    (0, 0.5, 0.2), (-3, 0.5, 0.2),                         # a first try counts as one
])
def test_the_backoff_grows_then_spreads_fully_at_its_cap(attempt: int, draw: float,
                                                          delay: float) -> None:
    assert backoff_delay(attempt, 0.2, 5.0, draw) == pytest.approx(delay)


def test_retriers_at_the_cap_do_not_stay_in_step() -> None:
    """Many retriers drawing at the cap spread over the whole of it, not around it."""
    rng = random.Random(7)  # noqa: S311 - timing, not security
    delays = [backoff_delay(12, 0.2, 5.0, rng.random()) for _ in range(2000)]
    assert min(delays) < 0.25 and max(delays) > 4.75
    assert sum(d < 2.5 for d in delays) > 800     # half of them below half the cap
    assert backoff_delay(3, 0.2, 1.0, 0.9) == 1.0   # growing, but never above the cap


# --- what a row of the host's device list means -------------------------------------------

def _row(state: DeviceState, boot: int = 5, program: str = "p", partition: int = 0
         ) -> DeviceStatus:
    return DeviceStatus(0, "c", state, boot, "", program, partition)


@pytest.mark.parametrize(("card", "row", "says"), [
    (CardState.SERVING, _row(DeviceState.LOADED), None),                  # agrees
    (CardState.SERVING, _row(DeviceState.ONLINE), (Trigger.RESYNC, 6)),   # nothing loaded
    (CardState.SERVING, _row(DeviceState.OFFLINE), (Trigger.RESYNC, 6)),
    (CardState.SERVING, _row(DeviceState.LOADED, boot=6), (Trigger.RESYNC, 7)),  # rebooted
    (CardState.SERVING, _row(DeviceState.LOADED, program="q"), (Trigger.RESYNC, 6)),
    (CardState.SERVING, _row(DeviceState.LOADED, partition=1), (Trigger.RESYNC, 6)),
    (CardState.RETRY_WAIT, _row(DeviceState.ONLINE, boot=6), (Trigger.ONLINE_HINT, 6)),
    (CardState.RETRY_WAIT, _row(DeviceState.OFFLINE), None),              # still rebooting
    (CardState.REKEYING, _row(DeviceState.ONLINE, boot=6), (Trigger.ONLINE_HINT, 6)),
    (CardState.REKEYING, _row(DeviceState.OFFLINE), None),
    (CardState.KEYED, _row(DeviceState.ONLINE), None),                    # busy: its own look
    (CardState.QUARANTINED, _row(DeviceState.ONLINE), None),
])
def test_what_a_listing_row_says(card: CardState, row: DeviceStatus,
                                 says: tuple[Trigger, int] | None) -> None:
    machine = CardMachine("h", 0, 0, 0, "p")
    machine.state, machine.boot_counter = card, 5
    assert listing_says(row, machine) == says
