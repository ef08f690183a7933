"""MEK wrapping to a card's session key with HPKE (RFC 9180), docs/formats.md.

The HPKE ``info`` binds the format version, the KEM, the slot number, the card
identity, the session id and the program (the SHA-256 of its encryption info),
so a wrapped MEK opens on no other card, in no other slot (MDP: partition), not
after the card's next boot, and for no other program sealed under the same MEK
(an older version, say).
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from orchestrator.crypto.mek import MEK, MEK_BYTES
from orchestrator.errors import FormatError, IntegrityError, SessionInvalidError

WRAP_FORMAT_VERSION = 2
PROGRAM_DIGEST_BYTES = 32
# The reference tool's wrap-mek names no program: such a slot is bound to card,
# session and slot, and to this marker instead of a program (docs/protocol.md says
# what that leaves a hostile host). The engine always binds its slots.
UNBOUND_PROGRAM = bytes(PROGRAM_DIGEST_BYTES)
_MLKEM768_PUBLIC = 1184
_X25519_PUBLIC = 32


class Kem(enum.Enum):
    """Session KEMs a card may offer."""

    P256 = "P256"
    MLKEM768_X25519 = "MLKEM768_X25519"

    @classmethod
    def parse(cls, name: str) -> Kem:
        aliases = {"p256": cls.P256, "hybrid": cls.MLKEM768_X25519}
        try:
            return aliases.get(name.lower()) or cls(name)
        except ValueError:
            raise FormatError("KEM", f"unknown KEM {name!r} (P256 or MLKEM768_X25519)") from None

    @property
    def suite(self) -> hpke.Suite:
        kem = hpke.KEM.P256 if self is Kem.P256 else hpke.KEM.MLKEM768_X25519
        return hpke.Suite(kem, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_128_GCM)

    @property
    def enc_bytes(self) -> int:
        """Length of the HPKE encapsulated key for this KEM."""
        return 65 if self is Kem.P256 else 1088 + 32


SessionPrivateKey = ec.EllipticCurvePrivateKey | hpke.MLKEM768X25519PrivateKey
SessionPublicKey = ec.EllipticCurvePublicKey | hpke.MLKEM768X25519PublicKey


@dataclass(frozen=True, slots=True, repr=False)
class SessionKeyPair:
    """A card's session key pair for one boot. ``repr`` shows only the public part."""

    kem: Kem
    private: SessionPrivateKey
    public_raw: bytes
    secret: bytes  # the private key's own bytes, for the card's persistent store only

    def __repr__(self) -> str:
        return f"SessionKeyPair({self.kem.value}, public={self.public_raw[:8].hex()}...)"

    @classmethod
    def generate(cls, kem: Kem) -> SessionKeyPair:
        if kem is Kem.P256:   # (not from_secret: its public key is computed once, here)
            private = ec.generate_private_key(ec.SECP256R1())
            return cls(kem, private, private.public_key().public_bytes(
                Encoding.X962, PublicFormat.UncompressedPoint),
                private.private_numbers().private_value.to_bytes(32, "big"))
        pq = mlkem.MLKEM768PrivateKey.generate()
        classic = x25519.X25519PrivateKey.generate()
        return cls.from_secret(kem, pq.private_bytes_raw() + classic.private_bytes_raw())

    @classmethod
    def from_secret(cls, kem: Kem, secret: bytes) -> SessionKeyPair:
        """Rebuild a key pair from ``secret``; FormatError if it is not one."""
        try:
            if kem is Kem.P256:
                ec_private = ec.derive_private_key(int.from_bytes(secret, "big"), ec.SECP256R1())
                raw = ec_private.public_key().public_bytes(
                    Encoding.X962, PublicFormat.UncompressedPoint)
                return cls(kem, ec_private, raw, secret)
            pq = mlkem.MLKEM768PrivateKey.from_seed_bytes(secret[:64])
            classic = x25519.X25519PrivateKey.from_private_bytes(secret[64:])
        except ValueError:
            raise FormatError("session key", f"not a valid {kem.value} private key") from None
        raw = pq.public_key().public_bytes_raw() + classic.public_key().public_bytes_raw()
        return cls(kem, hpke.MLKEM768X25519PrivateKey(pq, classic), raw, secret)


def decode_session_public_key(kem: Kem, raw: bytes) -> SessionPublicKey:
    """Parse raw session public key bytes; FormatError if they are not a valid key."""
    try:
        if kem is Kem.P256:
            return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
        if len(raw) != _MLKEM768_PUBLIC + _X25519_PUBLIC:
            raise ValueError("wrong length")
        return hpke.MLKEM768X25519PublicKey(
            mlkem.MLKEM768PublicKey.from_public_bytes(raw[:_MLKEM768_PUBLIC]),
            x25519.X25519PublicKey.from_public_bytes(raw[_MLKEM768_PUBLIC:]),
        )
    except ValueError:
        raise FormatError("session public key", f"not a valid {kem.value} public key") from None


def wrap_info(kem: Kem, slot: int, card_id: str, session_id: bytes, program: bytes) -> bytes:
    """The HPKE info string: what a wrapped MEK is bound to.

    ``program`` is the SHA-256 of the program's (top-level) encryption info.
    """
    card = card_id.encode("utf-8")
    return (
        b"modelip/v1 mek wrap\0"
        + struct.pack(">HI", WRAP_FORMAT_VERSION, slot)
        + kem.value.encode("ascii") + b"\0"
        + struct.pack(">H", len(card)) + card
        + struct.pack(">H", len(session_id)) + session_id
        + struct.pack(">H", len(program)) + program
    )


@dataclass(frozen=True, slots=True)
class KeySlot:
    """One wrapped MEK: for slot ``slot`` of one program, on one card's session.

    ``program`` is a label (the digest the wrap was made for); the card binds
    the digest of the program it is loading, never this field.
    """

    slot: int
    card_id: str
    session_id: bytes
    kem: Kem
    enc: bytes
    wrapped_mek: bytes
    program: bytes

    @property
    def bound(self) -> bool:
        """Made for one program (not UNBOUND_PROGRAM)."""
        return self.program != UNBOUND_PROGRAM

    def info(self) -> bytes:
        return wrap_info(self.kem, self.slot, self.card_id, self.session_id, self.program)


def key_slot_digest(slot: KeySlot) -> bytes:
    """What a load receipt binds of the slot the card opened: SHA-256 of its HPKE
    ``enc`` and wrapped MEK (fresh at every wrap: a receipt cannot answer a later load)."""
    return hashlib.sha256(b"modelip/v1 key slot\0" + slot.enc + slot.wrapped_mek).digest()


def wrap_mek(
    mek: MEK, *, slot: int, card_id: str, session_id: bytes, kem: Kem, public_key: bytes,
    program: bytes,
) -> KeySlot:
    """Wrap ``mek`` to a card's session public key (raw bytes) for ``slot`` of ``program``
    (the SHA-256 of the program's encryption info, or UNBOUND_PROGRAM)."""
    if len(program) != PROGRAM_DIGEST_BYTES:
        raise ValueError("program must be the 32-byte digest of an encryption info")
    recipient = decode_session_public_key(kem, public_key)
    info = wrap_info(kem, slot, card_id, session_id, program)
    sealed = kem.suite.encrypt(mek.key, recipient, info=info)
    enc, wrapped = sealed[: kem.enc_bytes], sealed[kem.enc_bytes :]
    return KeySlot(slot, card_id, session_id, kem, enc, wrapped, program)


def unwrap_mek(
    key_slot: KeySlot, private_key: SessionPrivateKey, *, card_id: str, session_id: bytes,
    program: bytes,
) -> MEK:
    """Open a key slot with a card's session private key (card side).

    ``program`` is the digest of the encryption info the card is loading,
    computed by the card. A slot made for no program (UNBOUND_PROGRAM) opens for
    any program under its MEK; the card's policy checks (rollback floor, expiry,
    firmware) still apply. Raises SessionInvalidError if the slot names another
    card or session, IntegrityError if it was made for another program, was
    altered or moved to another slot.
    """
    if key_slot.bound and key_slot.program != program:
        raise IntegrityError(f"key slot {key_slot.slot} was made for another program "
                             f"({key_slot.program.hex()[:16]}), not the one being loaded "
                             f"({program.hex()[:16]})")
    if key_slot.card_id != card_id:
        raise SessionInvalidError(f"key slot {key_slot.slot} is for card {key_slot.card_id!r}")
    if key_slot.session_id != session_id:
        raise SessionInvalidError(
            f"key slot {key_slot.slot} is for session {key_slot.session_id.hex()[:16]}, "
            f"not the card's current session {session_id.hex()[:16]} (stale after a reset?)"
        )
    if len(key_slot.enc) != key_slot.kem.enc_bytes:
        raise IntegrityError(f"key slot {key_slot.slot}: encapsulated key has the wrong length")
    try:
        key = key_slot.kem.suite.decrypt(
            key_slot.enc + key_slot.wrapped_mek, private_key,
            info=wrap_info(key_slot.kem, key_slot.slot, card_id, session_id,
                           program if key_slot.bound else UNBOUND_PROGRAM),
        )
    except (InvalidTag, ValueError, TypeError):
        raise IntegrityError(
            f"key slot {key_slot.slot}: wrapped MEK does not open (altered, or moved from "
            "another card, session, slot or program)"
        ) from None
    if len(key) != MEK_BYTES:
        raise IntegrityError(f"key slot {key_slot.slot}: wrapped key is not a 128-bit MEK")
    return MEK(key)
