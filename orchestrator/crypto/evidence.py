"""Attestation evidence: signing (card side) and verification (owner side).

Verification is the gate in front of every MEK wrap: a report whose chain,
signature, request digest, age or policy does not check out raises, and no
MEK is ever wrapped to its key. docs/protocol.md ("Attestation") is the spec.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    load_der_public_key,
)
from google.protobuf.message import DecodeError

from orchestrator._proto.modelip.v1 import evidence_pb2
from orchestrator.crypto.chain import ChainCache, verified_chain
from orchestrator.crypto.wrap import Kem, decode_session_public_key
from orchestrator.errors import (
    AttestationError,
    FormatError,
    PolicyError,
)

REPORT_VERSION = 1
SIGNATURE_CONTEXT = b"modelip/v1 attestation report\0"
RECEIPT_CONTEXT = b"modelip/v1 load receipt\0"
MAX_EVIDENCE_BYTES = 1 << 20


def parse_version(text: str) -> tuple[int, ...]:
    """"1.12.3" -> (1, 12, 3); FormatError if not dotted integers."""
    try:
        parts = tuple(int(part) for part in text.split("."))
    except ValueError:
        raise FormatError("firmware version", f"{text!r} is not dotted numbers") from None
    if not parts or any(part < 0 for part in parts):
        raise FormatError("firmware version", f"{text!r} is not dotted numbers")
    return parts


@dataclass(frozen=True, slots=True)
class TrustPolicy:
    """What the owner accepts from a card, beyond a valid chain and signature.

    Empty collections mean "no restriction". ``max_age`` bounds how old a report
    may be; ``clock_skew`` how far in the future its time may be.
    """

    allowed_firmware: frozenset[str] = frozenset()
    min_firmware: str = ""
    allowed_measurements: Mapping[str, frozenset[bytes]] = field(default_factory=dict)
    card_allowlist: frozenset[str] = frozenset()
    allowed_kems: frozenset[Kem] = frozenset({Kem.P256, Kem.MLKEM768_X25519})
    max_age: float = 300.0
    clock_skew: float = 60.0


@dataclass(frozen=True, slots=True)
class HeldProgram:
    """What a card's signed report says it holds in memory, decrypted and verified."""

    info_digest: bytes
    model_id: str
    model_version: int
    partition: int
    program_id: str

    def describe(self) -> str:
        return (f"model {self.model_id!r} version {self.model_version}, partition "
                f"{self.partition}, program {self.info_digest.hex()[:16]}")


@dataclass(frozen=True, slots=True)
class VerifiedReport:
    """A report that passed every check: the only input wrap_mek takes keys from."""

    card_id: str
    serial: str
    sku: str
    firmware_version: str
    measurements: Mapping[str, bytes]
    boot_counter: int
    session_id: bytes
    kem: Kem
    session_public_key: bytes
    issued_at: int
    root_fingerprint: str
    card_public_key: bytes  # DER SubjectPublicKeyInfo of the certified identity key
    loaded: HeldProgram | None = None  # None: the card holds no program

    @property
    def session_fingerprint(self) -> str:
        return hashlib.sha256(self.session_public_key).hexdigest()[:16]


def sign_report(body: evidence_pb2.ReportBody, key: ec.EllipticCurvePrivateKey,
                chain: Sequence[x509.Certificate | bytes]) -> bytes:
    """Card side: serialize, sign and package a report as AttestationEvidence bytes."""
    return report_evidence(body, key, chain).SerializeToString(deterministic=True)


def report_evidence(body: evidence_pb2.ReportBody, key: ec.EllipticCurvePrivateKey,
                    chain: Sequence[x509.Certificate | bytes]
                    ) -> evidence_pb2.AttestationEvidence:
    """Card side: a signed report as a message (``chain``: certificates or their DER)."""
    body_bytes = body.SerializeToString(deterministic=True)
    signature = key.sign(SIGNATURE_CONTEXT + body_bytes, ec.ECDSA(hashes.SHA256()))
    return evidence_pb2.AttestationEvidence(
        body=body_bytes, signature=signature,
        certificate_chain=[c if isinstance(c, bytes) else c.public_bytes(Encoding.DER)
                           for c in chain])


def parse_evidence(data: bytes, *, source: str) -> tuple[evidence_pb2.AttestationEvidence,
                                                         evidence_pb2.ReportBody]:
    """Decode evidence and its body; FormatError if either is not what it should be."""
    if len(data) > MAX_EVIDENCE_BYTES:
        raise FormatError(source, "evidence is larger than 1 MiB")
    try:
        evidence = evidence_pb2.AttestationEvidence.FromString(data)
        body = evidence_pb2.ReportBody.FromString(evidence.body)
    except DecodeError:
        raise FormatError(source, "not attestation evidence (protobuf decode failed)") from None
    if not evidence.body or not evidence.signature or not evidence.certificate_chain:
        raise FormatError(source, "not attestation evidence (body, signature or chain missing)")
    return evidence, body


def verify_evidence(
    data: bytes,
    *,
    roots: Sequence[x509.Certificate],
    policy: TrustPolicy,
    request: bytes | None,
    source: str = "evidence",
    now: float | None = None,
    cache: ChainCache | None = None,
) -> VerifiedReport:
    """Check evidence end to end and return what it proves.

    ``request`` is the exact bytes sent to the card; None skips the freshness
    digest (file-level flows where the request is not at hand) and leaves
    freshness to ``policy.max_age``.
    Raises FormatError (malformed), AttestationError (chain, signature, nonce,
    age) or PolicyError (firmware, measurements, allow-list, KEM). ``cache``: chains
    verified before (the orchestrator's), so a card's chain is verified once.
    """
    current = time.time() if now is None else now
    evidence, body = parse_evidence(data, source=source)
    if body.report_version != REPORT_VERSION:
        raise FormatError(source, f"unsupported report version {body.report_version}")
    chain = cache.get(evidence.certificate_chain, roots, current) if cache else None
    if chain is None:
        chain = verified_chain(list(evidence.certificate_chain), roots, current, source)
        if cache is not None:
            cache.put(evidence.certificate_chain, roots, chain)
    try:
        chain.leaf_key.verify(evidence.signature, SIGNATURE_CONTEXT + evidence.body,
                              ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise AttestationError(f"{source}: report signature does not verify") from None
    cn = chain.common_name
    if cn is None or cn != body.card_id:
        raise AttestationError(f"{source}: report card id {body.card_id!r} is not the "
                               "certificate's")
    if chain.serial != body.serial:
        raise AttestationError(f"{source}: report serial is not the certificate's")
    if request is not None and body.request_digest != hashlib.sha256(request).digest():
        raise AttestationError(f"{source}: report does not answer our request (nonce mismatch: "
                               "replayed or forged)")
    if body.issued_at > current + policy.clock_skew:
        raise AttestationError(f"{source}: report is dated in the future")
    if current - body.issued_at > policy.max_age:
        raise AttestationError(f"{source}: report is {int(current - body.issued_at)} s old "
                               f"(limit {int(policy.max_age)} s)")
    kem = Kem.parse(body.session_kem)
    decode_session_public_key(kem, body.session_public_key)
    if len(body.session_id) != 16:
        raise FormatError(source, "session id must be 16 bytes")
    measurements = {m.name: m.digest for m in body.measurements}
    _check_policy(body, measurements, kem, policy, source)
    return VerifiedReport(
        card_id=body.card_id,
        serial=body.serial,
        sku=body.sku,
        firmware_version=body.firmware_version,
        measurements=measurements,
        boot_counter=body.boot_counter,
        session_id=body.session_id,
        kem=kem,
        session_public_key=body.session_public_key,
        issued_at=body.issued_at,
        root_fingerprint=chain.root_fingerprint,
        card_public_key=chain.card_public_key,
        loaded=HeldProgram(body.loaded.program_info_digest, body.loaded.model_id,
                           body.loaded.model_version, body.loaded.partition,
                           body.loaded.program_id) if body.HasField("loaded") else None,
    )


def _check_policy(
    body: evidence_pb2.ReportBody,
    measurements: Mapping[str, bytes],
    kem: Kem,
    policy: TrustPolicy,
    source: str,
) -> None:
    if policy.card_allowlist and body.card_id not in policy.card_allowlist:
        raise PolicyError(f"{source}: card {body.card_id!r} is not on the allow-list")
    if policy.allowed_firmware and body.firmware_version not in policy.allowed_firmware:
        raise PolicyError(f"{source}: firmware {body.firmware_version} is not allowed")
    if policy.min_firmware and (
        parse_version(body.firmware_version) < parse_version(policy.min_firmware)
    ):
        raise PolicyError(f"{source}: firmware {body.firmware_version} is older than "
                          f"{policy.min_firmware}")
    for name, allowed in policy.allowed_measurements.items():
        if measurements.get(name) not in allowed:
            raise PolicyError(f"{source}: measurement {name!r} is not an allowed value")
    if kem not in policy.allowed_kems:
        raise PolicyError(f"{source}: session KEM {kem.value} is not allowed by policy")


def sign_receipt(receipt: evidence_pb2.LoadReceipt,
                 key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    """Card side: the receipt bytes and their signature."""
    body = receipt.SerializeToString(deterministic=True)
    return body, key.sign(RECEIPT_CONTEXT + body, ec.ECDSA(hashes.SHA256()))


def verify_load_receipt(
    receipt: bytes, signature: bytes, *, report: VerifiedReport, program_info_digest: bytes,
    partition: int, source: str, key_slot: bytes,
) -> evidence_pb2.LoadReceipt:
    """Check that the card itself says it loaded exactly our program, in this session,
    with the key slot of this very load (``key_slot``: its key_slot_digest), and has
    decrypted and verified all of it (it can run it now).

    ``report`` is the verified attestation of the same card session. Raises
    AttestationError (bad signature, wrong card or session, not verified, a receipt
    of an earlier load replayed) or IntegrityError (another program or partition was
    loaded: a substituting host).
    """
    from orchestrator.errors import IntegrityError

    try:
        public = load_der_public_key(report.card_public_key)
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise AttestationError(f"{source}: card key is not ECDSA")
        public.verify(signature, RECEIPT_CONTEXT + receipt, ec.ECDSA(hashes.SHA256()))
        parsed = evidence_pb2.LoadReceipt.FromString(receipt)
    except (InvalidSignature, ValueError, DecodeError):
        raise AttestationError(f"{source}: load receipt is not signed by the card") from None
    if parsed.card_id != report.card_id or parsed.session_id != report.session_id:
        raise AttestationError(f"{source}: load receipt is for another card or session")
    if not parsed.verified:
        raise AttestationError(f"{source}: the card has not verified the program body "
                               "(its receipt does not say so)")
    if parsed.program_info_digest != program_info_digest or parsed.partition != partition:
        raise IntegrityError(f"{source}: the card loaded a different program (model "
                             f"{parsed.model_id!r} version {parsed.model_version}, partition "
                             f"{parsed.partition}) than the one requested: substituted by the "
                             "host")
    if parsed.key_slot_digest != key_slot:
        raise AttestationError(f"{source}: the load receipt answers another load (a key "
                               "slot not sent now): replayed by the host")
    return parsed
