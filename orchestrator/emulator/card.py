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
    report_evidence,
    sign_receipt,
)
from orchestrator.crypto.wrap import Kem, KeySlot, SessionKeyPair, key_slot_digest, unwrap_mek
from orchestrator.emulator.pki import CardIdentity
from orchestrator.emulator.program import checked_input, read_io_desc
from orchestrator.errors import (
    CardOffline,
    FormatError,
    IntegrityError,
    PolicyError,
    ProgramNotLoaded,
    SessionInvalidError,
)
from orchestrator.qpc.container import Container
from orchestrator.qpc.onnx_package import IO_DESC, NETWORK_ONNX

DEFAULT_FIRMWARE = "1.12.0"
DEFAULT_SKU = "AIC100-EMU"


_QUICK_WIPE = 1 << 20   # bytes of card memory zeroed on the host's loop; more: a thread


def _yield_interpreter() -> None:
    time.sleep(0)


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
    key_slot_digest: bytes = b""   # of the slot this load opened (the receipt binds it)
    io_desc: dict[str, Any] | None = None
    session: Any = None  # onnxruntime session, built lazily from card memory


class EmulatedCard:
    """A card. Thread-safe: the host calls it from gRPC handlers."""

    def __init__(self, identity: CardIdentity, config: CardConfig | None = None, *,
                 clock: Callable[[], float] = time.time, boot_counter: int = 0,
                 session_secret: bytes | None = None, session_id: bytes | None = None,
                 rollback_floors: Mapping[str, int] | None = None) -> None:
        self._identity = identity
        self._chain_der = tuple(cert.public_bytes(serialization.Encoding.DER)
                                for cert in identity.chain)
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

    def boot(self, *, blocking: bool = True) -> bool:
        """Come up with a new session: fresh key pair and id, higher boot counter. False
        (nothing done) if ``blocking`` is false and the card is busy."""
        if not self._lock.acquire(blocking=blocking):
            return False
        try:
            self._session = SessionKeyPair.generate(self.config.kem)
            self.session_id = secrets.token_bytes(16)
            self.boot_counter += 1
            self.online = True
            return True
        finally:
            self._lock.release()

    def power_off(self, *, blocking: bool = True) -> bool:
        """Reset, first half: memory zeroed, session key destroyed, card offline. False
        (nothing done) if ``blocking`` is false and the card is busy or has more than
        _QUICK_WIPE bytes of program to zero (call it again in a thread)."""
        if not self._lock.acquire(blocking=blocking):
            return False
        try:
            if not blocking and self.program is not None and sum(
                    len(buffer) for buffer in self.program.segments.values()) > _QUICK_WIPE:
                return False
            self._wipe_program()
            self._session = None
            self.session_id = b""
            self.online = False
            return True
        finally:
            self._lock.release()

    def reset(self) -> None:
        """A reset with no reboot time (files-only mode): power_off then boot."""
        self.power_off()
        self.boot()

    def unload(self) -> None:
        with self._lock:
            self._wipe_program()

    def _wipe_program(self) -> None:
        if self.program is not None:
            for buffer in self.program.segments.values():
                wipe_plaintext(buffer)
            self.program.session = None
            self.program = None

    # --- attestation ----------------------------------------------------------------

    def attest(self, request: bytes) -> bytes:
        """A signed report binding SHA-256(request), the current session key and the
        program in card memory (if any)."""
        message = self.attest_message(request)
        assert message is not None  # noqa: S101 - a blocking call always answers
        return message.SerializeToString(deterministic=True)

    def attest_message(self, request: bytes, *, blocking: bool = True
                       ) -> evidence_pb2.AttestationEvidence | None:
        """``attest`` as a message; None if ``blocking`` is false and the card is busy."""
        if not self._lock.acquire(blocking=blocking):
            return None
        try:
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
            if self.program is not None:  # installed only once decrypted and verified
                body.loaded.CopyFrom(evidence_pb2.LoadedProgram(
                    program_info_digest=self.program.info_digest,
                    model_id=self.program.model_id, model_version=self.program.model_version,
                    partition=self.program.partition, program_id=self.program.program_id))
            return report_evidence(body, self._identity.key, self._chain_der)
        finally:
            self._lock.release()

    # --- loading --------------------------------------------------------------------

    def try_load(self, container: Container, *, program_id: str, partition: int = 0,
                 key_slots: list[KeySlot] | None = None) -> list[str] | None:
        """``load`` holding the card throughout, never waiting for it (a small program,
        loaded on the host's loop): None, nothing done, if the card is busy."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self.load(container, program_id=program_id, partition=partition,
                             key_slots=key_slots, between_chunks=None)
        finally:
            self._lock.release()

    def load(self, container: Container, *, program_id: str, partition: int = 0,
             key_slots: list[KeySlot] | None = None,
             between_chunks: Callable[[], None] | None = _yield_interpreter) -> list[str]:
        """Open our key slot, decrypt and verify the whole program into card memory.

        ``key_slots`` replaces the container's own slots (the host passes fresh
        ones at re-key). The card authenticates before it parses: the encryption
        info (with the MEK from a slot bound to that very info), then the MDP
        metadata (by its authenticated digest), then every chunk; only then is
        the program installed and a receipt signable. Raises
        SessionInvalidError (no slot for this session), IntegrityError
        (tampered, or a slot made for another program), PolicyError (expired,
        firmware, rollback), FormatError (not an encrypted program). Returns
        the names of the segments loaded. ``between_chunks`` runs after each chunk.
        """
        with self._lock:
            session = self._require_session()
            session_id = self.session_id
        sealed = SealedContainer(container)
        slots = sealed.key_slots if key_slots is None else key_slots
        info_digest = hashlib.sha256(sealed.info_bytes).digest()
        mdp = any(entry.nested for entry in sealed.info.segments)
        slot = self._pick_slot(slots, partition if mdp else None, session_id)
        mek = unwrap_mek(slot, session.private, card_id=self.card_id, session_id=session_id,
                         program=info_digest)
        try:
            sealed.open(mek)
            self._enforce_policy(sealed)
            target = sealed
            if mdp:
                meta = sealed.mdp_meta()  # authenticated, then parsed
                assert meta is not None  # noqa: S101 - it has nested partitions
                target = sealed.partition(partition, mek, meta)
            elif partition != 0:
                raise FormatError(container.label, "is not an MDP container; "
                                  "only partition 0 exists")
        finally:
            mek.wipe()  # the content key stays inside `target`, in card memory
        # Outside the lock (unless try_load holds it), giving up the interpreter after
        # every chunk: the card (and the host around it) keep answering meanwhile.
        segments = target.decrypt_all(between_chunks=between_chunks)
        with self._lock:
            if self.session_id != session_id or not self.online:  # reset meanwhile
                for buffer in segments.values():
                    wipe_plaintext(buffer)
                raise SessionInvalidError(f"card {self.card_id} was reset during the load")
            self._wipe_program()
            model_id = sealed.info.model_id
            self._floors[model_id] = max(self._floors.get(model_id, 0),
                                         sealed.info.policy.rollback_floor)
            program = LoadedProgram(program_id, model_id, sealed.info.model_version, partition,
                                    segments, info_digest, key_slot_digest(slot))
            if IO_DESC in segments:
                program.io_desc = read_io_desc(segments[IO_DESC], container.label)
            self.program = program
        return sorted(segments)

    def load_receipt(self) -> tuple[bytes, bytes]:
        """A signed statement of what this card holds now, decrypted and verified."""
        with self._lock:
            program = self.program
            if program is None:
                raise ProgramNotLoaded(f"card {self.card_id}: no program loaded")
            receipt = evidence_pb2.LoadReceipt(
                card_id=self.card_id, session_id=self.session_id,
                boot_counter=self.boot_counter, program_info_digest=program.info_digest,
                partition=program.partition, model_id=program.model_id,
                model_version=program.model_version, verified=True,
                rollback_floor=self._floors.get(program.model_id, 0),
                key_slot_digest=program.key_slot_digest)
            return sign_receipt(receipt, self._identity.key)

    def _pick_slot(self, slots: list[KeySlot], partition: int | None,
                   session_id: bytes) -> KeySlot:
        mine = [slot for slot in slots if slot.card_id == self.card_id]
        if not mine:
            raise SessionInvalidError(f"card {self.card_id}: no key slot for this card")
        current = [slot for slot in mine if slot.session_id == session_id]
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
        disk. Inputs are matched by name and checked against the stage's
        declared dtypes and shapes first; nothing of onnxruntime's own messages
        leaves the card. Raises ProgramNotLoaded, FormatError (no ONNX stage,
        inputs missing or of the wrong type or shape, the model cannot run them).
        """
        with self._lock:
            self._require_session()
            program = self.program
            if program is None:
                raise ProgramNotLoaded(f"card {self.card_id}: no program loaded")
            if program.session is None:
                program.session = self._runtime(program)
            session = program.session
        stage = f"card {self.card_id}"
        feed = {}
        for node in session.get_inputs():
            if node.name not in inputs:
                expected = ", ".join(repr(n.name) for n in session.get_inputs())
                raise FormatError(stage, f"missing input tensor {node.name!r} (this stage "
                                  f"takes {expected})")
            feed[node.name] = checked_input(stage, node, inputs[node.name])
        try:
            results = session.run(None, feed)
        except Exception:  # onnxruntime's text names its internals: say only what failed
            raise FormatError(stage, "the model could not run on these inputs (values out "
                              "of the model's range?)") from None
        return {node.name: value for node, value in zip(session.get_outputs(), results,
                                                         strict=True)}

    def input_names(self) -> list[str]:
        """The names the loaded stage takes (ProgramNotLoaded if none)."""
        with self._lock:
            program = self.program
            if program is None:
                raise ProgramNotLoaded(f"card {self.card_id}: no program loaded")
            if program.session is None:
                program.session = self._runtime(program)
            return [node.name for node in program.session.get_inputs()]

    def _runtime(self, program: LoadedProgram) -> Any:
        if NETWORK_ONNX not in program.segments:
            raise FormatError(f"card {self.card_id}", "the loaded program has no "
                              "network.onnx stage; emulated cards execute only "
                              "programs packaged from ONNX")
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            return onnxruntime.InferenceSession(bytes(program.segments[NETWORK_ONNX]),
                                                options, providers=["CPUExecutionProvider"])
        except Exception:  # authenticated bytes the runtime still refuses
            raise FormatError(f"card {self.card_id}", "the loaded network.onnx is not a "
                              "model this runtime can run") from None

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
