"""The card backend contract (docs/host-agent.md): what any backend must do, tested
through a host agent serving it over gRPC, as an orchestrator sees it.

Run against both backends: ``emulated`` (the emulator's cards) and ``exec`` (the
executable in tests/backends/cardfiles, written only against the exec contract, over
`modelip card` files-only cards). A new backend joins by adding a rig to ``RIGS``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from cryptography import x509

from orchestrator.agent.exec import ExecBackend, ExecConfig
from orchestrator.agent.host import HostAgent
from orchestrator.agent.servicers import serve
from orchestrator.agent.staging import Staging
from orchestrator.cli.main import main as modelip
from orchestrator.crypto.evidence import (
    TrustPolicy,
    VerifiedReport,
    verify_evidence,
    verify_load_receipt,
)
from orchestrator.crypto.mek import MEK
from orchestrator.emulator.backend import EmulatedBackend, FaultConfig
from orchestrator.emulator.card import EmulatedCard
from orchestrator.emulator.pki import VendorPKI
from orchestrator.errors import NotFoundError, ProgramNotLoaded, SessionInvalidError
from orchestrator.transport.client import HostClient
from orchestrator.transport.types import DeviceEvent
from tests.test_emulated_hosts import encrypt_for, info_digest, slot_digest

CARDS = 2
CARDFILES = Path(__file__).parent / "backends" / "cardfiles"


@dataclass
class Rig:
    host: HostClient
    root: x509.Certificate
    card_ids: list[str]


@asynccontextmanager
async def _served(agent: HostAgent[object], tmp_path: Path, pki: VendorPKI
                  ) -> AsyncIterator[Rig]:  # type: ignore[type-var]
    async with anyio.create_task_group() as tg:
        address = await tg.start(lambda task_status: serve(agent, task_status=task_status))
        async with HostClient(address) as host:
            yield Rig(host, pki.root, [f"c{d}" for d in range(CARDS)])
        tg.cancel_scope.cancel()


@asynccontextmanager
async def emulated_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    pki = VendorPKI.create()
    staging = Staging()
    backend = EmulatedBackend([EmulatedCard(pki.issue_card(f"c{d}")) for d in range(CARDS)],
                              staging, faults=FaultConfig(reboot_time=0.05))
    async with _served(HostAgent("contract", backend, staging), tmp_path, pki) as rig:
        yield rig


def cardfiles_config(tmp_path: Path, pki: VendorPKI, **overrides: object) -> ExecConfig:
    """The exec test backend over CARDS card files under tmp_path/cards."""
    (tmp_path / "pki").mkdir(exist_ok=True)
    pki.save(tmp_path / "pki")
    cards = tmp_path / "cards"
    cards.mkdir()
    for d in range(CARDS):
        assert modelip(["card", "init", "--pki", str(tmp_path / "pki"), "--id", f"c{d}",
                        "-o", str(cards / f"card{d}.json")]) == 0
    settings: dict[str, object] = {
        "executable": CARDFILES, "poll_interval": 0.2,
        "env": {"CARDS_DIR": str(cards), "MODELIP_CLI": f"{sys.executable} -m orchestrator"}}
    settings.update(overrides)
    return ExecConfig(**settings)  # type: ignore[arg-type]


@asynccontextmanager
async def exec_rig(tmp_path: Path) -> AsyncIterator[Rig]:
    pki = VendorPKI.create()
    staging = Staging(tmp_path / "staging")
    backend = ExecBackend(cardfiles_config(tmp_path, pki))
    async with _served(HostAgent("contract", backend, staging), tmp_path, pki) as rig:
        yield rig


RIGS: dict[str, Callable[[Path], AbstractAsyncContextManager[Rig]]] = {
    "emulated": emulated_rig, "exec": exec_rig}
backends = pytest.mark.parametrize("backend", sorted(RIGS))


async def _attest(rig: Rig, device: int) -> VerifiedReport:
    request = os.urandom(32)
    evidence = await rig.host.attest(device, request)
    return verify_evidence(evidence, roots=[rig.root], policy=TrustPolicy(), request=request)


async def _staged(rig: Rig, tmp_path: Path) -> tuple[Path, str, list[VerifiedReport]]:
    reports = [await _attest(rig, d) for d in range(CARDS)]
    program = encrypt_for(tmp_path, reports, MEK.generate())
    program_id, _ = await rig.host.stage(program)
    return program, program_id, reports


async def _wait_for(rig: Rig, device: int, boot: int) -> None:
    with anyio.fail_after(20):
        while not any(c.device == device and c.boot_counter >= boot  # noqa: ASYNC110 - polled
                      and c.state.value != "OFFLINE" for c in await rig.host.list_devices()):
            await anyio.sleep(0.05)


@backends
async def test_every_card_is_listed_once_online_with_its_identity(backend: str,
                                                                   tmp_path: Path) -> None:
    async with RIGS[backend](tmp_path) as rig:
        listed = await rig.host.list_devices()
        assert [c.device for c in listed] == list(range(CARDS))
        assert [c.card_id for c in listed] == rig.card_ids
        assert {c.state.value for c in listed} == {"ONLINE"}
        assert all(c.boot_counter >= 1 and len(c.session_id) == 32 for c in listed)


@backends
async def test_attestation_answers_the_request_for_the_card_named(backend: str,
                                                                  tmp_path: Path) -> None:
    async with RIGS[backend](tmp_path) as rig:
        listed = {c.device: c for c in await rig.host.list_devices()}
        for device in range(CARDS):
            report = await _attest(rig, device)  # verified against this very request
            assert report.card_id == listed[device].card_id
            assert report.session_id.hex() == listed[device].session_id
        with pytest.raises(NotFoundError):
            await rig.host.attest(CARDS + 5, os.urandom(32))


@backends
async def test_a_load_is_verified_by_the_card_and_listed(backend: str, tmp_path: Path) -> None:
    async with RIGS[backend](tmp_path) as rig:
        program, program_id, reports = await _staged(rig, tmp_path)
        result = await rig.host.load(1, program_id)
        receipt = verify_load_receipt(result.receipt, result.receipt_signature,
                                      report=reports[1], program_info_digest=info_digest(program),
                                      partition=0, source="card 1",
                                      key_slot=slot_digest(program, reports[1].card_id))
        assert receipt.verified and "network.onnx" in result.segments
        listed = {c.device: c for c in await rig.host.list_devices()}
        assert listed[1].state.value == "LOADED" and listed[1].program_id == program_id
        assert listed[0].state.value == "ONLINE"
        held = (await _attest(rig, 1)).loaded
        assert held is not None and held.info_digest == info_digest(program)


@backends
async def test_unload_clears_the_card_and_a_second_unload_says_not_loaded(
        backend: str, tmp_path: Path) -> None:
    async with RIGS[backend](tmp_path) as rig:
        _, program_id, _ = await _staged(rig, tmp_path)
        await rig.host.load(0, program_id)
        await rig.host.unload(0)
        assert (await rig.host.list_devices())[0].state.value == "ONLINE"
        assert (await _attest(rig, 0)).loaded is None
        with pytest.raises(ProgramNotLoaded):
            await rig.host.unload(0)


@backends
async def test_a_reset_ends_the_session_the_program_and_says_so(backend: str,
                                                                tmp_path: Path) -> None:
    async with RIGS[backend](tmp_path) as rig:
        _, program_id, before = await _staged(rig, tmp_path)
        await rig.host.load(0, program_id)
        seen: list[DeviceEvent] = []
        said_reset = anyio.Event()

        async def watch() -> None:
            async for event in rig.host.watch_events():
                seen.append(event)
                if event.device == 0 and event.kind.value == "RESET":
                    said_reset.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await anyio.sleep(0.5)  # the stream is open (and, polling, a listing is known)
            await rig.host.reset(0)
            await _wait_for(rig, 0, before[0].boot_counter + 1)
            with anyio.fail_after(10):
                await said_reset.wait()
            tg.cancel_scope.cancel()
        after = await _attest(rig, 0)
        assert after.boot_counter == before[0].boot_counter + 1
        assert after.session_id != before[0].session_id and after.loaded is None
        # the slot made for the old session opens nothing now
        with pytest.raises(SessionInvalidError):
            await rig.host.load(0, program_id)
