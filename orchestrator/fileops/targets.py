"""Where wrapped MEKs go, from the files a user names: ``--pub-keys`` evidence (verified
against a trust root) or, explicitly insecure, bare public keys."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from orchestrator.crypto.chain import load_roots_file
from orchestrator.crypto.evidence import TrustPolicy, parse_evidence, verify_evidence
from orchestrator.crypto.wrap import Kem, decode_session_public_key
from orchestrator.errors import FormatError, UsageError
from orchestrator.fileops.encrypt import SessionTarget, read_file
from orchestrator.trustconfig import configured_trust_root, no_trust_root_problem

# File-level flows cannot check a nonce they never sent: a report may be at most
# this old (attest, then wrap within the day). The engine uses fresh nonces.
FILE_EVIDENCE_MAX_AGE = 24 * 3600.0


def load_session_targets(
    paths: Sequence[str], *, trust_root: str | None, insecure: bool,
    policy: TrustPolicy | None = None, warn: Any = None,
) -> list[SessionTarget]:
    """Turn ``--pub-keys`` files into wrap targets, verifying evidence first.

    Evidence is verified against ``trust_root`` (or the configured root,
    trustconfig.py); bare public keys (and evidence without a trust root) are
    refused unless ``insecure``. Raises the verifier's errors, FormatError or
    UsageError.
    """
    if not paths:
        raise UsageError("--pub-keys: at least one evidence file is needed")
    trust_root = configured_trust_root(trust_root)
    roots = load_roots_file(trust_root) if trust_root else None
    policy = policy or TrustPolicy(max_age=FILE_EVIDENCE_MAX_AGE)
    targets = []
    for path in paths:
        data = read_file(path, "evidence file")
        try:
            _, body = parse_evidence(data, source=path)
        except FormatError:
            bare = _parse_bare_key(data)
            if bare is None:
                raise
            if not insecure:
                raise UsageError(f"{path}: is a bare public key, not attestation evidence; "
                                 "refusing to wrap without --insecure-unverified-key") from None
            if warn:
                warn(f"WARNING: {path}: wrapping to an UNVERIFIED bare key; no card "
                     "identity or session is bound")
            targets.append(SessionTarget("", b"", Kem.P256, bare, False, path))
            continue
        if roots is not None:
            report = verify_evidence(data, roots=roots, policy=policy, request=None, source=path)
            targets.append(SessionTarget.from_report(report, path))
        elif insecure:
            if warn:
                warn(f"WARNING: {path}: evidence NOT verified (no --trust-root); wrapping to "
                     "an unverified key")
            kem = Kem.parse(body.session_kem)
            decode_session_public_key(kem, body.session_public_key)
            targets.append(SessionTarget(body.card_id, body.session_id, kem,
                                         body.session_public_key, False, path,
                                         body.boot_counter))
        else:
            raise UsageError(no_trust_root_problem())
    _refuse_repeated_keys(targets)
    return targets


def _refuse_repeated_keys(targets: Sequence[SessionTarget]) -> None:
    """One card session is one slot: the same key twice is a mistake (a file named
    twice, or copied), never a second card."""
    first: dict[bytes, str] = {}
    for target in targets:
        if target.public_key in first:
            raise UsageError(f"--pub-keys: {target.source} holds the same session key as "
                             f"{first[target.public_key]} (one card session per slot)")
        first[target.public_key] = target.source


# The report binds SHA-256 of the request: fewer unpredictable bytes than this and
# a host could have asked the card for the same report earlier (no freshness).
MIN_REQUEST_BYTES = 16


def read_request(path: str | None) -> bytes:
    """An attestation request: the file's bytes (at least MIN_REQUEST_BYTES), or 32
    fresh random bytes. Raises FileInputError or UsageError."""
    if not path:
        return os.urandom(32)
    request = read_file(path, "request file")
    if len(request) < MIN_REQUEST_BYTES:
        raise UsageError(f"-i {path}: {len(request)} bytes cannot make the report fresh; a "
                         f"request needs at least {MIN_REQUEST_BYTES} unpredictable bytes "
                         "(without -i: 32 random bytes)")
    return request


def _parse_bare_key(data: bytes) -> bytes | None:
    try:
        key = serialization.load_pem_public_key(data)
        if isinstance(key, ec.EllipticCurvePublicKey):
            return key.public_bytes(serialization.Encoding.X962,
                                    serialization.PublicFormat.UncompressedPoint)
    except (ValueError, TypeError):
        pass
    if len(data) == 65 and data[0] == 4:
        try:
            decode_session_public_key(Kem.P256, data)
            return data
        except FormatError:
            return None
    return None
