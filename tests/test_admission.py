"""A host's places handed out by priority (engine/admission.py): the work that restores
the most goes first (a running rollout's canary before all), in order of asking among
equals, and no place is lost to a cancellation, whenever it comes."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator.engine.admission import RECOVER, ROUTINE, PriorityLimiter
from orchestrator.transport.client import HostClient
from tests.emulate import MODELIP, emulate, watching
from tests.models import tiny_mlp


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


def test_a_storm_during_a_rollout_brings_the_canary_back_first(tmp_path: Path) -> None:
    """Every card of a host resets while a rollout judges its canary (group 0: card 0),
    the canary last; one place on the host (`concurrency: 1`), each attestation 0.1 s:
    the cards queue for the place, and the canary, which the rollout's gate waits
    for, is served before the cards that asked before it."""
    with emulate(tmp_path / "fleet", hosts=1, devices=6,
                 extra=("--attest-latency", "0.1")) as (addresses, root):
        def plan(version: int, rollout: str = "") -> Path:
            model = tmp_path / f"m{version}.onnx"
            model.write_bytes(tiny_mlp(seed=version).SerializeToString())
            path = tmp_path / f"v{version}.yaml"
            path.write_text(f"model: {{onnx: {model.name}, id: mlp, version: {version}}}\n"
                            "mek: {generate: true}\n"
                            f"fleet: {{hosts: [{{address: '{addresses[0]}', "
                            "devices: [0, 1, 2, 3, 4, 5]}]}\n"
                            f"trust: {{roots: ['{root}']}}\nconcurrency: 1\n"
                            "retry: {backoff: 0.05}\n"
                            "rekey: {check_interval: 0, min_interval: 0.05}\n"
                            f"state_dir: state\n{rollout}")
            return path

        subprocess.run([*MODELIP, "deploy", str(plan(1))], cwd=tmp_path, check=True,
                       capture_output=True, timeout=120)
        v2 = plan(2, 'rollout: {canary: 1, steps: ["100%"], soak: 600}\n')
        watch = watching(v2, tmp_path)
        assert watch.stdout is not None
        back: list[int] = []
        try:
            for line in watch.stdout:
                event = json.loads(line)
                if event["event"] == "rollout" and event["phase"] == "gating" and not back:
                    anyio.run(_reset, addresses[0], [5, 4, 3, 2, 1, 0])
                    back.append(-1)
                elif back and event["event"] == "card" and event["state"] == "SERVING":
                    back.append(int(event["device"]))
                    if len(back) == 7:
                        break
        finally:
            watch.send_signal(signal.SIGTERM)
            watch.communicate(timeout=60)
    order = back[1:]
    assert sorted(order) == [0, 1, 2, 3, 4, 5], order
    assert order.index(0) <= 1, order   # the first card in took the free place


async def _reset(address: str, devices: list[int]) -> None:
    async with HostClient(address) as host:
        for device in devices:
            await host.reset(device)
