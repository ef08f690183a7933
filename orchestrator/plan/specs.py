"""The sections of a plan, as frozen values (docs/plans.md documents every key)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.crypto.custody import TokenSpec
from orchestrator.plan.paths import is_loopback


@dataclass(frozen=True, slots=True)
class ModelSpec:
    qpc: Path | None
    onnx: Path | None
    partitions: int
    balance: str
    model_id: str
    version: int
    rollback_floor: int
    expires: int
    min_firmware: str


@dataclass(frozen=True, slots=True)
class MEKSpec:
    file: Path | None
    generate: bool
    sealed: Path | None = None
    pkcs11: TokenSpec | None = None


@dataclass(frozen=True, slots=True)
class TLSSpec:
    ca: Path | None
    cert: Path | None
    key: Path | None


@dataclass(frozen=True, slots=True)
class HostSpec:
    address: str
    devices: tuple[int, ...]
    tls: TLSSpec | None
    insecure: bool = False  # plaintext gRPC to a host that is not loopback, on purpose
    labels: Mapping[str, str] = field(default_factory=dict)   # for deployments' placement

    @property
    def loopback(self) -> bool:
        return is_loopback(self.address)


@dataclass(frozen=True, slots=True)
class EmulatedSpec:
    hosts: int
    devices_per_host: int
    reset_rate: float = 0.0
    reboot_time: float = 0.2
    attest_latency: float = 0.0
    drop_events: float = 0.0
    stage_capacity: int = 0       # bytes each host stages at most (0: no limit)
    firmware: str = "1.12.0"
    kem: str = "P256"
    adversary: str = "none"
    adversary_hosts: tuple[int, ...] = ()
    adversary_devices: tuple[int, ...] = ()
    old_firmware_cards: tuple[str, ...] = ()  # "h/d" cards given firmware 0.9.0
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class PolicySpec:
    firmware: tuple[str, ...] = ()
    min_firmware: str = ""
    measurements: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    cards: tuple[str, ...] = ()
    kems: tuple[str, ...] = ("P256", "MLKEM768_X25519")
    max_age: float = 120.0


@dataclass(frozen=True, slots=True)
class RetrySpec:
    attempts: int = 5
    backoff: float = 0.2
    max_backoff: float = 5.0


@dataclass(frozen=True, slots=True)
class RekeySpec:
    auto: bool = True
    min_interval: float = 1.0     # per card: at most one re-key this often (storms)
    check_interval: float = 5.0   # periodic re-attestation of serving cards; 0 = off
    resync_interval: float = 1.0  # per host: list its cards, wake drivers whose card differs
    probe_timeout: float = 2.0    # deadline of that listing; two misses = host unreachable


@dataclass(frozen=True, slots=True)
class TimeoutSpec:
    rpc: float = 10.0
    load: float = 120.0
    card: float = 300.0           # outer limit for one card's attest-wrap-load
    # deployments: seconds a host is down before its groups are placed elsewhere
    # (docs/deployments.md "Failover"); 0: never
    failover: float = 60.0


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    lease_ttl: float = 10.0       # seconds a host's lease lasts unless renewed (every ttl/3)
