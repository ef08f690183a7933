"""A whole emulated fleet: H hosts of D cards each, one vendor PKI, in-process: each host
a host agent (agent/) over an emulated backend, its bodies staged in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

from orchestrator.agent.host import HostAgent
from orchestrator.agent.servicers import TLSServerConfig, serve
from orchestrator.agent.staging import Staging
from orchestrator.emulator.adversary import Adversary
from orchestrator.emulator.backend import EmulatedBackend, FaultConfig
from orchestrator.emulator.card import CardConfig, EmulatedCard
from orchestrator.emulator.pki import VendorPKI


@dataclass(frozen=True, slots=True)
class FleetConfig:
    hosts: int = 1
    devices_per_host: int = 4
    faults: FaultConfig = field(default_factory=FaultConfig)
    card: CardConfig = field(default_factory=CardConfig)
    # per "host/device" overrides, e.g. {"1/3": CardConfig(firmware_version="0.9.0")}
    card_overrides: Mapping[str, CardConfig] = field(default_factory=dict)
    adversary: Adversary = Adversary.NONE
    adversary_hosts: frozenset[int] | None = None      # None: every host
    adversary_devices: frozenset[int] | None = None    # None: every card of those hosts
    bind: str = "127.0.0.1"
    base_port: int = 0    # 0: any free port per host; else base_port + host index
    seed: int | None = None


def card_id_for(host: int, device: int) -> str:
    return f"h{host}-card{device}"


@dataclass
class EmulatedFleet:
    config: FleetConfig
    pki: VendorPKI
    hosts: list[HostAgent[EmulatedBackend]]

    @property
    def addresses(self) -> list[str]:
        return [host.address for host in self.hosts]

    @property
    def root_pem(self) -> bytes:
        return self.pki.root_pem


def build_hosts(config: FleetConfig, pki: VendorPKI) -> list[HostAgent[EmulatedBackend]]:
    hosts = []
    for h in range(config.hosts):
        cards = [
            EmulatedCard(pki.issue_card(card_id_for(h, d)),
                         config.card_overrides.get(f"{h}/{d}", config.card))
            for d in range(config.devices_per_host)
        ]
        hostile = config.adversary_hosts is None or h in config.adversary_hosts
        hosts.append(emulated_host(
            f"host{h}", cards, faults=config.faults,
            adversary=config.adversary if hostile else Adversary.NONE,
            adversary_devices=config.adversary_devices,
            seed=None if config.seed is None else config.seed + h,
        ))
    return hosts


def emulated_host(name: str, cards: list[EmulatedCard], *, faults: FaultConfig,
                  adversary: Adversary = Adversary.NONE,
                  adversary_devices: frozenset[int] | None = None, seed: int | None = None
                  ) -> HostAgent[EmulatedBackend]:
    """One emulated host: an agent over these cards (bodies staged in memory)."""
    staging = Staging(limit=faults.stage_capacity, bandwidth=faults.stage_bandwidth)
    backend = EmulatedBackend(cards, staging, faults=faults, adversary=adversary,
                              adversary_devices=adversary_devices, seed=seed)
    return HostAgent(name, backend, staging)


@asynccontextmanager
async def run_fleet(config: FleetConfig, *, pki: VendorPKI | None = None,
                    tls: TLSServerConfig | None = None,
                    on_ready: Callable[[EmulatedFleet], None] | None = None
                    ) -> AsyncIterator[EmulatedFleet]:
    """Start every host (each in the same task group) and stop them all on exit."""
    pki = pki or VendorPKI.create()
    fleet = EmulatedFleet(config, pki, build_hosts(config, pki))
    try:
        async with anyio.create_task_group() as tg:
            for index, host in enumerate(fleet.hosts):
                port = config.base_port + index if config.base_port else 0
                await tg.start(lambda h=host, p=port, task_status=anyio.TASK_STATUS_IGNORED:
                               serve(h, bind=config.bind, port=p, tls=tls,
                                     task_status=task_status))
            if on_ready:
                on_ready(fleet)
            try:
                yield fleet
            finally:
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller's own error surfaced through our task group: give it back
        # unwrapped, so `async with run_fleet(...)` behaves like any context.
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
