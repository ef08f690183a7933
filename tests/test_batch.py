"""Batched attestation (docs/protocol.md "Batches"): what is asked together goes in one
call, each card keeps its own nonce, evidence and error; a host without the batched
call is asked card by card."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
import grpc

from orchestrator._proto.modelip.v1 import runtime_pb2_grpc
from orchestrator.agent.servicers import Attestation, Runtime
from orchestrator.crypto.evidence import TrustPolicy, verify_evidence
from orchestrator.emulator.fleet import FleetConfig, run_fleet
from orchestrator.errors import NotFoundError
from orchestrator.transport.batch import Coalescer
from orchestrator.transport.client import ATTEST_BATCH, HostClient


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


@asynccontextmanager
async def _old_host(agent: object) -> AsyncIterator[str]:
    server = grpc.aio.server()
    runtime_pb2_grpc.add_RemoteAttestationServicer_to_server(_OldAttestation(agent), server)
    runtime_pb2_grpc.add_DeviceRuntimeServicer_to_server(Runtime(agent), server)
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
        assert host._batched is False  # noqa: SLF001 - asked once, then card by card
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
    from orchestrator.errors import LeaseLost

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
