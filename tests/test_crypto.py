"""Streamed AEAD, MEK wrapping and evidence verification, each attacked."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from orchestrator._proto.modelip.v1 import evidence_pb2
from orchestrator.crypto import stream
from orchestrator.crypto.chain import ChainCache
from orchestrator.crypto.evidence import TrustPolicy, sign_report, verify_evidence
from orchestrator.crypto.mek import MEK, load_mek, write_mek
from orchestrator.crypto.wrap import Kem, KeySlot, SessionKeyPair, unwrap_mek, wrap_mek
from orchestrator.emulator.pki import VendorPKI
from orchestrator.errors import (
    AttestationError,
    FileInputError,
    IntegrityError,
    MEKError,
    PolicyError,
    SessionInvalidError,
)

CHUNK = 1024


def _encrypt(mek: MEK, data: bytes, *, index: int = 0) -> tuple[list[bytes], bytes]:
    aead = stream.derive_content_key(mek, b"s" * 32, "model")
    aad = stream.chunk_aad(b"d" * 32, "network.elf")
    pieces = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)]
    return list(stream.encrypt_stream(aead, index, aad, pieces, len(data), CHUNK)), aad


def _decrypt(mek: MEK, chunks: list[bytes], size: int, aad: bytes, *, index: int = 0) -> bytes:
    aead = stream.derive_content_key(mek, b"s" * 32, "model")
    return b"".join(stream.decrypt_stream(aead, index, aad, chunks, size, CHUNK,
                                          segment_name="network.elf"))


@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1, 5 * CHUNK])
def test_stream_round_trip_and_sizes(mek: MEK, size: int) -> None:
    data = os.urandom(size)
    chunks, aad = _encrypt(mek, data)
    assert sum(map(len, chunks)) == stream.ciphertext_size(size, CHUNK)
    assert _decrypt(mek, chunks, size, aad) == data


def test_stream_detects_truncation_reordering_swaps_and_flips(mek: MEK) -> None:
    data = os.urandom(4 * CHUNK)
    chunks, aad = _encrypt(mek, data)
    with pytest.raises(IntegrityError, match="truncated"):
        _decrypt(mek, chunks[:-1], len(data), aad)
    with pytest.raises(IntegrityError, match="chunk 2 failed"):
        # dropping the real last chunk and declaring a shorter size: the new
        # "last" chunk was not sealed as last
        _decrypt(mek, chunks[:3], 3 * CHUNK, aad)
    with pytest.raises(IntegrityError, match="chunk 0 failed"):
        _decrypt(mek, [chunks[1], chunks[0], *chunks[2:]], len(data), aad)
    flipped = bytearray(chunks[1])
    flipped[5] ^= 1
    with pytest.raises(IntegrityError, match="chunk 1 failed"):
        _decrypt(mek, [chunks[0], bytes(flipped), *chunks[2:]], len(data), aad)
    other, _ = _encrypt(mek, data, index=1)  # same key, another segment's chunks
    with pytest.raises(IntegrityError, match="chunk 0 failed"):
        _decrypt(mek, other, len(data), aad)
    with pytest.raises(IntegrityError):
        _decrypt(mek, chunks, len(data), stream.chunk_aad(b"e" * 32, "network.elf"))


def test_mek_file_rules(tmp_path: Path) -> None:
    path = tmp_path / "mek.dat"
    key = MEK.generate()
    write_mek(path, key)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_mek(path).key == key.key
    with pytest.raises(FileInputError, match="refusing to overwrite"):
        write_mek(path, MEK.generate())
    hex_path = tmp_path / "mek.hex"
    hex_path.write_text("0x" + key.key.hex().upper() + "\n")
    assert load_mek(hex_path).key == key.key
    for bad in (b"", b"x" * 15, b"x" * 17, b"z" * 32, b"x" * 32 + b"\n" * 3):
        (tmp_path / "bad").write_bytes(bad)
        with pytest.raises(MEKError, match="128 bits"):
            load_mek(tmp_path / "bad")
    with pytest.raises(FileInputError, match="not found"):
        load_mek(tmp_path / "missing")
    assert key.key.hex() not in repr(key) and key.key.hex() not in str(key)


@pytest.mark.parametrize("kem", list(Kem))
def test_a_session_key_pair_is_rebuilt_from_its_secret(mek: MEK, kem: Kem) -> None:
    """A card's persistent store keeps only the secret: the pair rebuilt from it is the
    same pair (its public key, and it opens what was wrapped to the generated one)."""
    pair = SessionKeyPair.generate(kem)
    rebuilt = SessionKeyPair.from_secret(kem, pair.secret)
    assert rebuilt.public_raw == pair.public_raw
    slot = wrap_mek(mek, slot=0, card_id="c", session_id=bytes(16), kem=kem,
                    public_key=pair.public_raw, program=bytes(range(32)))
    assert unwrap_mek(slot, rebuilt.private, card_id="c", session_id=bytes(16),
                      program=bytes(range(32))).key == mek.key


@pytest.mark.parametrize("kem", list(Kem))
def test_wrapped_mek_is_bound_to_card_session_slot_and_program(mek: MEK, kem: Kem) -> None:
    pair = SessionKeyPair.generate(kem)
    session = os.urandom(16)
    program, older = os.urandom(32), os.urandom(32)
    slot = wrap_mek(mek, slot=2, card_id="card-7", session_id=session, kem=kem,
                    public_key=pair.public_raw, program=program)

    def unwrap(key_slot: KeySlot, *, card: str = "card-7", session_id: bytes = session,
               opens: bytes = program) -> MEK:
        return unwrap_mek(key_slot, pair.private, card_id=card, session_id=session_id,
                          program=opens)

    assert unwrap(slot).key == mek.key
    with pytest.raises(SessionInvalidError, match="is for card"):
        unwrap(slot, card="card-8")
    with pytest.raises(SessionInvalidError, match="earlier session|not the card's"):
        unwrap(slot, session_id=os.urandom(16))
    from dataclasses import replace

    with pytest.raises(IntegrityError, match="does not open"):
        unwrap(replace(slot, slot=3))
    forged = replace(slot, card_id="card-8")  # relabelled for another card: info differs
    with pytest.raises(IntegrityError, match="does not open"):
        unwrap(forged, card="card-8")
    # another program sealed under the same MEK (an older version): the card binds the
    # digest of what it is loading, so neither the label nor a relabelling helps
    with pytest.raises(IntegrityError, match="made for another program"):
        unwrap(slot, opens=older)
    with pytest.raises(IntegrityError, match="does not open"):
        unwrap(replace(slot, program=older), opens=older)
    flipped = bytearray(slot.wrapped_mek)
    flipped[0] ^= 1
    with pytest.raises(IntegrityError):
        unwrap(replace(slot, wrapped_mek=bytes(flipped)))
    other = SessionKeyPair.generate(kem)  # after a reset: same ids, new key
    with pytest.raises(IntegrityError):
        unwrap_mek(slot, other.private, card_id="card-7", session_id=session, program=program)


# --- evidence ---------------------------------------------------------------------------


def test_genuine_evidence_verifies(make_card, pki: VendorPKI) -> None:  # type: ignore[no-untyped-def]
    card = make_card("card-1")
    request = os.urandom(32)
    report = verify_evidence(card.attest(request), roots=[pki.root], policy=TrustPolicy(),
                             request=request)
    assert report.card_id == "card-1"
    assert report.session_public_key == card.session_public_key
    assert report.boot_counter == card.boot_counter


@pytest.mark.parametrize("cached", [False, True])
def test_evidence_failures_each_have_their_own_error(make_card, pki: VendorPKI,  # type: ignore[no-untyped-def]
                                                     cached: bool) -> None:
    card = make_card("card-1")
    request = os.urandom(32)
    evidence = card.attest(request)
    cache = ChainCache() if cached else None
    if cache is not None:  # the genuine chain is known: every other check still holds
        verify_evidence(evidence, roots=[pki.root], policy=TrustPolicy(), request=request,
                        cache=cache)

    def check(data: bytes, *, roots=None, policy=None, req=request, now=None):  # type: ignore[no-untyped-def]
        return verify_evidence(data, roots=roots or [pki.root], policy=policy or TrustPolicy(),
                               request=req, now=now, cache=cache)

    with pytest.raises(AttestationError, match="nonce mismatch"):
        check(evidence, req=os.urandom(32))
    with pytest.raises(AttestationError, match="trusted vendor root"):
        check(evidence, roots=[VendorPKI.create().root])
    with pytest.raises(AttestationError, match="signature does not verify"):
        parsed = evidence_pb2.AttestationEvidence.FromString(evidence)
        body = evidence_pb2.ReportBody.FromString(parsed.body)
        body.session_public_key = SessionKeyPair.generate(Kem.P256).public_raw  # host swaps key
        parsed.body = body.SerializeToString()
        check(parsed.SerializeToString())
    with pytest.raises(AttestationError, match="s old"):
        check(evidence, now=time.time() + 3600)
    with pytest.raises(PolicyError, match="firmware 1.12.0 is not allowed"):
        check(evidence, policy=TrustPolicy(allowed_firmware=frozenset({"2.0.0"})))
    with pytest.raises(PolicyError, match="older than"):
        check(evidence, policy=TrustPolicy(min_firmware="1.13"))
    with pytest.raises(PolicyError, match="allow-list"):
        check(evidence, policy=TrustPolicy(card_allowlist=frozenset({"card-2"})))
    with pytest.raises(PolicyError, match="measurement"):
        check(evidence, policy=TrustPolicy(
            allowed_measurements={"firmware": frozenset({hashlib.sha256(b"x").digest()})}))


def test_a_chain_is_verified_once_and_only_while_it_is_valid(make_card, pki: VendorPKI  # type: ignore[no-untyped-def]
                                                             ) -> None:
    card = make_card("card-1")
    cache = ChainCache(size=2)
    policy = TrustPolicy(max_age=10 ** 9)

    def verify(target, *, roots=None, now=None):  # type: ignore[no-untyped-def]
        request = os.urandom(32)
        return verify_evidence(target.attest(request), roots=roots or [pki.root],
                               policy=policy, request=request, now=now, cache=cache)

    verify(card)
    verify(card)
    assert (cache.hits, cache.misses) == (1, 1)
    # another set of roots is another question: asked afresh, and refused
    with pytest.raises(AttestationError, match="trusted vendor root"):
        verify(card, roots=[VendorPKI.create().root])
    # a cached chain past its validity is verified again, and fails as it must
    misses = cache.misses
    with pytest.raises(AttestationError, match="expired|trusted vendor root"):
        verify(card, now=time.time() + 20 * 365 * 86400)
    assert cache.misses == misses + 1
    # bounded: the least recently used chain goes
    others = [make_card(f"card-{n}") for n in (2, 3)]
    for other in others:
        verify(other)
    hits = cache.hits
    verify(card)
    assert cache.hits == hits  # card-1's chain was evicted: verified again
    verify(others[1])
    assert cache.hits == hits + 1


def test_expired_card_certificate_is_refused(pki: VendorPKI) -> None:
    from orchestrator.emulator.card import EmulatedCard

    card = EmulatedCard(pki.issue_card("old-card", valid_days=-1))
    request = os.urandom(32)
    with pytest.raises(AttestationError, match="expired"):
        verify_evidence(card.attest(request), roots=[pki.root], policy=TrustPolicy(),
                        request=request)


def test_report_signed_by_a_non_card_key_is_refused(make_card, pki: VendorPKI) -> None:  # type: ignore[no-untyped-def]
    """A host that holds a genuine certificate but not its key cannot sign."""
    genuine = make_card("card-1")
    impostor = pki.issue_card("card-1")  # same name, other key; chain is genuine
    request = os.urandom(32)
    parsed = evidence_pb2.AttestationEvidence.FromString(genuine.attest(request))
    body = evidence_pb2.ReportBody.FromString(parsed.body)
    forged = sign_report(body, impostor.key, [genuine_cert(parsed)])
    with pytest.raises(AttestationError, match="signature does not verify"):
        verify_evidence(forged, roots=[pki.root], policy=TrustPolicy(), request=request)


def genuine_cert(evidence: evidence_pb2.AttestationEvidence):  # type: ignore[no-untyped-def]
    from cryptography import x509

    return x509.load_der_x509_certificate(evidence.certificate_chain[0])


def test_parallel_encryption_matches_the_format(tmp_path: Path, mek: MEK) -> None:
    """The forked-worker path writes chunks where the sequential reader expects them."""
    from orchestrator.crypto.container import SealedContainer, SealSettings
    from orchestrator.crypto.seal import write_sealed
    from orchestrator.qpc.build import pack_files
    from orchestrator.qpc.container import open_container

    data = os.urandom(70 * 1024 + 5)  # 71 chunks of 1 KiB: more than two worker blocks
    (tmp_path / "elf").write_bytes(data)
    pack_files(tmp_path / "m.qpc", [("network.elf", str(tmp_path / "elf"))])
    with open_container(tmp_path / "m.qpc") as source, open(tmp_path / "e.qpc", "w+b") as out:
        write_sealed(out, source, mek, SealSettings("m", chunk_size=1024, workers=2),
                     key_slots=[])
    with open_container(tmp_path / "e.qpc") as sealed:
        assert bytes(SealedContainer(sealed).open(mek).decrypt_segment("network.elf")) == data
