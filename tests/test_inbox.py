"""What wakes a card's driver (engine/inbox.py): hints coalesce, old news is dropped and
counted, every other hint is acted on."""

from __future__ import annotations

import anyio
import pytest

from orchestrator.engine.inbox import Inbox, is_stale
from orchestrator.engine.state import Trigger

# (stale_from, true_at, verified_boot, verified_since) -> stale
ROWS = [
    (None, None, 5, 100.0, False),   # a refused call, a switch: never old news
    (6, None, 5, 100.0, False),      # a reset that ends boot 5, verified boot 5: news
    (6, None, 6, 100.0, True),       # ... verified boot 6 since: old news
    (5, None, 5, 100.0, True),       # online of boot 5, verified boot 5: old news
    (7, None, 6, 100.0, False),      # online of boot 7, verified boot 6: news
    (None, 99.0, 5, 100.0, True),    # a listing answered before the verified request left
    (None, 100.0, 5, 100.0, True),
    (None, 101.0, 5, 100.0, False),  # ... answered after: news
    (6, 101.0, 5, 100.0, False),
    (6, 101.0, 6, 100.0, True),      # the boot says old news, whatever the time
    (6, None, None, 0.0, False),     # nothing verified yet: everything is news
]


@pytest.mark.parametrize(("stale_from", "true_at", "boot", "since", "stale"), ROWS)
def test_what_is_old_news(stale_from: int | None, true_at: float | None, boot: int | None,
                          since: float, stale: bool) -> None:
    assert is_stale(stale_from, true_at, boot, since) is stale


async def test_hints_coalesce_and_old_news_is_counted_not_acted_on() -> None:
    inbox = Inbox()
    inbox.hint(Trigger.RESET_HINT, stale_from=6)
    inbox.hint(Trigger.ONLINE_HINT, stale_from=6)
    assert inbox.first_sign > 0
    assert await inbox.wait(1.0) is True
    assert inbox.take(verified_boot=6) == (None, 2)     # both about boots seen since
    assert inbox.first_sign == 0.0                        # old news is no sign of trouble
    inbox.hint(Trigger.RESET_HINT, stale_from=6)
    inbox.hint(Trigger.RESYNC)                            # a listing with no time: news
    assert inbox.take(verified_boot=6) == (Trigger.RESYNC, 1)
    inbox.hint(Trigger.REFUSED)
    inbox.hint(Trigger.RESET_HINT, stale_from=9)
    assert inbox.take(verified_boot=6) == (Trigger.REFUSED, 0)  # the first reason given
    assert await inbox.wait(0.01) is False                # taken: nothing wakes it now
    inbox.ring()
    assert await inbox.wait(1.0) is True and inbox.take() == (None, 0)


async def test_a_flood_of_old_news_is_bounded() -> None:
    inbox = Inbox()
    for boot in range(10_000):
        inbox.hint(Trigger.RESET_HINT, stale_from=boot)
    inbox.hint(Trigger.REFUSED)                           # kept, whatever came before
    reason, stale = inbox.take(verified_boot=10_000)
    assert (reason, stale) == (Trigger.REFUSED, 64)


async def test_a_look_answers_every_hint_before_it() -> None:
    inbox = Inbox()
    inbox.hint(Trigger.RESET_HINT)
    started = inbox.look()
    assert inbox.looked_at == started
    with anyio.move_on_after(0.01):
        assert await inbox.wait(0.01) is False
    assert inbox.take() == (None, 0)


REBOOTING = frozenset({Trigger.RESET_HINT, Trigger.OFFLINE_HINT})


async def test_a_wait_for_a_rebooting_card_ends_on_news_only() -> None:
    """Waiting for a rebooting card: a reset or offline hint says what the driver knows
    (it is not woken, the hint is kept); an online hint, any other hint, or a ring ends
    the wait; so does one that came before the wait began."""
    inbox = Inbox()
    inbox.hint(Trigger.OFFLINE_HINT, stale_from=6)       # before the wait: known too
    async with anyio.create_task_group() as tg:
        woken: list[bool] = []

        async def wait() -> None:
            woken.append(await inbox.wait(5.0, unless=REBOOTING))

        tg.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        inbox.hint(Trigger.RESET_HINT, stale_from=7)
        await anyio.wait_all_tasks_blocked()
        assert woken == []                               # still waiting
        inbox.hint(Trigger.ONLINE_HINT, stale_from=7)
    assert woken == [True]
    assert inbox.take() == (Trigger.OFFLINE_HINT, 0)     # every hint kept, first first
    assert await inbox.wait(0.01, unless=REBOOTING) is False
    inbox.hint(Trigger.REFUSED)                          # before the wait: news
    assert await inbox.wait(5.0, unless=REBOOTING) is True
    inbox.take()
    inbox.hint(Trigger.RESET_HINT)
    inbox.ring()                                         # the run ends, say
    assert await inbox.wait(5.0, unless=REBOOTING) is True
    inbox.take()
    inbox.hint(Trigger.RESET_HINT)                       # after a wait: wakes as before
    assert await inbox.wait(5.0) is True


async def test_a_wait_for_a_rebooting_card_ends_on_news_a_flood_left_out() -> None:
    inbox = Inbox()
    for boot in range(64):                               # a flood fills what is kept
        inbox.hint(Trigger.RESET_HINT, stale_from=boot)
    inbox.hint(Trigger.ONLINE_HINT, stale_from=65)       # left out, but news
    assert await inbox.wait(5.0, unless=REBOOTING) is True
