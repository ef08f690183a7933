"""Emulated hosts over real loopback gRPC: attestation, loading, execution, resets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
import pytest

from orchestrator.crypto.container import ContentPolicy, SealedContainer, SealSettings
from orchestrator.crypto.evidence import (
    TrustPolicy,
    VerifiedReport,
    verify_evidence,
    verify_load_receipt,
)
from orchestrator.crypto.mek import MEK
from orchestrator.crypto.wrap import key_slot_digest
from orchestrator.emulator.adversary import Adversary
from orchestrator.emulator.backend import FaultConfig
from orchestrator.emulator.fleet import EmulatedFleet, FleetConfig, run_fleet
from orchestrator.errors import (
    AttestationError,
    DeviceOffline,
    IntegrityError,
    NotFoundError,
    PolicyError,
    ProgramNotLoaded,
    SessionInvalidError,
    UnreachableError,
)
from orchestrator.fileops.encrypt import SessionTarget, encrypt_model, wrap_to_targets
from orchestrator.qpc.container import open_container
from orchestrator.transport.client import HostClient
from tests.models import pack_onnx_stage, reference_output, tiny_mlp


@dataclass
class Deployment:
    program: Path
    program_id: str
    reports: list[VerifiedReport]
    mek: MEK


async def attest_all(host: HostClient, fleet: EmulatedFleet, devices: range
                     ) -> list[VerifiedReport]:
    reports = []
    for device in devices:
        request = os.urandom(32)
        evidence = await host.attest(device, request)
        reports.append(verify_evidence(evidence, roots=[fleet.pki.root], policy=TrustPolicy(),
                                       request=request))
    return reports


def encrypt_for(tmp_path: Path, reports: list[VerifiedReport], mek: MEK, *, version: int = 1,
                floor: int | None = None, name: str = "out") -> Path:
    qpc = pack_onnx_stage(tiny_mlp(), tmp_path / f"{name}.qpc")
    targets = [SessionTarget.from_report(r, r.card_id) for r in reports]
    return encrypt_model(str(qpc), mek, str(tmp_path / name),
                         SealSettings("tiny", model_version=version,
                                      policy=ContentPolicy(rollback_floor=floor)),
                         targets=targets)[-1]


async def watching(fleet: EmulatedFleet) -> None:
    """Return once the host has our event stream open (else a reset could go unseen)."""
    with anyio.fail_after(10):
        await fleet.hosts[0].watched()


def info_digest(program: Path) -> bytes:
    import hashlib

    with open_container(program) as container:
        return hashlib.sha256(SealedContainer(container).info_bytes).digest()


def slot_digest(program: Path, card_id: str) -> bytes:
    """What a receipt of a load with the program's own slot binds: that slot's digest."""
    with open_container(program) as container:
        slot = next(s for s in SealedContainer(container).key_slots if s.card_id == card_id)
    return key_slot_digest(slot)


async def deploy(tmp_path: Path, host: HostClient, fleet: EmulatedFleet, devices: range
                 ) -> Deployment:
    reports = await attest_all(host, fleet, devices)
    mek = MEK.generate()
    program = encrypt_for(tmp_path, reports, mek)
    program_id, already = await host.stage(program)
    assert not already
    return Deployment(program, program_id, reports, mek)


async def test_attest_load_execute_over_grpc(tmp_path: Path) -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=4)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        assert await host.health()
        d = await deploy(tmp_path, host, fleet, range(4))
        x = np.random.default_rng(1).standard_normal((1, 8)).astype(np.float32)
        for device, report in enumerate(d.reports):
            result = await host.load(device, d.program_id)
            assert result.segments == ["io_desc.json", "network.onnx"]
            receipt = verify_load_receipt(result.receipt, result.receipt_signature,
                                          report=report, program_info_digest=info_digest(
                                              d.program), partition=0, source="test",
                                          key_slot=slot_digest(d.program, report.card_id))
            assert receipt.model_id == "tiny"
            outputs = await host.execute([device], {"x": x})
            np.testing.assert_allclose(outputs["y"], reference_output(tiny_mlp(), x),
                                       rtol=1e-5)
        listed = await host.list_devices()
        assert {d.state.value for d in listed} == {"LOADED"}
        # staging is content addressed: the same body is not stored twice
        assert (await host.stage(d.program))[1] is True
        assert (await host.stats())["stage_count"] == 1


async def test_reset_invalidates_the_session_and_rekey_restores_it(tmp_path: Path) -> None:
    faults = FaultConfig(reboot_time=0.05)
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=2, faults=faults)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        d = await deploy(tmp_path, host, fleet, range(2))
        for device in range(2):
            await host.load(device, d.program_id)
        events: list[str] = []

        async def watch() -> None:
            async for event in host.watch_events():
                if event.device == 1:
                    events.append(event.kind.value)
                if event.kind.value == "ONLINE":
                    return

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await watching(fleet)
            await host.reset(1)
            with pytest.raises(DeviceOffline):
                await host.load(1, d.program_id)
        assert events == ["RESET", "OFFLINE", "ONLINE"]
        with pytest.raises(ProgramNotLoaded):  # the reset wiped the card's memory
            await host.execute([1], {"x": np.zeros((1, 8), np.float32)})
        with pytest.raises(SessionInvalidError, match="earlier session"):
            await host.load(1, d.program_id)  # the stale slot is refused, by name
        fresh = await attest_all(host, fleet, range(1, 2))
        assert fresh[0].boot_counter == d.reports[1].boot_counter + 1
        slots = wrap_to_targets(d.mek, [SessionTarget.from_report(d.reports[0], "0"),
                                        SessionTarget.from_report(fresh[0], "1")],
                                info_digest(d.program))
        await host.load(1, d.program_id, key_slots=slots)  # no re-upload, no re-encryption
        assert (await host.stats())["stage_count"] == 1
        await host.execute([1], {"x": np.zeros((1, 8), np.float32)})


async def test_clear_errors_for_unknown_device_program_and_unreachable_host(tmp_path: Path
                                                                            ) -> None:
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=1)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        with pytest.raises(NotFoundError, match="no device 7"):
            await host.attest(7, b"x")
        with pytest.raises(NotFoundError, match="not staged"):
            await host.load(0, "ab" * 32)
    async with HostClient("127.0.0.1:1") as host:
        with pytest.raises(UnreachableError, match="unreachable"):
            await host.list_devices()


async def test_cancelled_stage_leaves_nothing_staged(tmp_path: Path) -> None:
    faults = FaultConfig(stage_bandwidth=4 << 20)  # 4 MiB/s: an 8 MiB stage takes ~2 s
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=1, faults=faults)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(8 << 20))
        with anyio.move_on_after(0.5) as scope:
            await host.stage(big)
        assert scope.cancelled_caught
        await anyio.sleep(0.3)
        assert (await host.stats())["staged_programs"] == 0
        from orchestrator.transport.client import program_digest

        with pytest.raises(NotFoundError):
            await host.load(0, program_digest(big))
        listed = await host.list_devices()
        assert listed[0].state.value == "ONLINE" and listed[0].program_id == ""


async def test_server_stops_within_its_grace_period() -> None:
    with anyio.fail_after(10):  # liveness bound, generous: grace is 1 s
        async with run_fleet(FleetConfig(hosts=2, devices_per_host=1)) as fleet:
            address = fleet.addresses[0]
            async with HostClient(address) as host:
                assert await host.health()
    async with HostClient(address) as host:
        with pytest.raises(UnreachableError):
            await host.list_devices()


# --- adversary modes: each detected, each with its own error ----------------------------


async def _hostile(mode: Adversary) -> FleetConfig:
    return FleetConfig(hosts=1, devices_per_host=2, adversary=mode,
                       adversary_devices=frozenset({0}), faults=FaultConfig(reboot_time=0.05))


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (Adversary.SUBSTITUTE_KEY, "signature does not verify"),
        (Adversary.REPLAY_REPORT, "nonce mismatch"),
        (Adversary.IGNORE_NONCE, "nonce mismatch"),
    ],
)
async def test_attestation_attacks_are_caught_by_the_verifier(mode: Adversary,
                                                              expected: str) -> None:
    async with run_fleet(await _hostile(mode)) as fleet, HostClient(fleet.addresses[0]) as host:
        await attest_all(host, fleet, range(1, 2))  # the honest card passes
        if mode is Adversary.REPLAY_REPORT:
            await host.attest(0, os.urandom(32))  # the host records a report to replay
        request = os.urandom(32)
        evidence = await host.attest(0, request)
        with pytest.raises(AttestationError, match=expected):
            verify_evidence(evidence, roots=[fleet.pki.root], policy=TrustPolicy(),
                            request=request)


async def test_tampered_body_is_refused_by_the_card(tmp_path: Path) -> None:
    async with run_fleet(await _hostile(Adversary.TAMPER_BODY)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        d = await deploy(tmp_path, host, fleet, range(2))
        with pytest.raises(IntegrityError, match="failed authentication|was altered"):
            await host.load(0, d.program_id)
        await host.load(1, d.program_id)  # the untouched card loads


async def test_swapped_key_slots_do_not_open(tmp_path: Path) -> None:
    async with run_fleet(await _hostile(Adversary.SWAP_SLOTS)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        d = await deploy(tmp_path, host, fleet, range(2))
        with pytest.raises(IntegrityError, match="wrapped MEK does not open"):
            await host.load(0, d.program_id)


async def test_swap_waits_for_another_cards_slot_when_each_card_gets_only_its_own(
        tmp_path: Path) -> None:
    """The engine's way (one slot per load): the victim's load comes first and the
    host holds it until the other card's slot passes through, then swaps it in."""
    async with run_fleet(await _hostile(Adversary.SWAP_SLOTS)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        d = await deploy(tmp_path, host, fleet, range(2))
        targets = [SessionTarget.from_report(r, r.card_id) for r in d.reports]
        own = [wrap_to_targets(d.mek, [t], info_digest(d.program))[0] for t in targets]
        outcome: list[BaseException | None] = [None]

        async def victim() -> None:
            try:
                await host.load(0, d.program_id, key_slots=[own[0]])
            except IntegrityError as err:
                outcome[0] = err

        async with anyio.create_task_group() as tg:
            tg.start_soon(victim)
            await anyio.sleep(0.3)  # the victim's load is held, not answered
            assert outcome[0] is None and (await host.stats())["load_count"] == 0
            await host.load(1, d.program_id, key_slots=[own[1]])
        assert "wrapped MEK does not open" in str(outcome[0])


async def test_older_model_version_is_caught(tmp_path: Path) -> None:
    async with run_fleet(await _hostile(Adversary.OLD_VERSION)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        reports = await attest_all(host, fleet, range(2))
        mek = MEK.generate()  # the owner reuses the MEK across releases
        old = encrypt_for(tmp_path, reports, mek, version=1, name="v1")
        new = encrypt_for(tmp_path, reports, mek, version=2, floor=2, name="v2")
        await host.stage(old)
        new_id, _ = await host.stage(new)
        # the host loads v1 instead of v2: the card's signed receipt gives it away
        result = await host.load(0, new_id)
        with pytest.raises(IntegrityError, match="substituted by the host"):
            verify_load_receipt(result.receipt, result.receipt_signature, report=reports[0],
                                program_info_digest=info_digest(new), partition=0,
                                source="card 0",
                                key_slot=slot_digest(new, reports[0].card_id))
        # and a card that has seen v2 refuses v1 outright (rollback floor)
        fleet.hosts[0].backend.adversary = Adversary.NONE
        await host.load(0, new_id)
        fleet.hosts[0].backend.adversary = Adversary.OLD_VERSION
        with pytest.raises(PolicyError, match="below this card's rollback floor 2"):
            await host.load(0, new_id)


async def test_forged_reset_storm_is_disproved_by_attestation() -> None:
    async with run_fleet(await _hostile(Adversary.RESET_STORM)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        before = await attest_all(host, fleet, range(1))
        resets = 0
        with anyio.move_on_after(0.3):
            async for event in host.watch_events():
                resets += event.kind.value == "RESET" and event.device == 0
        assert resets >= 10  # a flood of hints...
        after = await attest_all(host, fleet, range(1))
        # ...that a fresh attestation disproves: same boot, same session
        assert (after[0].boot_counter, after[0].session_id) == (before[0].boot_counter,
                                                                 before[0].session_id)


async def test_suppressed_resets_are_caught_by_a_fresh_attestation() -> None:
    async with run_fleet(await _hostile(Adversary.SUPPRESS_RESETS)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        before = await attest_all(host, fleet, range(1))
        seen: list[str] = []

        async def watch() -> None:
            async for event in host.watch_events():
                seen.append(event.kind.value)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await watching(fleet)
            await host.reset(0)
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()
        assert seen == []  # the host said nothing...
        after = await attest_all(host, fleet, range(1))
        assert after[0].boot_counter == before[0].boot_counter + 1  # ...the card did
        assert after[0].session_id != before[0].session_id


async def test_a_load_is_answered_only_once_the_body_is_verified(tmp_path: Path) -> None:
    """The receipt says `verified` and the card's report names the program; a body the
    host altered is refused by the load itself, and the card then holds nothing."""
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=2)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        d = await deploy(tmp_path, host, fleet, range(2))
        result = await host.load(0, d.program_id)
        receipt = verify_load_receipt(result.receipt, result.receipt_signature,
                                      report=d.reports[0],
                                      program_info_digest=info_digest(d.program), partition=0,
                                      source="card 0",
                                      key_slot=slot_digest(d.program, d.reports[0].card_id))
        assert receipt.verified and receipt.rollback_floor == 1
        held = (await attest_all(host, fleet, range(1)))[0].loaded
        assert held is not None and held.info_digest == info_digest(d.program)
        assert (held.model_id, held.model_version, held.partition) == ("tiny", 1, 0)
        fleet.hosts[0].backend.adversary = Adversary.TAMPER_BODY
        fleet.hosts[0].backend.adversary_devices = frozenset({1})
        with pytest.raises(IntegrityError, match="failed authentication"):
            await host.load(1, d.program_id)
        assert (await attest_all(host, fleet, range(1, 2)))[0].loaded is None
        assert (await host.list_devices())[1].state.value == "ONLINE"


async def test_a_load_waits_for_a_busy_card_in_a_thread_while_its_host_answers(
        tmp_path: Path) -> None:
    """A small program is loaded on the host's loop only if its card is free: a card held
    by another thread (as a running inference holds it) is loaded in a thread once it is
    free, and the host answers other calls meanwhile."""
    import threading

    async with run_fleet(FleetConfig(hosts=1, devices_per_host=1)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        d = await deploy(tmp_path, host, fleet, range(1))
        card = fleet.hosts[0].backend.cards[0]
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with card._lock:
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(5)
        try:
            async with anyio.create_task_group() as tg:
                results: list[object] = []

                async def load() -> None:
                    results.append(await host.load(0, d.program_id))
                tg.start_soon(load)
                await anyio.sleep(0.2)
                with anyio.fail_after(5):   # a load waiting on the loop would stall this
                    listed = await host.list_devices()
                assert listed[0].card_id == d.reports[0].card_id and results == []
                release.set()
        finally:
            release.set()
            holder.join()
        assert len(results) == 1 and card.program is not None \
            and card.program.program_id == d.program_id


async def test_a_relayed_slot_opens_no_other_version_of_the_model(tmp_path: Path) -> None:
    """The host keeps the slot it relayed for v2 and loads v1 (same MEK) with it."""
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=1)) as fleet, \
            HostClient(fleet.addresses[0]) as host:
        reports = await attest_all(host, fleet, range(1))
        mek = MEK.generate()
        old = encrypt_for(tmp_path, [], mek, version=1, floor=1, name="v1")
        new = encrypt_for(tmp_path, [], mek, version=2, floor=1, name="v2")
        old_id, _ = await host.stage(old)
        new_id, _ = await host.stage(new)
        target = [SessionTarget.from_report(reports[0], "0")]
        relayed = wrap_to_targets(mek, target, info_digest(new))
        await host.load(0, new_id, key_slots=relayed)
        with pytest.raises(IntegrityError, match="made for another program"):
            await host.load(0, old_id, key_slots=relayed)
        from dataclasses import replace

        relabelled = [replace(relayed[0], program=info_digest(old))]
        with pytest.raises(IntegrityError, match="does not open"):
            await host.load(0, old_id, key_slots=relabelled)
        held = (await attest_all(host, fleet, range(1)))[0].loaded
        assert held is not None and held.model_version == 2  # still v2, nothing replaced
