"""Batched attestations and loads (docs/protocol.md "Batches"): what is asked together
goes in one call, each card keeps its own nonce, evidence, key slot, receipt and error;
a host without the batched call is asked card by card."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import grpc
import pytest

from orchestrator._proto.modelip.v1 import runtime_pb2, runtime_pb2_grpc
from orchestrator.agent.servicers import Attestation, Runtime
from orchestrator.crypto.evidence import TrustPolicy, verify_evidence, verify_load_receipt
from orchestrator.emulator.fleet import FleetConfig, run_fleet
from orchestrator.errors import LeaseLost, ModelIPError, NotFoundError
from orchestrator.transport.batch import Coalescer
from orchestrator.transport.client import ATTEST_BATCH, HostClient
from orchestrator.transport.types import LoadResult
from tests.test_emulated_hosts import Deployment, deploy, info_digest, slot_digest


async def _attest_all(host: HostClient, devices: Sequence[int]
                      ) -> dict[int, tuple[bytes, bytes | BaseException]]:
    """Every device attested at once (as card drivers do): nonce, evidence or error."""
    answers: dict[int, tuple[bytes, bytes | BaseException]] = {}

    async def one(index: int, device: int) -> None:
        nonce = os.urandom(32)
        try:
            answers[index] = (nonce, await host.attest(device, nonce))
        except NotFoundError as error:
            answers[index] = (nonce, error)

    async with anyio.create_task_group() as tg:
        for index, device in enumerate(devices):
            tg.start_soon(one, index, device)
    return answers


async def test_attestations_asked_together_go_in_one_call_each_its_own() -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=8)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        devices = [*range(8), 99, 3]   # an unknown card, and one card twice
        answers = await _attest_all(host, devices)
        assert host._attests.calls == 1  # noqa: SLF001 - what is measured
        for index, device in enumerate(devices):
            nonce, evidence = answers[index]
            if device == 99:
                assert isinstance(evidence, NotFoundError) and evidence.device == 99
                continue
            assert isinstance(evidence, bytes)
            report = verify_evidence(evidence, roots=[fleet.pki.root], policy=TrustPolicy(),
                                     request=nonce)   # its own nonce, its own card
            assert report.card_id == f"h0-card{device}"


async def test_more_than_a_batch_is_several_calls() -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=4)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        answers = await _attest_all(host, [d % 4 for d in range(ATTEST_BATCH * 2 + 1)])
        assert all(isinstance(evidence, bytes) for _, evidence in answers.values())
        assert host._attests.calls == 3  # noqa: SLF001


class _OldAttestation(Attestation):
    """A host from before the batched call: it answers UNIMPLEMENTED."""

    GetAttestationReports = runtime_pb2_grpc.RemoteAttestationServicer.GetAttestationReports


class _OldRuntime(Runtime):
    """A host from before the batched load and event stream: UNIMPLEMENTED."""

    LoadPrograms = runtime_pb2_grpc.DeviceRuntimeServicer.LoadPrograms
    WatchEventBatches = runtime_pb2_grpc.DeviceRuntimeServicer.WatchEventBatches


class _VerboseRuntime(Runtime):
    """A host whose batched load answers are larger than the control channel takes
    (thousands of long segment names per card); alone, each answer fits."""

    async def LoadPrograms(self, request: Any, context: Any) -> Any:  # noqa: N802
        response = await super().LoadPrograms(request, context)
        for result in response.results:
            result.loaded.segments.extend([f"{n:04d}" + "s" * 200 for n in range(2000)])
        return response


@asynccontextmanager
async def _old_host(agent: object, runtime: type[Runtime] = _OldRuntime
                    ) -> AsyncIterator[str]:
    server = grpc.aio.server()
    runtime_pb2_grpc.add_RemoteAttestationServicer_to_server(_OldAttestation(agent), server)
    runtime_pb2_grpc.add_DeviceRuntimeServicer_to_server(runtime(agent), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_a_host_without_the_batched_call_is_asked_card_by_card() -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=4)) as fleet, \
            _old_host(fleet.hosts[0]) as address, HostClient(address) as host:
        answers = await _attest_all(host, range(4))
        for device in range(4):
            nonce, evidence = answers[device]
            assert isinstance(evidence, bytes)
            verify_evidence(evidence, roots=[fleet.pki.root], policy=TrustPolicy(),
                            request=nonce)
        assert "attest" in host._card_by_card  # noqa: SLF001 - asked once, then card by card
        await _attest_all(host, range(4))


async def test_a_cancelled_first_caller_cancels_its_call_and_the_others_ask_again(
        ) -> None:
    sent: list[list[int]] = []
    release = anyio.Event()

    async def send(asked: Sequence[int]) -> list[int | BaseException]:
        sent.append(list(asked))
        if len(sent) == 1:
            await anyio.sleep_forever()  # cancelled with its sender
        await release.wait()
        return [n * 10 for n in asked]

    coalescer: Coalescer[int, int] = Coalescer(send, limit=8)
    got: dict[int, int] = {}

    async def ask(n: int) -> None:
        got[n] = await coalescer.submit(n)

    first = anyio.CancelScope()

    async def ask_then_go_away() -> None:
        with first:
            await ask(1)

    async with anyio.create_task_group() as tg:
        tg.start_soon(ask_then_go_away)
        tg.start_soon(ask, 2)
        tg.start_soon(ask, 3)
        await anyio.wait_all_tasks_blocked()
        first.cancel()   # the caller that sends the batch goes away
        await anyio.wait_all_tasks_blocked()
        release.set()
    assert sent == [[1, 2, 3], [2, 3]] and got == {2: 20, 3: 30}


async def test_a_failed_call_fails_every_card_of_it() -> None:
    async def send(asked: Sequence[int]) -> list[int | BaseException]:
        raise ConnectionError("host gone")

    coalescer: Coalescer[int, int] = Coalescer(send, limit=8)
    errors: list[BaseException] = []

    async def ask(n: int) -> None:
        try:
            await coalescer.submit(n)
        except ConnectionError as error:
            errors.append(error)

    async with anyio.create_task_group() as tg:
        for n in range(3):
            tg.start_soon(ask, n)
    assert len(errors) == 3 and coalescer.calls == 1


async def test_a_lost_lease_reaches_every_caller_as_itself() -> None:
    """The gate forbids the call (the replica's lease on the host is lost): each caller
    gets LeaseLost, batched or card by card, never wrapped in a group."""
    def lost() -> float:
        raise LeaseLost("h", "expired")

    async with run_fleet(FleetConfig(hosts=1, devices_per_host=3)) as fleet, \
            _old_host(fleet.hosts[0]) as old:
        for address in (fleet.addresses[0], old):
            async with HostClient(address) as host:
                await _attest_all(host, range(3))  # the old host: now known to lack it
                host.gate = lost
                caught: list[BaseException] = []

                async def one(device: int, client: HostClient = host,
                              caught: list[BaseException] = caught) -> None:
                    try:
                        await client.attest(device, os.urandom(32))
                    except LeaseLost as error:
                        caught.append(error)

                async with anyio.create_task_group() as tg:
                    for device in range(3):
                        tg.start_soon(one, device)
                assert len(caught) == 3, address
                async with anyio.create_task_group() as tg:   # alone, too
                    tg.start_soon(one, 0)
                assert len(caught) == 4


# --- loads ----------------------------------------------------------------------------

async def _load_all(host: HostClient, d: Deployment, devices: Sequence[int],
                    program_id: str | None = None) -> dict[int, LoadResult | ModelIPError]:
    """Every device loaded at once (as card drivers do): its receipt or its error."""
    answers: dict[int, LoadResult | ModelIPError] = {}

    async def one(index: int, device: int) -> None:
        try:
            answers[index] = await host.load(device, program_id or d.program_id)
        except ModelIPError as error:
            answers[index] = error

    async with anyio.create_task_group() as tg:
        for index, device in enumerate(devices):
            tg.start_soon(one, index, device)
    return answers


def _check_receipts(d: Deployment, answers: dict[int, LoadResult | ModelIPError],
                    devices: Sequence[int]) -> None:
    """Each card's receipt, verified against that card's own report and key slot."""
    for index, device in enumerate(devices):
        result = answers[index]
        assert isinstance(result, LoadResult), result
        report = d.reports[device]
        receipt = verify_load_receipt(result.receipt, result.receipt_signature, report=report,
                                      program_info_digest=info_digest(d.program), partition=0,
                                      source="test", key_slot=slot_digest(d.program,
                                                                           report.card_id))
        assert receipt.card_id == report.card_id


async def test_loads_asked_together_go_in_one_call_each_its_own_receipt(tmp_path: Path
                                                                        ) -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=6)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        d = await deploy(tmp_path, host, fleet, range(4))   # cards 4 and 5: no slot
        devices = [0, 1, 2, 3, 99, 4]
        answers = await _load_all(host, d, devices)
        assert host.load_calls == 1
        _check_receipts(d, answers, devices[:4])
        unknown, slotless = answers[4], answers[5]
        assert isinstance(unknown, NotFoundError) and unknown.device == 99
        assert isinstance(slotless, ModelIPError) and slotless.device == 4
        assert (await host.stats())["load_count"] == 6   # each request once (two refused)
        listed = {c.device: c for c in await host.list_devices()}
        assert {listed[n].state.value for n in range(4)} == {"LOADED"}
        assert listed[4].state.value == "ONLINE"


async def test_a_host_without_the_batched_load_is_loaded_card_by_card(tmp_path: Path
                                                                     ) -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=4)) as fleet, \
            _old_host(fleet.hosts[0]) as address, HostClient(address) as host:
        d = await deploy(tmp_path, host, fleet, range(4))
        answers = await _load_all(host, d, range(4))
        _check_receipts(d, answers, range(4))
        assert "load" in host._card_by_card  # noqa: SLF001 - asked once, then card by card
        assert (await host.stats())["load_count"] == 4   # UNIMPLEMENTED loaded nothing


async def test_a_batched_load_answer_too_large_goes_card_by_card_from_then_on(
        tmp_path: Path) -> None:
    """The batch was loaded, but its answer exceeds the control channel's cap: the
    cards are loaded again one by one (each answer fits), and this host's loads go
    card by card from then on (docs/protocol.md "Batches": the price is one load more
    per card of that batch)."""
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=4)) as fleet, \
            _old_host(fleet.hosts[0], _VerboseRuntime) as address, \
            HostClient(address) as host:
        d = await deploy(tmp_path, host, fleet, range(4))
        _check_receipts(d, await _load_all(host, d, range(4)), range(4))
        assert "load" in host._card_by_card  # noqa: SLF001
        assert (await host.stats())["load_count"] == 8
        _check_receipts(d, await _load_all(host, d, range(4)), range(4))
        assert (await host.stats())["load_count"] == 12   # no batch tried again


async def test_a_batched_load_under_an_older_fencing_epoch_is_every_cards_lease_lost(
        tmp_path: Path) -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=3)) as fleet, \
            HostClient(fleet.addresses[0], fence=(1, "a")) as old, \
            HostClient(fleet.addresses[0], fence=(2, "b")) as new:
        d = await deploy(tmp_path, old, fleet, range(3))
        assert await new.list_devices()   # the host has now seen epoch 2
        caught: list[BaseException] = []

        async def one(device: int) -> None:
            try:
                await old.load(device, d.program_id)
            except LeaseLost as error:
                caught.append(error)

        async with anyio.create_task_group() as tg:
            for device in range(3):
                tg.start_soon(one, device)
        assert len(caught) == 3 and old.load_calls == 1
        assert (await new.stats())["load_count"] == 0
        assert {c.state.value for c in await new.list_devices()} == {"ONLINE"}


async def test_a_batch_of_more_than_the_host_takes_is_refused_as_malformed() -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=1)) as fleet:
        channel = grpc.aio.insecure_channel(fleet.addresses[0])
        stub = runtime_pb2_grpc.DeviceRuntimeStub(channel)
        request = runtime_pb2.LoadProgramBatchRequest(requests=[
            runtime_pb2.LoadProgramRequest(device=0, program_id="ab" * 32)] * 257)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.LoadPrograms(request)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "at most 256" in (raised.value.details() or "")
        finally:
            await channel.close()
        assert fleet.hosts[0].stats.load_count == 0


async def test_a_batch_stays_open_while_others_keep_joining_at_most_so_long() -> None:
    """A window (0.3 s here), and another while someone joined in the last one, at most
    ``most`` windows: a burst goes in one call, a straggler after a quiet window in
    the next, and a steady stream is cut after ``most`` windows."""
    sent: list[list[int]] = []

    async def send(asked: Sequence[int]) -> list[int | BaseException]:
        sent.append(list(asked))
        return list(asked)

    coalescer: Coalescer[int, int] = Coalescer(send, limit=64, window=0.3, most=3)

    async def ask_at(delay: float, n: int) -> None:
        await anyio.sleep(delay)
        assert await coalescer.submit(n) == n

    async with anyio.create_task_group() as tg:
        for delay, n in [(0.0, 1), (0.1, 2), (0.45, 3), (1.6, 4)]:
            tg.start_soon(ask_at, delay, n)
    assert sent == [[1, 2, 3], [4]]
    sent.clear()
    async with anyio.create_task_group() as tg:   # one every 0.1 s for 1.5 s
        for n in range(15):
            tg.start_soon(ask_at, n * 0.1, n)
    assert len(sent[0]) in range(8, 11) and sum(sent, []) == list(range(15))


# --- events ---------------------------------------------------------------------------

async def _events_of_resets(host: HostClient, agent: Any, devices: range
                            ) -> list[tuple[int, str]]:
    """Reset ``devices`` at once; the (device, kind) of each event the client yields,
    until every card's ONLINE."""
    seen: list[tuple[int, str]] = []
    watchers = len(agent._watchers)  # noqa: SLF001 - others may watch too
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                async for event in host.watch_events():
                    seen.append((event.device, event.kind.value))
                    if sum(kind == "ONLINE" for _, kind in seen) == len(devices):
                        tg.cancel_scope.cancel()

            tg.start_soon(watch)
            while len(agent._watchers) <= watchers:  # noqa: SLF001 - ours is open
                await agent._watcher_added.wait()  # noqa: SLF001
            for device in devices:
                await host.reset(device)
    return seen


async def test_events_come_many_to_a_message_each_card_in_order() -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=4)) as fleet:
        channel = grpc.aio.insecure_channel(fleet.addresses[0])
        stub = runtime_pb2_grpc.DeviceRuntimeStub(channel)
        sizes: list[int] = []

        async def raw() -> None:
            async for batch in stub.WatchEventBatches(runtime_pb2.WatchEventsRequest()):
                sizes.append(len(batch.events))

        try:
            async with anyio.create_task_group() as tg, HostClient(fleet.addresses[0]) as host:
                tg.start_soon(raw)
                await fleet.hosts[0].watched()
                seen = await _events_of_resets(host, fleet.hosts[0], range(4))
                tg.cancel_scope.cancel()
        finally:
            await channel.close()
        for device in range(4):
            assert [k for d, k in seen if d == device] == ["RESET", "OFFLINE", "ONLINE"]
        assert "watch" not in host._card_by_card  # noqa: SLF001
        assert max(sizes) > 1 and sum(sizes) >= 8   # a reset and its offline: one message


async def test_a_host_without_batched_events_is_watched_event_by_event() -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=2)) as fleet, \
            _old_host(fleet.hosts[0]) as address, HostClient(address) as host:
        seen = await _events_of_resets(host, fleet.hosts[0], range(2))
        for device in range(2):
            assert [k for d, k in seen if d == device] == ["RESET", "OFFLINE", "ONLINE"]
        assert "watch" in host._card_by_card  # noqa: SLF001
