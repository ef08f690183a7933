"""The security review's findings, each staged for real (docs/security.md): a hostile
host's text never drives the operator's terminal."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from orchestrator._proto.modelip.v1 import runtime_pb2, runtime_pb2_grpc
from tests.models import tiny_mlp

MODELIP = [sys.executable, "-m", "orchestrator"]
# set the window title, turn text red, write the clipboard (OSC 52), ring the bell
HOSTILE = "\x1b]0;pwned\x07\x1b[31mred\x1b]52;c;ZWNobyBwd25lZA==\x07\x9b2J\u202eevil"


class EscapingHost(runtime_pb2_grpc.DeviceRuntimeServicer):  # type: ignore[misc]
    """A host that answers with terminal escape sequences wherever it can put text."""

    def ListDevices(self, request: Any, context: Any) -> Any:  # noqa: N802
        return runtime_pb2.ListDevicesResponse(devices=[runtime_pb2.DeviceInfo(
            device=0, card_id=HOSTILE, state=runtime_pb2.DEVICE_STATE_LOADED, boot_counter=1,
            program_id=HOSTILE, session_id=b"\x01" * 8)])

    def WatchEvents(self, request: Any, context: Any) -> Any:  # noqa: N802
        time.sleep(30)
        return iter(())

    def StageProgram(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
        for _ in request_iterator:
            break
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, HOSTILE)

    def ResetDevice(self, request: Any, context: Any) -> Any:  # noqa: N802
        context.abort(grpc.StatusCode.INTERNAL, HOSTILE)


@pytest.fixture
def escaping_host() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    runtime_pb2_grpc.add_DeviceRuntimeServicer_to_server(EscapingHost(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0)


def _no_escapes(text: str) -> None:
    for control in ("\x1b", "\x07", "\x9b", "\u202e"):
        assert control not in text, repr(text[:300])


def test_a_hosts_escape_sequences_never_reach_the_terminal(escaping_host: int,
                                                           tmp_path: Path) -> None:
    listed = subprocess.run([*MODELIP, "device", "list", "--ip", "127.0.0.1", "--port",
                             str(escaping_host)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert listed.returncode == 0, listed.stderr
    _no_escapes(listed.stdout + listed.stderr)
    assert "\\x1b]0;pwned\\x07" in listed.stdout            # shown, inert
    refused = subprocess.run([*MODELIP, "device", "reset", "--ip", "127.0.0.1", "--port",
                              str(escaping_host), "-d", "0"], capture_output=True, text=True,
                             timeout=60, check=False)
    assert refused.returncode == 4
    _no_escapes(refused.stderr)
    assert "\\x1b[31mred" in refused.stderr
    # the engine's path: the host's refusal becomes the host's and its card's reason,
    # journaled, summarised and shown by `status`
    (tmp_path / "tiny.onnx").write_bytes(tiny_mlp().SerializeToString())
    (tmp_path / "root.pem").write_bytes(_a_root())
    plan = tmp_path / "plan.yaml"
    plan.write_text(f"model: {{onnx: tiny.onnx}}\nmek: {{generate: true}}\n"
                    f"fleet: {{hosts: [{{address: '127.0.0.1:{escaping_host}', devices: [0]}}]}}\n"
                    "trust: {roots: [root.pem]}\nretry: {attempts: 1, backoff: 0.05}\n"
                    "state_dir: state\n")
    deployed = subprocess.run([*MODELIP, "deploy", str(plan), "--plain"], capture_output=True,
                              text=True, timeout=120, check=False)
    assert deployed.returncode == 4, deployed.stdout[-2000:] + deployed.stderr
    _no_escapes(deployed.stdout + deployed.stderr)
    assert "REFUSING" in deployed.stdout and "\\x1b]52;c;" in deployed.stdout
    status = subprocess.run([*MODELIP, "status", str(plan), "--cards"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert status.returncode == 0, status.stderr
    _no_escapes(status.stdout + status.stderr)


def _a_root() -> bytes:
    from orchestrator.emulator.pki import VendorPKI

    return VendorPKI.create().root_pem


def _flooding_host(listing: bytes) -> grpc.Server:
    """A host whose ListDevices answers ``listing``, raw bytes on the wire."""
    handler = grpc.method_handlers_generic_handler("modelip.v1.DeviceRuntime", {
        "ListDevices": grpc.unary_unary_rpc_method_handler(
            lambda request, context: listing, request_deserializer=None,
            response_serializer=None)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    return server


@pytest.mark.parametrize(("entries", "refused"), [
    (5_000_000, "RESOURCE_EXHAUSTED"),  # 10 MB: past what a listing may carry, never parsed
    (400_000, "lists 400000 cards, more than a host may have"),  # 800 KB: counted first
])
def test_a_flood_of_listed_cards_costs_the_client_nothing(entries: int, refused: str) -> None:
    """Empty DeviceInfo entries are two bytes each on the wire and a Python object each
    once parsed: 5,000,000 of them took `device list` to 1.09 GB. The answer is capped
    by call before parsing, and a listing longer than a host may have is refused
    before one object is made per entry."""
    server = _flooding_host(b"\x0a\x00" * entries)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        probe = ("import resource, subprocess, sys; "
                 "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
                 "print(r.returncode); print(r.stderr.strip()); "
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        result = subprocess.run([sys.executable, "-c", probe, *MODELIP, "device", "list",
                                 "--ip", "127.0.0.1", "--port", str(port)],
                                capture_output=True, text=True, timeout=120, check=True)
    finally:
        server.stop(0)
    code, said, peak_kib = result.stdout.strip().splitlines()
    assert code == "4", said
    assert refused in said, said
    assert int(peak_kib) < 250 * 1024, f"peak RSS {int(peak_kib) // 1024} MiB"


def _ca(name: str, key: Any, issuer: Any, issuer_key: Any, *, path_length: int | None,
        cert_sign: bool | None) -> Any:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer.subject if issuer is not None else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1))
               .not_valid_after(now + dt.timedelta(days=30))
               .add_extension(x509.BasicConstraints(ca=True, path_length=path_length),
                              critical=True))
    if cert_sign is not None:
        builder = builder.add_extension(x509.KeyUsage(
            False, False, False, False, False, cert_sign, True, False, False), critical=True)
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.mark.parametrize(("root_path_length", "sub_cert_sign", "refused"), [
    (1, True, None),                                     # a proper sub-CA: accepted
    (0, True, "more than its path length constraint"),   # the root allows no sub-CA
    (1, False, "may not sign certificates"),             # keyUsage without keyCertSign
    (1, None, "may not sign certificates"),              # a CA without keyUsage
])
def test_a_chain_is_held_to_path_length_and_key_usage(root_path_length: int,
                                                      sub_cert_sign: bool | None,
                                                      refused: str | None) -> None:
    """A "sub-CA" the vendor root did not allow signs a card certificate of its own: the
    card's report must not verify (the review's finding: it did)."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from orchestrator.crypto.evidence import TrustPolicy, verify_evidence
    from orchestrator.emulator.card import CardConfig, EmulatedCard
    from orchestrator.emulator.pki import CardIdentity
    from orchestrator.errors import AttestationError

    root_key, sub_key, card_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _ca("vendor root", root_key, None, None, path_length=root_path_length,
               cert_sign=True)
    sub = _ca("a sub-CA", sub_key, root, root_key, path_length=0, cert_sign=sub_cert_sign)
    now = dt.datetime.now(dt.UTC)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "card-9")]))
            .issuer_name(sub.subject).public_key(card_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(sub_key, hashes.SHA256()))
    card = EmulatedCard(CardIdentity("card-9", card_key, (leaf, sub)), CardConfig())
    evidence = card.attest(b"q" * 32)
    if refused is None:
        report = verify_evidence(evidence, roots=[root], policy=TrustPolicy(),
                                 request=b"q" * 32)
        assert report.card_id == "card-9"
        return
    with pytest.raises(AttestationError, match=refused):
        verify_evidence(evidence, roots=[root], policy=TrustPolicy(), request=b"q" * 32)
