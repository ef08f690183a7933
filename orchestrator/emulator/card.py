"""One emulated accelerator card.

What a real card does, with real cryptography: a vendor-certified identity
key; at every boot a fresh session key pair and session id; signed attestation
reports; loading an encrypted program by opening its own key slot, decrypting
into card memory and verifying every chunk; running ONNX stages from memory;
and on reset, zeroing its memory and forgetting its session key. Private keys
never leave this object (the files-only mode persists the card, see
``to_state``, because there the file *is* the card).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from orchestrator._proto.modelip.v1 import evidence_pb2
from orchestrator.crypto.container import PlainBuffer, SealedContainer, wipe_plaintext
from orchestrator.crypto.evidence import (
    REPORT_VERSION,
    parse_version,
    sign_receipt,
    sign_report,
)
from orchestrator.crypto.wrap import Kem, KeySlot, SessionKeyPair, unwrap_mek
from orchestrator.emulator.pki import CardIdentity
from orchestrator.errors import (
    FormatError,
    IntegrityError,
    ModelIPError,
    PolicyError,
    ProgramNotLoaded,
    SessionInvalidError,
)
from orchestrator.qpc.container import Container
from orchestrator.qpc.mdp import read_mdp_meta
from orchestrator.qpc.onnx_package import IO_DESC, NETWORK_ONNX

DEFAULT_FIRMWARE = "1.12.0"
DEFAULT_SKU = "AIC100-EMU"
READY_WAIT = 600.0  # seconds execute waits for background decryption


def _yield_interpreter() -> None:
    time.sleep(0)


class CardOffline(ModelIPError):  # noqa: N818 - a state, named as the host reports it
    """The card is rebooting and answers nothing."""

    exit_code = 4


@dataclass(frozen=True, slots=True)
class CardConfig:
    firmware_version: str = DEFAULT_FIRMWARE
    measurements: Mapping[str, bytes] = field(default_factory=dict)
    sku: str = DEFAULT_SKU
    kem: Kem = Kem.P256

    def all_measurements(self) -> dict[str, bytes]:
        default = {"firmware": hashlib.sha256(b"emulated firmware " +
                                              self.firmware_version.encode()).digest()}
        return {**default, **self.measurements}


@dataclass(slots=True)
class LoadedProgram:
    program_id: str
    model_id: str
    model_version: int
    partition: int
    segments: dict[str, PlainBuffer]
    info_digest: bytes = b""
    io_desc: dict[str, Any] | None = None
    session: Any = None  # onnxruntime session, built lazily from card memory
    ready: threading.Event = field(default_factory=threading.Event)
    error: str = ""      # set if background verification failed


class EmulatedCard:
    """A card. Thread-safe: the host calls it from gRPC handlers."""

    def __init__(self, identity: CardIdentity, config: CardConfig | None = None, *,
                 clock: Callable[[], float] = time.time, boot_counter: int = 0,
                 session_secret: bytes | None = None, session_id: bytes | None = None,
                 rollback_floors: Mapping[str, int] | None = None) -> None:
        self._identity = identity
        self.config = config or CardConfig()
        self._clock = clock
        self._lock = threading.RLock()
        self.boot_counter = boot_counter
        self.online = True
        self._floors: dict[str, int] = dict(rollback_floors or {})  # survives resets (NV)
        self.program: LoadedProgram | None = None
        if session_secret is not None and session_id is not None:
            self._session: SessionKeyPair | None = SessionKeyPair.from_secret(
                self.config.kem, session_secret)
            self.session_id = session_id
        else:
            self._session = None
            self.session_id = b""
            self.boot()

    def __repr__(self) -> str:
        state = "ONLINE" if self.online else "OFFLINE"
        return f"EmulatedCard({self.card_id!r}, boot={self.boot_counter}, {state})"

    @property
    def card_id(self) -> str:
        return self._identity.card_id

    @property
    def session_public_key(self) -> bytes:
        return self._require_session().public_raw

    @property
    def session_fingerprint(self) -> bytes:
        return hashlib.sha256(self._require_session().public_raw).digest()[:8]

    def _require_session(self) -> SessionKeyPair:
        if not self.online or self._session is None:
            raise CardOffline(f"card {self.card_id} is offline")
        return self._session

    # --- life cycle ---------------------------------------------------------------

    def boot(self) -> None:
        """Come up with a new session: fresh key pair and id, higher boot counter."""
        with self._lock:
            self._session = SessionKeyPair.generate(self.config.kem)
            self.session_id = secrets.token_bytes(16)
            self.boot_counter += 1
            self.online = True

    def power_off(self) -> None:
        """Reset, first half: memory zeroed, session key destroyed, card offline."""
        with self._lock:
            self._wipe_program()
            self._session = None
            self.session_id = b""
            self.online = False

    def reset(self) -> None:
        """A reset with no reboot time (files-only mode): power_off then boot."""
        self.power_off()
        self.boot()

    def unload(self) -> None:
        with self._lock:
            self._wipe_program()

    def _wipe_program(self) -> None:
        if self.program is not None:
            self.program.ready.set()  # wake any execute waiting on it: it sees the unload
            for buffer in self.program.segments.values():
                wipe_plaintext(buffer)
            self.program.session = None
            self.program = None

    # --- attestation ----------------------------------------------------------------

    def attest(self, request: bytes) -> bytes:
        """A signed report binding SHA-256(request) and the current session key."""
        with self._lock:
            session = self._require_session()
            body = evidence_pb2.ReportBody(
                report_version=REPORT_VERSION,
                card_id=self.card_id,
                serial=self._identity.serial,
                sku=self.config.sku,
                firmware_version=self.config.firmware_version,
                boot_counter=self.boot_counter,
                session_id=self.session_id,
                session_kem=session.kem.value,
                session_public_key=session.public_raw,
                request_digest=hashlib.sha256(request).digest(),
                issued_at=int(self._clock()),
            )
            for name, digest in sorted(self.config.all_measurements().items()):
                body.measurements.add(name=name, digest=digest)
            return sign_report(body, self._identity.key, self._identity.chain)

    # --- loading --------------------------------------------------------------------

    def load(self, container: Container, *, program_id: str, partition: int = 0,
             key_slots: list[KeySlot] | None = None, verify_later: bool = False) -> list[str]:
        """Open our key slot, decrypt and verify the program into card memory.

        ``key_slots`` replaces the container's own slots (the host passes fresh
        ones at re-key). With ``verify_later`` the card returns once its key is
        installed and the encryption info authenticated, and decrypts and
        verifies the segments in the background (as an inline decryption engine
        would); ``execute`` waits for that and fails if it failed. Raises
        SessionInvalidError (no slot for this session), IntegrityError
        (tampered), PolicyError (expired, firmware, rollback), FormatError (not
        an encrypted program). Returns the names of the segments loaded.
        """
        with self._lock:
            session = self._require_session()
            sealed = SealedContainer(container)
            slots = sealed.key_slots if key_slots is None else key_slots
            meta = read_mdp_meta(container)
            slot = self._pick_slot(slots, partition if meta else None)
            mek = unwrap_mek(slot, session.private, card_id=self.card_id,
                             session_id=self.session_id)
            try:
                sealed.open(mek)
                self._enforce_policy(sealed)
                target = sealed
                if meta is not None:
                    if partition >= len(meta.partitions):
                        raise FormatError(container.label, f"has no partition {partition}")
                    sealed.decrypt_segment("mdp_meta_info")  # authenticates the meta
                    target = sealed.nested(meta.partitions[partition].segment, mek)
                    if target.info.partition != partition:
                        raise IntegrityError(f"{container.label}: partition {partition} "
                                             "holds another partition's program")
                elif partition != 0:
                    raise FormatError(container.label, "is not an MDP container; "
                                      "only partition 0 exists")
            finally:
                mek.wipe()  # the content key stays inside `target`, in card memory
            self._wipe_program()
            model_id = sealed.info.model_id
            self._floors[model_id] = max(self._floors.get(model_id, 0),
                                         sealed.info.policy.rollback_floor)
            program = LoadedProgram(program_id, model_id, sealed.info.model_version, partition,
                                    {}, hashlib.sha256(sealed.info_bytes).digest())
            names = sorted(e.name for e in target.info.segments if not e.nested)
            if verify_later:
                self.program = program
                threading.Thread(target=self._verify_in_background, args=(program, target),
                                 name=f"{self.card_id}-decrypt", daemon=True).start()
                return names
            self._install(program, target.decrypt_all())
            return names

    def _install(self, program: LoadedProgram, segments: dict[str, PlainBuffer]) -> None:
        program.segments = segments
        if IO_DESC in segments:
            program.io_desc = json.loads(bytes(segments[IO_DESC]))
        program.ready.set()
        self.program = program

    def _verify_in_background(self, program: LoadedProgram, target: SealedContainer) -> None:
        try:
            # Outside the lock, giving up the interpreter after every chunk: the
            # card (and the host around it) keep answering while it decrypts.
            segments = target.decrypt_all(between_chunks=_yield_interpreter)
        except ModelIPError as err:
            with self._lock:
                program.error = str(err)
                program.ready.set()
            return
        with self._lock:
            if self.program is not program:  # reset or unloaded meanwhile: drop it
                for buffer in segments.values():
                    wipe_plaintext(buffer)
                return
            self._install(program, segments)

    def load_receipt(self) -> tuple[bytes, bytes]:
        """A signed statement of what this card holds now (the owner checks it)."""
        with self._lock:
            program = self.program
            if program is None:
                raise ProgramNotLoaded(f"card {self.card_id}: no program loaded")
            receipt = evidence_pb2.LoadReceipt(
                card_id=self.card_id, session_id=self.session_id,
                boot_counter=self.boot_counter, program_info_digest=program.info_digest,
                partition=program.partition, model_id=program.model_id,
                model_version=program.model_version)
            return sign_receipt(receipt, self._identity.key)

    def _pick_slot(self, slots: list[KeySlot], partition: int | None) -> KeySlot:
        mine = [slot for slot in slots if slot.card_id == self.card_id]
        if not mine:
            raise SessionInvalidError(f"card {self.card_id}: no key slot for this card")
        current = [slot for slot in mine if slot.session_id == self.session_id]
        if not current:
            raise SessionInvalidError(f"card {self.card_id}: key slot is for an earlier session "
                                      "(card was reset; re-attest and replace the key slots)")
        if partition is not None:
            current = [slot for slot in current if slot.slot == partition]
            if not current:
                raise IntegrityError(f"card {self.card_id}: no key slot for partition "
                                     f"{partition}")
        return current[0]

    def _enforce_policy(self, sealed: SealedContainer) -> None:
        policy = sealed.info.policy
        if policy.not_after and self._clock() > policy.not_after:
            raise PolicyError(f"model {sealed.info.model_id!r} expired")
        if policy.min_firmware and (parse_version(self.config.firmware_version)
                                    < parse_version(policy.min_firmware)):
            raise PolicyError(f"model needs firmware >= {policy.min_firmware}, card has "
                              f"{self.config.firmware_version}")
        floor = self._floors.get(sealed.info.model_id, 0)
        if sealed.info.model_version < floor:
            raise PolicyError(f"model {sealed.info.model_id!r} version "
                              f"{sealed.info.model_version} is below this card's rollback "
                              f"floor {floor}")

    # --- execution ----------------------------------------------------------------

    def execute(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """Run the loaded ONNX stage on named numpy arrays; outputs by name.

        The model is handed to onnxruntime from card memory; it never touches
        disk. Raises ProgramNotLoaded, FormatError (no ONNX stage, or inputs
        missing).
        """
        with self._lock:
            self._require_session()
            program = self.program
            if program is None:
                raise ProgramNotLoaded(f"card {self.card_id}: no program loaded")
        if not program.ready.wait(READY_WAIT):
            raise ProgramNotLoaded(f"card {self.card_id}: program still being decrypted")
        with self._lock:
            if self.program is not program:
                raise ProgramNotLoaded(f"card {self.card_id}: program was unloaded")
            if program.error:
                raise IntegrityError(f"card {self.card_id}: {program.error}")
            if program.session is None:
                if NETWORK_ONNX not in program.segments:
                    raise FormatError(f"card {self.card_id}", "the loaded program has no "
                                      "network.onnx stage; emulated cards execute only "
                                      "programs packaged from ONNX")
                import onnxruntime

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = 1
                options.inter_op_num_threads = 1
                program.session = onnxruntime.InferenceSession(
                    bytes(program.segments[NETWORK_ONNX]), options,
                    providers=["CPUExecutionProvider"])
            session = program.session
        names = [node.name for node in session.get_inputs()]
        if "" in inputs and len(names) == 1:  # one unnamed tensor for a one-input stage
            inputs = {names[0]: inputs[""]}
        missing = [name for name in names if name not in inputs]
        if missing:
            raise FormatError(f"card {self.card_id}", f"missing input tensors {missing}")
        results = session.run(None, {name: inputs[name] for name in names})
        return {node.name: value for node, value in zip(session.get_outputs(), results,
                                                         strict=True)}

    # --- persistence (files-only mode) ------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """The whole card as JSON-able data, private keys included (card.json)."""
        with self._lock:
            session = self._require_session()
            key_pem = self._identity.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption())
            return {
                "format": "modelip-emulated-card/1",
                "card_id": self.card_id,
                "identity_key": key_pem.decode(),
                "chain": [c.public_bytes(serialization.Encoding.PEM).decode()
                          for c in self._identity.chain],
                "firmware_version": self.config.firmware_version,
                "sku": self.config.sku,
                "kem": self.config.kem.value,
                "measurements": {k: v.hex() for k, v in self.config.measurements.items()},
                "boot_counter": self.boot_counter,
                "session_id": self.session_id.hex(),
                "session_secret": session.secret.hex(),
                "rollback_floors": dict(self._floors),
            }

    @classmethod
    def from_state(cls, state: Mapping[str, Any], *, source: str) -> EmulatedCard:
        """Rebuild a card saved by ``to_state``; FormatError if it is not one."""
        try:
            if state["format"] != "modelip-emulated-card/1":
                raise KeyError("format")
            key = serialization.load_pem_private_key(state["identity_key"].encode(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError("identity key")
            chain = tuple(x509.load_pem_x509_certificate(pem.encode())
                          for pem in state["chain"])
            config = CardConfig(
                firmware_version=str(state["firmware_version"]),
                measurements={k: bytes.fromhex(v) for k, v in state["measurements"].items()},
                sku=str(state["sku"]),
                kem=Kem.parse(state["kem"]),
            )
            return cls(CardIdentity(str(state["card_id"]), key, chain), config,
                       boot_counter=int(state["boot_counter"]),
                       session_secret=bytes.fromhex(state["session_secret"]),
                       session_id=bytes.fromhex(state["session_id"]),
                       rollback_floors={str(k): int(v)
                                        for k, v in state["rollback_floors"].items()})
        except (KeyError, ValueError, TypeError, AttributeError):
            raise FormatError(source, "not an emulated card file") from None
