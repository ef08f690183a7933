"""The composition root: the only place that turns a plan into running objects.

The CLI, the tests and the benches all build a fleet and an engine here, so
what is tested is what runs. This is also the one place outside the CLI that
may wire in the embedded emulated fleet: the engine never imports the emulator.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, TypeVar

import anyio
from cryptography import x509

from orchestrator.atomicfile import private_tree
from orchestrator.crypto.chain import load_roots_file
from orchestrator.engine.deployment import Deployment, PrepareDeployment
from orchestrator.engine.engine import Engine, MakeReplica
from orchestrator.engine.host import HostTarget
from orchestrator.engine.hostapi import Connect, HostAPI, HostLease
from orchestrator.engine.placement import Group
from orchestrator.engine.ports import MakeRollout
from orchestrator.engine.prepare import (
    PreparedProgram,
    obtain_mek,
    prepare_program,
    sealing_source,
)
from orchestrator.engine.rollout.setup import RolloutSetup, arrange, arrange_deployment
from orchestrator.engine.store.protocol import Store
from orchestrator.engine.store.sqlite import SQLiteStore
from orchestrator.errors import (
    CustodyError,
    MEKError,
    UsageError,
)
from orchestrator.plan.deployments import DeploymentSpec
from orchestrator.plan.model import Plan
from orchestrator.statedir import in_state_dir, state_lock
from orchestrator.transport.client import HostClient
from orchestrator.transport.types import Deadlines, TLSClientConfig

if TYPE_CHECKING:
    from orchestrator.crypto.mek import MEK
    from orchestrator.engine.store.postgres import PostgresStore

T = TypeVar("T")


@asynccontextmanager
async def fleet_for(plan: Plan) -> AsyncIterator[tuple[list[HostTarget], list[x509.Certificate]]]:
    """(host targets, trust roots): the plan's hosts, or an embedded emulated fleet."""
    roots = [root for path in plan.trust_roots for root in load_roots_file(str(path))]
    if plan.emulated is None:
        hosts = []
        for spec in plan.hosts:
            tls = None
            if spec.tls is not None:
                tls = TLSClientConfig.from_paths(
                    str(spec.tls.ca) if spec.tls.ca else None,
                    str(spec.tls.cert) if spec.tls.cert else None,
                    str(spec.tls.key) if spec.tls.key else None)
            hosts.append(HostTarget(spec.address, spec.address, spec.devices, tls))
        yield hosts, roots
        return
    from orchestrator.crypto.wrap import Kem
    from orchestrator.emulator.adversary import Adversary
    from orchestrator.emulator.backend import FaultConfig
    from orchestrator.emulator.card import CardConfig
    from orchestrator.emulator.fleet import FleetConfig, run_fleet
    from orchestrator.emulator.pki import VendorPKI

    emulated = plan.emulated
    try:
        adversary = Adversary(emulated.adversary)
    except ValueError:
        raise UsageError(f"{plan.source}: fleet.emulated.adversary: unknown mode "
                         f"{emulated.adversary!r}") from None
    card = CardConfig(firmware_version=emulated.firmware, kem=Kem.parse(emulated.kem))
    config = FleetConfig(
        hosts=emulated.hosts, devices_per_host=emulated.devices_per_host,
        faults=FaultConfig(reset_rate=emulated.reset_rate, reboot_time=emulated.reboot_time,
                           attest_latency=emulated.attest_latency,
                           drop_events=emulated.drop_events,
                           stage_capacity=emulated.stage_capacity),
        card=card,
        card_overrides={key: CardConfig(firmware_version="0.9.0", kem=card.kem)
                        for key in emulated.old_firmware_cards},
        adversary=adversary,
        adversary_hosts=frozenset(emulated.adversary_hosts or ()) or None,
        adversary_devices=frozenset(emulated.adversary_devices or ()) or None,
        seed=emulated.seed)
    pki = in_state_dir(plan, lambda: VendorPKI.load_or_create(plan.state_dir / "emulated-pki"))
    async with run_fleet(config, pki=pki) as fleet:
        hosts = [HostTarget(host.name, host.address, tuple(range(len(host.backend.cards))))
                 for host in fleet.hosts]
        yield hosts, [pki.root, *roots]


def default_replica_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def grpc_host(target: HostTarget, deadlines: Deadlines, lease: HostLease | None, *,
              claim: tuple[str, bool] | None = None) -> HostAPI:
    """The HostAPI of a real (or emulated) host: the gRPC client of its proxy (with a
    replica's lease: its gate, and its fencing token on every call; with ``claim``:
    the fleet's identity, and whether it takes cards over, on every call)."""
    return HostClient(target.address, tls=target.tls, deadlines=deadlines,
                      gate=lease.remaining if lease else None,
                      fence=(lease.epoch, lease.holder) if lease else None, claim=claim)


async def claiming(store: Store, connect: Connect | None, take_over: bool) -> Connect:
    """How the engine reaches hosts: ``connect`` as given, or gRPC naming this fleet's
    identity to the hosts (docs/protocol.md "Claims")."""
    if connect is not None:
        return connect
    return functools.partial(grpc_host, claim=(await store.fleet_identity(), take_over))


@asynccontextmanager
async def open_engine(plan: Plan, *, retry_quarantined: bool = False,
                      replica: str | None = None, retry_rollout: bool = False,
                      replace_fleet: bool = False, connect: Connect | None = None,
                      take_over: bool = False) -> AsyncIterator[Engine]:
    """The plan's MEK, prepared program, store and fleet, as an Engine ready to run.

    Holds the state directory's lock for the whole block (a second orchestrator on
    the same state directory gets StateDirError "in use by pid N"); the MEK is wiped
    from memory when the block ends. With a shared store (``plan.store``) the engine
    is the replica ``replica`` (default: host name and pid) of docs/replicas.md.
    If the fleet serves another version of the model, the engine replaces it as the
    plan's ``rollout:`` says (docs/rollouts.md; ``retry_rollout``: again, after a
    rollback of the same version). A shared store holds one fleet: a plan that
    differs from the one recorded is refused (UsageError) unless ``replace_fleet``.
    Hosts are told the fleet's identity with every call (``connect`` not given); a
    card another fleet holds is refused, or taken over with ``take_over``.
    """
    replica = replica or default_replica_name()
    with state_lock(plan, f"lock-{replica}" if plan.shared else "lock"):
        if plan.deployments:
            async with _with_deployments(plan, connect, take_over=take_over,
                                         retry_quarantined=retry_quarantined,
                                         retry_rollout=retry_rollout, replica=replica,
                                         replace_fleet=replace_fleet) as engine:
                yield engine
            return
        mek = in_state_dir(plan, lambda: obtain_mek(plan))
        try:
            async with _open_store(plan, replica) as (store, shared):
                if plan.mek.sealed is not None and plan.mek.pkcs11 is not None:
                    await store.record_unseal(replica, plan.mek.pkcs11.token,
                                              plan.mek.pkcs11.kek, str(plan.mek.sealed))
                program = await _prepare(plan, mek, shared)
                fleet = await _agree_on_fleet(plan, program, shared, replace=replace_fleet)
                rollout = await arrange(plan, store, mek, program, retry=retry_rollout,
                                        prepare=lambda p: in_state_dir(
                                            p, lambda: prepare_program(p, mek)))
                async with fleet_for(plan) as (hosts, roots):
                    # everything is in place: the journal's WAL, the caches, the PKI
                    in_state_dir(plan, lambda: private_tree(plan.state_dir))
                    yield Engine(plan, hosts, roots, mek, program, store,
                                 connect=await claiming(store, connect, take_over),
                                 retry_quarantined=retry_quarantined,
                                 replica=_replica(shared, fleet), rollouts=_rollouts(rollout))
        finally:
            mek.wipe()


def _mek_of(plan: Plan) -> MEK:
    return in_state_dir(plan, lambda: obtain_mek(plan))


@asynccontextmanager
async def _with_deployments(plan: Plan, connect: Connect | None, *, take_over: bool,
                            retry_quarantined: bool, retry_rollout: bool, replica: str,
                            replace_fleet: bool) -> AsyncIterator[Engine]:
    """An Engine for a plan with deployments (docs/deployments.md): each deployment's MEK
    and program, its groups placed on the fleet (kept where the store says they were,
    as long as they still fit), every MEK wiped at the end. With a shared store every
    replica places the same (placement is a pure function of the same inputs) and
    drives the hosts it holds."""
    from orchestrator.engine.placement import place
    from orchestrator.plan.deployments import inventory

    meks: list[MEK] = []
    try:
        async with _open_store(plan, replica) as (store, shared):
            prepared = []
            unserved: dict[str, str] = {}
            for spec in plan.deployments:
                sub = plan.of_deployment(spec)
                try:
                    meks.append(_mek_of(sub))
                except (CustodyError, MEKError) as err:   # this deployment fails alone
                    if len(unserved) + 1 == len(plan.deployments):
                        raise   # none has its key: nothing to run
                    unserved[spec.name] = f"its key custody failed: {err}"
                    continue
                prepared.append((spec, await _prepare(sub, meks[-1], shared), meks[-1]))
            fleet = await _agree_on_fleet(plan, [p for _, p, _ in prepared], shared,
                                          replace=replace_fleet)
            # every deployment keeps its place, one without its key too (its groups are
            # left alone: not driven, not given to another)
            placed = place(inventory(plan.hosts, plan.emulated),
                           [spec.need for spec in plan.deployments], await store.placements())
            await store.record_placements(placed.groups)
            deployments = [Deployment(spec.name, program, mek, tuple(placed.groups[spec.name]),
                                      placed.pending.get(spec.name, ""))
                           for spec, program, mek in prepared]
            prepare = None
            if shared is None:   # `modelip apply` hands a running watch its changed plans
                prepare = await _applied_here(plan, store, meks)
            rollouts = [await arrange_deployment(plan, store, spec, program, mek,
                                                 len(placed.groups[spec.name]),
                                                 retry=retry_rollout)
                        for spec, program, mek in prepared]
            connecting = await claiming(store, connect, take_over)
            async with fleet_for(plan) as (hosts, roots):
                in_state_dir(plan, lambda: private_tree(plan.state_dir))
                if shared is None:   # replicas: each host's cards are its holder's to touch
                    await _give_up_unplaced(plan, store, hosts, placed.groups, connecting)
                yield Engine(plan, hosts, roots, meks[0], prepared[0][1], store,
                             prepare_deployment=prepare, connect=connecting,
                             retry_quarantined=retry_quarantined, deployments=deployments,
                             unserved=unserved, replica=_replica(shared, fleet),
                             rollouts=_rollouts(*rollouts))
    finally:
        for mek in meks:
            mek.wipe()


async def _applied_here(plan: Plan, journal: Store, meks: list[MEK]) -> PrepareDeployment:
    """Record what runs (for `modelip apply`'s diff); how a deployment added while
    running gets its own MEK (wiped with the others at the end) and program."""
    from orchestrator.apply import spec_record
    from orchestrator.engine.store.applies import Applies

    Applies(plan.journal_path).record_running(
        {spec.name: spec_record(spec) for spec in plan.deployments})

    async def prepare(new: Plan, spec: DeploymentSpec, groups: tuple[Group, ...],
                      short: str) -> Deployment:
        sub = new.of_deployment(spec)
        meks.append(_mek_of(sub))
        return Deployment(spec.name, await _prepare(sub, meks[-1], None), meks[-1], groups,
                          short)
    return prepare


async def _give_up_unplaced(plan: Plan, store: Store, hosts: Sequence[HostTarget],
                            groups: Mapping[str, Sequence[Group]], connect: Connect) -> None:
    """What the plan no longer places (it changed while nothing ran): given up."""
    from orchestrator.engine.strays import give_up_unplaced
    await give_up_unplaced(
        store, hosts, {(g.host, device) for placed in groups.values() for g in placed
                       for device in g.devices},
        connect, Deadlines(attest=plan.timeouts.rpc, control=plan.timeouts.rpc,
                           load=plan.timeouts.load),
        why="given up at the start: the plan places no deployment on it now")


def _replica(shared: PostgresStore | None, fleet: str) -> MakeReplica | None:
    if shared is None:
        return None
    from orchestrator.engine.replicas import Replica

    return lambda hosts, ctx, recount, rollouts: Replica(hosts, ctx, recount, shared,
                                                         fleet=fleet, rollouts=rollouts)


def fleet_identity(plan: Plan, program: PreparedProgram | Sequence[PreparedProgram]
                   ) -> tuple[str, str]:
    """What every replica of a shared fleet must agree on (docs/replicas.md "One fleet
    per store"): the program (its id is the sealed body's digest: model, version,
    MEK and sealing settings), the hosts and their cards, the MDP groups, the trust
    roots and the policy. (digest, the same in words.)"""
    roots = sorted(hashlib.sha256(path.read_bytes()).hexdigest() for path in plan.trust_roots)
    programs = [program] if isinstance(program, PreparedProgram) else list(program)
    document = json.dumps({
        "program": programs[0].program_id if len(programs) == 1 else
        [p.program_id for p in programs], "group_size": plan.group_size, "roots": roots,
        "hosts": sorted([h.address, sorted(h.devices)] for h in plan.hosts),
        "policy": repr(plan.policy),
        **({"deployments": [[d.name, d.groups, list(d.hosts), d.spread]
                            for d in plan.deployments]} if plan.deployments else {})},
        sort_keys=True)
    cards = sum(len(h.devices) for h in plan.hosts)
    what = (f"model {plan.model.model_id or '-'} version {programs[0].version} (program "
            f"{programs[0].program_id[:16]}), {len(plan.hosts)} hosts, {cards} cards"
            if len(programs) == 1 else
            f"{len(programs)} deployments ({', '.join(d.name for d in plan.deployments)}), "
            f"{len(plan.hosts)} hosts, {cards} cards")
    return hashlib.sha256(document.encode()).hexdigest(), what


async def _agree_on_fleet(plan: Plan, program: PreparedProgram | Sequence[PreparedProgram],
                          shared: PostgresStore | None, *, replace: bool) -> str:
    """This plan's fleet digest, once the store agrees it is the fleet's ("" without a
    shared store). UsageError (one line) if the store's fleet runs another plan."""
    if shared is None:
        if replace:
            raise UsageError("--replace-fleet: only with a shared store (--store URL)")
        return ""
    digest, what = fleet_identity(plan, program)
    recorded = await shared.offer_fleet_plan(digest, what, replace=replace)
    if recorded.digest != digest:
        raise UsageError(f"{plan.source}: the store's fleet runs another plan ({recorded.what}, "
                         f"recorded by replica {recorded.replica}); this plan: {what}. One "
                         "fleet per store: run that plan, or replace it on purpose with "
                         "--replace-fleet (the other replicas then stop)")
    return digest


def _rollouts(*setups: RolloutSetup | None) -> list[MakeRollout]:
    from orchestrator.engine.rollout.controller import rollout_of

    return [rollout_of(setup) for setup in setups if setup is not None]


@asynccontextmanager
async def _open_store(plan: Plan, replica: str
                      ) -> AsyncIterator[tuple[Store, PostgresStore | None]]:
    if not plan.shared:
        with SQLiteStore(plan.journal_path) as journal:
            yield journal, None
        return
    async with shared_store(plan, replica) as store:
        yield store, store


@asynccontextmanager
async def shared_store(plan: Plan, replica: str, *, migrate: bool = True
                       ) -> AsyncIterator[PostgresStore]:
    """The plan's shared store, open as ``replica`` (its schema made or migrated unless
    not ``migrate``: then StoreUnavailable if there is none), closed at the end."""
    from orchestrator.engine.store.postgres import opened

    async with opened(plan.store, replica, lease_ttl=plan.replicas.lease_ttl,
                      migrate=migrate) as store:
        yield store


@contextmanager
def existing_journal(plan: Plan, *, read_only: bool) -> Iterator[SQLiteStore]:
    """The plan's journal, for a command that runs no engine (status; rollout requests:
    not ``read_only``). UsageError if no deployment has made one yet."""
    if not plan.journal_path.exists():
        raise UsageError(f"{plan.source}: no journal yet at {plan.journal_path} "
                         "(run `modelip deploy` first)")
    with SQLiteStore(plan.journal_path, read_only=read_only) as journal:
        yield journal


async def _prepare(plan: Plan, mek: MEK, shared: PostgresStore | None) -> PreparedProgram:
    """The encrypted body. Its salt is derived, not chosen (prepare_program), so every
    replica seals the same body; with a shared store the first records it and the
    others check theirs against the record. The store is never asked for a salt: a
    database writer cannot make one salt seal two plaintexts."""
    program = await anyio.to_thread.run_sync(
        lambda: in_state_dir(plan, lambda: prepare_program(plan, mek)))
    if shared is None:
        return program
    _, _, key = await anyio.to_thread.run_sync(
        lambda: in_state_dir(plan, lambda: sealing_source(plan, mek)))
    recorded = await shared.offer_seal(key, program.salt, program.program_id)
    if recorded != (program.salt, program.program_id):
        raise UsageError(f"{plan.source}: this replica's encrypted body (program "
                         f"{program.program_id[:16]}) is not the one recorded in the store "
                         f"(program {recorded[1][:16]}) for the same model, MEK and "
                         "settings: another modelip version on a replica, or a store "
                         "written by someone else (docs/security.md)")
    return program
