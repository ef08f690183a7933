"""The emulated card vendor's PKI: a root CA that certifies card identities."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator.atomicfile import write_bytes_atomic
from orchestrator.errors import FileInputError, FormatError

ROOT_CERT = "root.pem"
ROOT_KEY = "root.key"


@dataclass(frozen=True, slots=True, repr=False)
class CardIdentity:
    """A card's long-term identity: its key lives only inside the card object."""

    card_id: str
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]  # card certificate first

    @property
    def serial(self) -> str:
        return format(self.chain[0].serial_number, "x")

    def __repr__(self) -> str:
        return f"CardIdentity({self.card_id!r}, serial={self.serial})"


class VendorPKI:
    """Root key and certificate; issues card certificates."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self.root = cert

    def __repr__(self) -> str:
        return f"VendorPKI(root={self.root.subject.rfc4514_string()})"

    @classmethod
    def create(cls, *, name: str = "modelip emulated card vendor root") -> VendorPKI:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    def save(self, directory: str | Path) -> Path:
        """Write root.pem and root.key (0600) into ``directory`` (created if needed)."""
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        key_pem = self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_bytes_atomic(target / ROOT_KEY, key_pem, mode=0o600, overwrite=True)
        write_bytes_atomic(target / ROOT_CERT, self.root_pem, overwrite=True)
        return target / ROOT_CERT

    @classmethod
    def load(cls, directory: str | Path) -> VendorPKI:
        target = Path(directory)
        try:
            key = serialization.load_pem_private_key((target / ROOT_KEY).read_bytes(), None)
            cert = x509.load_pem_x509_certificate((target / ROOT_CERT).read_bytes())
        except FileNotFoundError as exc:
            raise FileInputError(exc.filename, "not found (run `modelip pki init`)") from None
        except ValueError:
            raise FormatError(str(target), "not an emulated vendor PKI directory") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise FormatError(str(target / ROOT_KEY), "root key is not an EC key")
        return cls(key, cert)

    @classmethod
    def load_or_create(cls, directory: str | Path) -> VendorPKI:
        if (Path(directory) / ROOT_KEY).exists():
            return cls.load(directory)
        pki = cls.create()
        pki.save(directory)
        return pki

    def issue_card(self, card_id: str, *, valid_days: float = 3650,
                   not_before: dt.datetime | None = None) -> CardIdentity:
        """A new card identity; ``valid_days`` may be negative for expired certs in tests."""
        key = ec.generate_private_key(ec.SECP256R1())
        start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
        end = start + dt.timedelta(days=valid_days)
        if end <= start:
            start = end - dt.timedelta(days=1)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, card_id)]))
            .issuer_name(self.root.subject)
            .public_key(key.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(15), "big") | 1)
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        return CardIdentity(card_id, key, (cert,))
