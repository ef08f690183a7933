"""Where wrapped MEKs go, from the files a user names: ``--pub-keys`` evidence (verified
against a trust root) or, explicitly insecure, bare public keys."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from orchestrator.crypto.evidence import (
    TrustPolicy,
    load_roots_file,
    parse_evidence,
    verify_evidence,
)
from orchestrator.crypto.wrap import Kem, decode_session_public_key
from orchestrator.encrypt import SessionTarget, read_file
from orchestrator.errors import FormatError, UsageError

# File-level flows cannot check a nonce they never sent: a report may be at most
# this old (attest, then wrap within the day). The engine uses fresh nonces.
FILE_EVIDENCE_MAX_AGE = 24 * 3600.0


def load_session_targets(
    paths: Sequence[str], *, trust_root: str | None, insecure: bool,
    policy: TrustPolicy | None = None, warn: Any = None,
) -> list[SessionTarget]:
    """Turn ``--pub-keys`` files into wrap targets, verifying evidence first.

    Evidence is verified against ``trust_root``; bare public keys (and evidence
    without a trust root) are refused unless ``insecure``. Raises the
    verifier's errors, FormatError or UsageError.
    """
    if not paths:
        raise UsageError("--pub-keys: at least one evidence file is needed")
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
            raise UsageError("--trust-root is required to verify evidence before wrapping "
                             "(or --insecure-unverified-key)")
    return targets


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
