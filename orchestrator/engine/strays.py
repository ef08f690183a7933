"""Cards no deployment holds any more, given up when nothing drives them yet
(docs/deployments.md "Applying"): at the start of a run, or (replicas) when a
replica takes their host. Apart from engine/replacing.py, which changes a running
engine, so the host supervisor can use it."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import anyio

from orchestrator.engine.hostapi import Connect, HostLease, HostTarget
from orchestrator.engine.state import CardMachine, CardState
from orchestrator.engine.store.protocol import CardRecord, Store
from orchestrator.errors import ModelIPError, ProgramNotLoaded
from orchestrator.transport.types import Deadlines


async def give_up_unplaced(store: Store, hosts: Sequence[HostTarget], placed: set[tuple[str, int]],
                           connect: Connect, deadlines: Deadlines, *, why: str,
                           lease: HostLease | None = None) -> None:
    """At the start of a run with deployments (with replicas: when a replica takes a
    host, under its ``lease``): the cards the store knows that no deployment holds now
    (their deployment was removed or shrunk while nothing ran) are unloaded and reset,
    the move journaled, the cards forgotten. A host that does not answer keeps its
    cards as they were: tried again at the next start."""
    targets = {t.name: t for t in hosts}
    leaving: dict[str, list[CardRecord]] = {}
    for record in await store.cards():
        if (record.host, record.device) not in placed and record.host in targets:
            leaving.setdefault(record.host, []).append(record)

    async def on(host: str, records: list[CardRecord]) -> None:
        client = connect(targets[host], deadlines, lease)
        try:
            for record in records:
                with contextlib.suppress(ProgramNotLoaded):
                    await client.unload(record.device)
                await client.reset(record.device)
                machine = CardMachine(host, record.device, record.group, record.partition,
                                      record.program_id, card_id=record.card_id,
                                      state=CardState(record.state))
                if machine.state not in (CardState.PENDING, CardState.FAILED):
                    await store.record_card(machine.propose(
                        CardState.PENDING, f"{why}: unloaded and reset; no deployment holds "
                        "it now", known_good=None))
                await store.forget_card(host, record.device)
        except ModelIPError:
            pass    # kept in the journal: given up at the next start
        finally:
            with anyio.CancelScope(shield=True):
                await client.close()

    async with anyio.create_task_group() as tg:
        for host, records in leaving.items():
            tg.start_soon(on, host, records)
