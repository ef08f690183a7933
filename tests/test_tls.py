"""TLS (server certificate) and mTLS (client certificate) between client and host."""

from __future__ import annotations

import datetime as dt
import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from orchestrator.agent.servicers import TLSServerConfig
from orchestrator.emulator.fleet import FleetConfig, run_fleet
from orchestrator.errors import UnreachableError
from orchestrator.transport.client import HostClient
from orchestrator.transport.types import TLSClientConfig


def _cert(name: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None, *,
          ca: bool = False, ip: str | None = None
          ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer[1].subject if issuer else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False)
    return key, builder.sign(issuer[0] if issuer else key, hashes.SHA256())


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki() -> dict[str, bytes]:
    ca = _cert("test ca", None, ca=True)
    server = _cert("host", ca, ip="127.0.0.1")
    client = _cert("orchestrator", ca)
    other_ca = _cert("other ca", None, ca=True)
    return {"ca": _cert_pem(ca[1]), "server_cert": _cert_pem(server[1]),
            "server_key": _pem(server[0]), "client_cert": _cert_pem(client[1]),
            "client_key": _pem(client[0]), "other_ca": _cert_pem(other_ca[1])}


async def test_tls_server_verified_by_ca(pki: dict[str, bytes]) -> None:
    tls = TLSServerConfig(pki["server_cert"], pki["server_key"])
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=1), tls=tls) as fleet:
        async with HostClient(fleet.addresses[0], tls=TLSClientConfig(pki["ca"])) as host:
            assert len(await host.list_devices()) == 1
        async with HostClient(fleet.addresses[0], tls=TLSClientConfig(pki["other_ca"])) as host:
            with pytest.raises(UnreachableError):
                await host.list_devices()
        async with HostClient(fleet.addresses[0]) as host:  # plaintext to a TLS port
            with pytest.raises(UnreachableError):
                await host.list_devices()


async def test_mtls_requires_a_client_certificate(pki: dict[str, bytes]) -> None:
    tls = TLSServerConfig(pki["server_cert"], pki["server_key"], client_ca_pem=pki["ca"])
    async with run_fleet(FleetConfig(hosts=1, devices_per_host=1), tls=tls) as fleet:
        mutual = TLSClientConfig(pki["ca"], pki["client_cert"], pki["client_key"])
        async with HostClient(fleet.addresses[0], tls=mutual) as host:
            assert len(await host.list_devices()) == 1
        async with HostClient(fleet.addresses[0], tls=TLSClientConfig(pki["ca"])) as host:
            with pytest.raises(UnreachableError):
                await host.list_devices()
