"""What a host says and how it is reached, in our words: the value types of the host
protocol (a card's status, an event, a load's result), the deadlines of its calls and a
client's TLS settings. No gRPC here: the engine's port to a host (engine/hostapi.py)
is written in these types, and any HostAPI can speak them."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import (
    FileInputError,
)

# What both ends of the host protocol name the same way (docs/protocol.md): the
# client here and any host (the emulated one) import them from this one place.
DEFAULT_PORT = 62473
REASON_KEY = "modelip-reason"   # trailing metadata: the ErrorReason's name
DEVICE_KEY = "modelip-device"   # trailing metadata: the card concerned
FENCE_KEY = "modelip-fence"     # request metadata: "EPOCH:HOLDER" (fencing)
CLAIM_KEY = "modelip-fleet"     # request metadata: the calling fleet's identity (claims)
TAKE_OVER_KEY = "modelip-take-over"   # "1": take a card another fleet holds, on purpose
MAX_MESSAGE = 64 << 20          # the largest message either end sends


@dataclass(frozen=True, slots=True)
class Deadlines:
    """Seconds each kind of call may take."""

    attest: float = 10.0
    control: float = 10.0
    stage: float = 600.0
    load: float = 120.0
    execute: float = 60.0


@dataclass(frozen=True, slots=True)
class TLSClientConfig:
    """Server verification (``ca_pem``) and, for mTLS, our client certificate."""

    ca_pem: bytes | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None

    @classmethod
    def from_paths(cls, ca: str | None, cert: str | None = None,
                   key: str | None = None) -> TLSClientConfig:
        if (cert is None) != (key is None):
            from orchestrator.errors import UsageError

            raise UsageError("--tls-cert and --tls-key go together")

        def read(path: str | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError:
                raise FileInputError(path, f"cannot read {what}") from None

        return cls(read(ca, "TLS CA"), read(cert, "TLS certificate"), read(key, "TLS key"))


class DeviceState(enum.Enum):
    """A card's state as its host reports it (a hint). UNDEFINED: a value the
    protocol does not define (a protocol violation of that host, never raised)."""

    ONLINE = "ONLINE"
    OFFLINE = "OFFLINE"
    LOADED = "LOADED"
    UNDEFINED = "UNDEFINED"


class EventKind(enum.Enum):
    """What a host says happened to a card (a hint). UNDEFINED as above."""

    ONLINE = "ONLINE"
    OFFLINE = "OFFLINE"
    RESET = "RESET"
    LOADED = "LOADED"
    UNLOADED = "UNLOADED"
    UNDEFINED = "UNDEFINED"


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """One row of ListDevices: what the host claims (check with an attestation)."""

    device: int
    card_id: str
    state: DeviceState
    boot_counter: int
    session_fingerprint: str
    program_id: str
    partition: int
    program_ready: bool = False
    session_id: str = ""      # hex, as reports, key slots and `inspect` name a session
    claimed_by: str = ""      # the fleet the host says holds the card (its word)


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a card reports after loading: segment names and its signed receipt."""

    segments: list[str]
    receipt: bytes
    receipt_signature: bytes
    taken_from: str = ""      # the fleet the host says it was taken over from (its word)


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """A hint from the host (never a fact: verify with a fresh attestation)."""

    device: int
    kind: EventKind
    boot_counter: int
    time_ns: int
