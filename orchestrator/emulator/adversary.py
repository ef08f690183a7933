"""What a hostile emulated host does (docs/protocol.md, "Adversary modes"):
the modes, and the material it forges. Every mode must be caught end to end."""

from __future__ import annotations

import enum
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from orchestrator.qpc.container import Container, MemorySource


class Adversary(enum.Enum):
    """Attacks an untrusted host can mount; each must be caught end to end."""

    NONE = "none"
    SUBSTITUTE_KEY = "substitute-key"    # put the host's own key into reports
    REPLAY_REPORT = "replay-report"      # answer every request with an old report
    IGNORE_NONCE = "ignore-nonce"        # attest with the host's own request bytes
    RESET_STORM = "reset-storm"          # forge a flood of reset events
    SUPPRESS_RESETS = "suppress-resets"  # hide reset/offline/online events
    TAMPER_BODY = "tamper-body"          # flip a byte of the staged encrypted body
    SWAP_SLOTS = "swap-slots"            # give a card another card's key slot
    OLD_VERSION = "old-version"          # load an older staged program instead
    MALFORMED_CHAIN = "malformed-chain"  # put a certificate with a malformed extension in the chain
    GARBAGE = "garbage"                  # undefined enum values, cards it lacks, absurd counters
    REPLAY_RECEIPT = "replay-receipt"    # answer a load with a receipt saved from an earlier
                                         # load of the same session, without asking the card


def malformed_chain(key: ec.EllipticCurvePrivateKey, card_id: str) -> list[bytes]:
    """[leaf, CA], both the host's own: the leaf names the card and is signed by a
    "CA" whose basicConstraints extension is not DER, so cryptography raises
    ValueError the moment anyone reads that CA's extensions."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtensionOID, NameOID

    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not a vendor CA")])
    now = dt.datetime.now(dt.UTC)

    def build(subject: x509.Name) -> x509.CertificateBuilder:
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(days=1))
                .not_valid_after(now + dt.timedelta(days=1)))

    ca = build(ca_name).add_extension(x509.UnrecognizedExtension(
        ExtensionOID.BASIC_CONSTRAINTS, b"\x30\x03\x01\x01"), critical=True)
    leaf = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, card_id)]))
    return [cert.sign(key, hashes.SHA256()).public_bytes(Encoding.DER) for cert in (leaf, ca)]


def flip_middle(body: bytes) -> bytes:
    tampered = bytearray(body)
    tampered[len(tampered) // 2] ^= 0x01
    return bytes(tampered)


def slots_in(key_slots: Any, body: bytes) -> Any:
    from orchestrator.crypto.container import SealedContainer

    if key_slots is not None:
        return key_slots
    return SealedContainer(Container(MemorySource(body))).key_slots
