"""A host's places handed out by priority (engine/admission.py): the work that restores
the most goes first, in order of asking among equals, and no place is lost to a
cancellation, whenever it comes."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from orchestrator.engine.admission import RECOVER, ROUTINE, PriorityLimiter


async def test_waiters_are_served_by_priority_then_in_order() -> None:
    places = PriorityLimiter(1)
    served: list[str] = []
    release = anyio.Event()

    async def work(name: str, priority: tuple[int, ...]) -> None:
        async with places.admit(priority):
            served.append(name)
            if name == "first":
                await release.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(work, "first", (RECOVER, 0))
        await anyio.sleep(0.01)
        for name, priority in [("routine", (ROUTINE, 0)), ("group down", (RECOVER, 2)),
                               ("one card of a serving group", (RECOVER, 1)),
                               ("another group down", (RECOVER, 2))]:
            tg.start_soon(work, name, priority)
            await anyio.sleep(0.01)
        assert places.waiting == 4
        release.set()
    assert served == ["first", "one card of a serving group", "group down",
                      "another group down", "routine"]
    assert places.borrowed == 0


async def test_the_share_is_never_exceeded() -> None:
    places = PriorityLimiter(3)
    inside = most = 0

    async def work(priority: int) -> None:
        nonlocal inside, most
        async with places.admit((RECOVER, priority)):
            inside += 1
            most = max(most, inside)
            await anyio.sleep(0.001)
            inside -= 1

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(work, i % 4)
    assert most == 3 and places.borrowed == 0 and places.waiting == 0


@pytest.mark.parametrize("granted_first", [False, True])
async def test_a_cancelled_waiter_loses_no_place(granted_first: bool) -> None:
    """Cancelled while waiting, or in the instant its place was handed to it: either
    way the next in line gets the place."""
    places = PriorityLimiter(1)
    got: list[str] = []
    release = anyio.Event()

    async def holder() -> None:
        async with places.admit((RECOVER, 0)):
            await release.wait()

    async def waiter(name: str) -> None:
        async with places.admit((RECOVER, 1)):
            got.append(name)

    async def doomed_waiter(scope: anyio.CancelScope) -> None:
        with scope:
            await waiter("cancelled")

    doomed = anyio.CancelScope()
    with anyio.fail_after(10):   # a lost place: "next" would wait for ever
        await _run(holder, doomed_waiter, waiter, doomed, release, places, granted_first)
    assert got == ["next"]
    assert places.borrowed == 0 and places.waiting == 0


async def _run(holder: Any, doomed_waiter: Any, waiter: Any, doomed: anyio.CancelScope,
               release: anyio.Event, places: PriorityLimiter, granted_first: bool) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder)
        await anyio.sleep(0.01)
        tg.start_soon(doomed_waiter, doomed)
        await anyio.sleep(0.01)
        tg.start_soon(waiter, "next")
        await anyio.sleep(0.01)
        assert places.waiting == 2
        if granted_first:
            release.set()              # the place goes to "cancelled" first ...
            doomed.cancel()            # ... which is cancelled before it runs
        else:
            doomed.cancel()
            await anyio.sleep(0.01)
            assert places.waiting == 1
            release.set()
