"""Certificate chains of card identities (docs/protocol.md): the vendor roots, a chain
verified up to one of them (CA constraints, path length, key usage, validity), and the
chains verified before (each card identity's chain is verified once)."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from orchestrator.errors import (
    AttestationError,
    FileInputError,
    FormatError,
    ModelIPError,
)

MAX_CHAIN = 4
MAX_ROOTS_BYTES = 1 << 20   # a file of vendor roots: a few certificates


def load_roots(pem_bytes: bytes, *, source: str) -> list[x509.Certificate]:
    """Trust roots from PEM; FormatError if there is no certificate in it."""
    try:
        roots = x509.load_pem_x509_certificates(pem_bytes)
    except ValueError:
        raise FormatError(source, "no PEM certificate in the trust root file") from None
    return roots


def load_roots_file(path: str) -> list[x509.Certificate]:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_ROOTS_BYTES)
    except FileNotFoundError:
        raise FileInputError(path, "trust root file not found") from None
    except OSError as exc:
        raise FileInputError(path, f"cannot read trust root: {exc.strerror}") from None
    return load_roots(data, source=path)


@dataclass(frozen=True, slots=True)
class VerifiedChain:
    """What a verified certificate chain vouches for, and while it does."""

    leaf_key: ec.EllipticCurvePublicKey
    card_public_key: bytes      # DER SubjectPublicKeyInfo
    common_name: str | None
    serial: str                 # hex
    root_fingerprint: str
    not_before: float           # the chain (root included) is valid between these
    not_after: float


class ChainCache:
    """Chains verified before, by the SHA-256 of their exact bytes and of the roots they
    were verified against: each card identity's chain is verified once, not at every
    attestation. Bounded (least recently used goes first); every use still checks
    the validity window against the current time (an expired chain is verified
    again, and fails as it should). A report's own signature, nonce, age and
    policy are checked every time."""

    def __init__(self, size: int = 16384) -> None:
        self.size = size
        self._chains: OrderedDict[bytes, VerifiedChain] = OrderedDict()
        self._roots: tuple[tuple[x509.Certificate, ...], bytes] = ((), b"")
        self.hits = 0
        self.misses = 0

    def _roots_digest(self, roots: Sequence[x509.Certificate]) -> bytes:
        known, digest = self._roots
        if len(known) != len(roots) or any(a is not b for a, b in zip(known, roots,
                                                                      strict=False)):
            digest = hashlib.sha256(b"".join(r.fingerprint(hashes.SHA256())
                                             for r in roots)).digest()
            self._roots = (tuple(roots), digest)
        return digest

    def _key(self, chain: Sequence[bytes], roots: Sequence[x509.Certificate]) -> bytes:
        digest = hashlib.sha256(self._roots_digest(roots))
        for der in chain:
            digest.update(len(der).to_bytes(4, "big"))
            digest.update(der)
        return digest.digest()

    def get(self, chain: Sequence[bytes], roots: Sequence[x509.Certificate], now: float
            ) -> VerifiedChain | None:
        key = self._key(chain, roots)
        found = self._chains.get(key)
        if found is None or not found.not_before <= now <= found.not_after:
            self.misses += 1
            return None
        self._chains.move_to_end(key)
        self.hits += 1
        return found

    def put(self, chain: Sequence[bytes], roots: Sequence[x509.Certificate],
            verified: VerifiedChain) -> None:
        self._chains[self._key(chain, roots)] = verified
        while len(self._chains) > self.size:
            self._chains.popitem(last=False)


def verified_chain(chain_der: list[bytes], roots: Sequence[x509.Certificate], now: float,
                   source: str) -> VerifiedChain:
    """What ``chain_der`` vouches for, verified up to one of ``roots`` at ``now``
    (AttestationError, naming ``source``, if it does not)."""
    leaf, root, chain = _verify_chain(chain_der, roots, now, source)
    with _hostile_certificates(source):
        public = leaf.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise AttestationError(f"{source}: card certificate key is not ECDSA")
        cn = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        name = cn[0].value if cn else None
        everything = [*chain, root]
        return VerifiedChain(
            public, public.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo),
            name if isinstance(name, str) else None, format(leaf.serial_number, "x"),
            root.fingerprint(hashes.SHA256()).hex()[:16],
            max(c.not_valid_before_utc for c in everything).timestamp(),
            min(c.not_valid_after_utc for c in everything).timestamp())


def _verify_chain(
    chain_der: list[bytes], roots: Sequence[x509.Certificate], now: float, source: str
) -> tuple[x509.Certificate, x509.Certificate, list[x509.Certificate]]:
    """Leaf, root and certificates of a chain that leads to a trusted root.

    Order matters: a host chooses every byte of the chain, and cryptography
    parses extensions lazily. The top certificate is first tied to a trusted
    root by signature, then each link downwards; only certificates whose
    signature is thus vouched for by the vendor are inspected further
    (validity, extensions). Any parsing failure is an AttestationError.
    """
    if len(chain_der) > MAX_CHAIN:
        raise AttestationError(f"{source}: certificate chain is longer than {MAX_CHAIN}")
    try:
        chain = [x509.load_der_x509_certificate(der) for der in chain_der]
    except ValueError:
        raise FormatError(source, "certificate chain holds a malformed certificate") from None
    moment = dt.datetime.fromtimestamp(now, tz=dt.UTC)
    with _hostile_certificates(source):
        root = _trusted_issuer(chain[-1], roots, moment, source)
        for parent, child in zip(chain[:0:-1], chain[-2::-1], strict=True):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature):
                raise AttestationError(f"{source}: certificate chain is broken") from None
        for cert in chain:
            if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
                subject = cert.subject.rfc4514_string()
                raise AttestationError(f"{source}: certificate {subject} is expired or not "
                                       "yet valid")
        # chain = [leaf, issuer, ..., top]: the certificate at index i issues i - 1 CAs
        # below it; the root issues every one in the chain but the leaf
        for below, parent in enumerate(chain[1:]):
            _require_ca(parent, source, below=below, anchor=False)
        if root != chain[-1]:  # the root itself was sent: checked above
            _require_ca(root, source, below=len(chain) - 1, anchor=True)
    return chain[0], root, chain


def _trusted_issuer(top: x509.Certificate, roots: Sequence[x509.Certificate],
                    moment: dt.datetime, source: str) -> x509.Certificate:
    for root in roots:
        if top == root:
            return root
        try:
            top.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        if root.not_valid_before_utc <= moment <= root.not_valid_after_utc:
            return root
    raise AttestationError(f"{source}: certificate chain does not lead to a trusted vendor root")


@contextlib.contextmanager
def _hostile_certificates(source: str) -> Iterator[None]:
    """Whatever a certificate's bytes make cryptography raise is an attestation failure."""
    try:
        yield
    except ModelIPError:
        raise
    except (ValueError, TypeError, OverflowError, UnsupportedAlgorithm,
            x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise AttestationError(f"{source}: malformed certificate in the chain "
                               f"({type(exc).__name__})") from None


def _require_ca(cert: x509.Certificate, source: str, *, below: int, anchor: bool) -> None:
    """An issuing certificate must be a CA (basicConstraints), allowed to have ``below``
    CAs under it (pathLenConstraint), and allowed to sign certificates (keyUsage
    keyCertSign; RFC 5280 4.2.1.3: a CA certificate carries keyUsage, though a
    configured root, the trust anchor, is taken without one)."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise AttestationError(f"{source}: an issuing certificate is not a CA")
    if constraints.path_length is not None and below > constraints.path_length:
        raise AttestationError(f"{source}: a CA issues {below} CA(s) below it, more than its "
                               f"path length constraint ({constraints.path_length}) allows")
    try:
        usage: x509.KeyUsage | None = cert.extensions.get_extension_for_class(
            x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if (usage is None and not anchor) or (usage is not None and not usage.key_cert_sign):
        raise AttestationError(f"{source}: an issuing certificate may not sign certificates "
                               "(keyUsage without keyCertSign)")
