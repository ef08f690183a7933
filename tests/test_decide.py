"""The card driver's decision for a serving card, every row of its table: what the
check saw x whether a hint said to look x whether an earlier check had already found
something wrong -> the move."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.engine.decide import Act, Decision, Seen, decide_serving, give_up

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


@pytest.mark.parametrize(("seen", "hinted", "suspected"),
                         [(seen, h, s) for seen in Seen for h, s in ANY])
def test_every_row_of_the_serving_card_decision(seen: Seen, hinted: bool,
                                                suspected: bool) -> None:
    act, outage, forget, disproved = TABLE[seen][(hinted, suspected)]
    assert decide_serving(seen, hinted=hinted, suspected=suspected) == Decision(
        act, outage=outage, forget=forget, disproved=disproved)


@pytest.mark.parametrize(("attempt", "attempts", "stop"),
                         [(1, 5, False), (4, 5, False), (5, 5, True), (6, 5, True),
                          (1, 1, True)])
def test_a_card_gives_up_after_its_attempts(attempt: int, attempts: int, stop: bool) -> None:
    assert give_up(attempt, attempts) is stop
