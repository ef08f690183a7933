"""Everything that crosses the trust boundary, mutated: only our errors come out.

Property tests (hypothesis): valid containers (plain and MDP), evidence, load
receipts, MDP metadata, key-slot tables and tensors are mutated byte by byte
(flips, overwrites, cuts, insertions, biased towards headers and tables); every
parser and verifier on both sides must end in a ModelIPError or succeed, and a
success on a mutated program must yield exactly the original plaintext.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator._proto.modelip.v1 import evidence_pb2, runtime_pb2
from orchestrator.crypto.container import (
    KEYSLOTS,
    SealedContainer,
    SealSettings,
    decode_key_slots,
    encode_key_slots,
)
from orchestrator.crypto.evidence import (
    TrustPolicy,
    VerifiedReport,
    verify_evidence,
    verify_load_receipt,
)
from orchestrator.crypto.mek import MEK
from orchestrator.crypto.seal import seal_specs
from orchestrator.crypto.wrap import wrap_mek
from orchestrator.emulator.card import CardConfig, EmulatedCard
from orchestrator.emulator.pki import VendorPKI
from orchestrator.errors import FormatError, ModelIPError
from orchestrator.fileops.verify import inspect_container, verify_program
from orchestrator.qpc.container import Container, MemorySource
from orchestrator.qpc.mdp import MDP_META, MdpMeta, Partition, TensorSpec
from orchestrator.qpc.writer import bytes_segment, container_pieces, write_container

EXAMPLES = settings(max_examples=300, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
PLAIN = {"network.elf": os.urandom(3000), "networkdesc.bin": b"descriptor",
         "constants.bin": os.urandom(2500)}


@dataclass(frozen=True)
class Material:
    pki: VendorPKI
    card: EmulatedCard
    mek: MEK
    plain: bytes                 # an encrypted plain container with the card's slot
    mdp: bytes                   # an encrypted 2-partition MDP container, slots 0 and 1
    partitions: list[dict[str, bytes]]
    report: VerifiedReport
    evidence: bytes
    request: bytes
    receipt: tuple[bytes, bytes]


def _container(segments: dict[str, bytes], *, offsets: dict[str, int] | None = None) -> bytes:
    out = io.BytesIO()
    write_container(out, [bytes_segment(n, d, offset=(offsets or {}).get(n, 0))
                          for n, d in segments.items()])
    return out.getvalue()


def _sealed(source: bytes, mek: MEK, card: EmulatedCard, slots: int) -> bytes:
    """Encrypt ``source`` and give it one key slot per partition for ``card``."""
    specs = seal_specs(Container(MemorySource(source)), mek, SealSettings("m", chunk_size=1024),
                       key_slots=[])
    head = b"".join(bytes(p) for p in specs[0].chunks())
    digest = hashlib.sha256(head[:-16]).digest()  # the info bytes, without their tag
    report = _report(card)
    keyed = [wrap_mek(mek, slot=i, card_id=card.card_id, session_id=report.session_id,
                      kem=report.kem, public_key=report.session_public_key, program=digest)
             for i in range(slots)]
    specs[-1] = bytes_segment(KEYSLOTS, encode_key_slots(keyed))
    return b"".join(bytes(p) for p in container_pieces(specs))


def _report(card: EmulatedCard, request: bytes = b"r" * 32) -> VerifiedReport:
    return verify_evidence(card.attest(request), roots=[_pki()], policy=TrustPolicy(),
                           request=request)


@functools.cache
def _pki_object() -> VendorPKI:
    return VendorPKI.create()


def _pki() -> Any:
    return _pki_object().root


@functools.cache
def material() -> Material:
    pki = _pki_object()
    card = EmulatedCard(pki.issue_card("card-0"), CardConfig())
    mek = MEK.generate()
    plain = _sealed(_container(PLAIN, offsets={"constants.bin": 1000}), mek, card, 1)
    partitions = [{"network.elf": os.urandom(1500 + i), "constants.bin": os.urandom(700)}
                  for i in range(2)]
    meta = MdpMeta((Partition(0, "partition_0.qpc", outputs=(TensorSpec("a", "float32", (1,)),)),
                    Partition(1, "partition_1.qpc")))
    mdp_source = _container({MDP_META: meta.encode(),
                             **{f"partition_{i}.qpc": _container(p)
                                for i, p in enumerate(partitions)}})
    mdp = _sealed(mdp_source, mek, card, 2)
    request = os.urandom(32)
    evidence = card.attest(request)
    card.load(Container(MemorySource(plain)), program_id="p")
    receipt = card.load_receipt()
    report = _report(card)
    card.unload()
    return Material(pki, card, mek, plain, mdp, partitions, report, evidence, request, receipt)


def mutated(data: bytes, *, hot: int = 512) -> st.SearchStrategy[bytes]:
    """``data`` with 1-4 edits, half of them in the first ``hot`` bytes (header, table,
    names, encryption info): where parsers decide what everything else means."""
    position = st.one_of(st.integers(0, min(hot, len(data)) - 1), st.integers(0, len(data) - 1))
    edit = st.tuples(st.sampled_from(["flip", "set", "cut", "insert", "zero8"]), position,
                     st.integers(0, 255))

    def apply(edits: list[tuple[str, int, int]]) -> bytes:
        out = bytearray(data)
        for kind, at, value in edits:
            at = min(at, len(out) - 1)
            if kind == "flip":
                out[at] ^= 1 << (value % 8)
            elif kind == "set":
                out[at] = value
            elif kind == "cut":
                del out[at:at + 1 + value]
            elif kind == "insert":
                out[at:at] = bytes([value]) * (1 + value % 9)
            else:
                out[at:at + 8] = bytes(8)
            if not out:
                out = bytearray(b"\0")
        return bytes(out)

    return st.lists(edit, min_size=1, max_size=4).map(apply)


def only_our_errors(work: Callable[[], Any]) -> Any:
    """Run ``work``; a ModelIPError is fine (returned), anything else fails the test."""
    try:
        return work()
    except ModelIPError as err:
        return err


# --- containers: the card, verify, inspect ------------------------------------------------


@EXAMPLES
@given(data=mutated(material().plain))
def test_a_mutated_program_loads_exactly_the_original_or_not_at_all(data: bytes) -> None:
    m = material()
    outcome = only_our_errors(lambda: m.card.load(Container(MemorySource(data)),
                                                  program_id="p"))
    if not isinstance(outcome, ModelIPError):
        assert m.card.program is not None
        assert {k: bytes(v) for k, v in m.card.program.segments.items()} == PLAIN
        held = _report(m.card).loaded
        assert held is not None and held.info_digest == m.report.loaded.info_digest  # type: ignore[union-attr]
        m.card.unload()


@EXAMPLES
@given(data=mutated(material().mdp, hot=1024), partition=st.integers(0, 2))
def test_a_mutated_mdp_program_loads_the_right_partition_or_nothing(data: bytes,
                                                                   partition: int) -> None:
    m = material()
    outcome = only_our_errors(lambda: m.card.load(Container(MemorySource(data)),
                                                  program_id="p", partition=partition))
    if not isinstance(outcome, ModelIPError):
        assert m.card.program is not None and partition < 2
        assert {k: bytes(v) for k, v in m.card.program.segments.items()} == \
            m.partitions[partition]
        m.card.unload()


@EXAMPLES
@given(data=mutated(material().mdp, hot=1024))
def test_verify_and_inspect_of_a_mutated_program_end_in_our_errors(tmp_path_factory: Any,
                                                                   data: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("p")) / "program.qpc"
    path.write_bytes(data)
    only_our_errors(lambda: inspect_container(str(path)))
    outcome = only_our_errors(lambda: verify_program(str(path), material().mek))
    if not isinstance(outcome, ModelIPError):
        sizes = {s["name"]: s["size"] for s in outcome["segments"] if s["name"] != MDP_META}
        assert sizes == {f"partition_{i}.qpc/{name}": len(content)
                         for i, p in enumerate(material().partitions)
                         for name, content in p.items()}


def test_header_fields_that_change_how_the_card_reads_are_authenticated() -> None:
    """Minor version, compression and the constants offset, each changed alone."""
    m = material()
    container = Container(MemorySource(m.plain))
    constants = container.segment("constants.bin")
    table_entry = container.header.table_pointer + 32 * constants.index + 8  # offset field
    edits = {"minor": (5, 2), "compression": (6, 1), "constants offset": (table_entry, 0)}
    for what, (at, value) in edits.items():
        data = bytearray(m.plain)
        data[at] = value
        error = only_our_errors(lambda d=bytes(data): m.card.load(  # type: ignore[misc]
            Container(MemorySource(d)), program_id="p"))
        assert isinstance(error, ModelIPError), what
        assert "altered" in str(error), (what, str(error))


# --- evidence and receipts ---------------------------------------------------------------


@EXAMPLES
@given(data=mutated(material().evidence, hot=2048))
def test_mutated_evidence_verifies_as_the_original_or_raises_ours(data: bytes) -> None:
    m = material()
    outcome = only_our_errors(lambda: verify_evidence(data, roots=[m.pki.root],
                                                      policy=TrustPolicy(), request=m.request))
    if not isinstance(outcome, ModelIPError):
        assert (outcome.card_id, outcome.session_public_key) == (
            m.report.card_id, m.report.session_public_key)


@EXAMPLES
@given(receipt=mutated(material().receipt[0], hot=64),
       signature=st.one_of(st.just(material().receipt[1]), mutated(material().receipt[1])))
def test_a_mutated_receipt_is_refused(receipt: bytes, signature: bytes) -> None:
    m = material()
    outcome = only_our_errors(lambda: verify_load_receipt(
        receipt, signature, report=m.report, program_info_digest=m.report.loaded.info_digest,  # type: ignore[union-attr]
        partition=0, source="card",
        key_slot=evidence_pb2.LoadReceipt.FromString(m.receipt[0]).key_slot_digest))
    if not isinstance(outcome, ModelIPError):  # only a re-encoding of the same statement
        assert outcome == evidence_pb2.LoadReceipt.FromString(m.receipt[0])


# --- metadata, key slots, tensors ----------------------------------------------------------


def _nested_json(depth: int) -> bytes:
    return b'{"format": "modelip-mdp/1", "partitions": ' + b"[" * depth + b"]" * depth + b"}"


@EXAMPLES
@given(raw=st.one_of(
    mutated(MdpMeta((Partition(0, "p0", inputs=(TensorSpec("x", "float32", (1, "n")),)),
                     )).encode(), hot=4096),
    st.binary(max_size=300),
    st.integers(1, 100_000).map(_nested_json),
    st.sampled_from([b'{"format": "modelip-mdp/1", "partitions": [{"index": 1e400, '
                     b'"segment": "a"}]}',
                     b'{"format": "modelip-mdp/1", "partitions": [{"index": 0, "segment": '
                     b'"a", "crossing_bytes": 1e999}]}'])))
def test_mdp_metadata_parses_or_says_why(raw: bytes) -> None:
    outcome = only_our_errors(lambda: MdpMeta.decode(raw, source="meta"))
    assert isinstance(outcome, MdpMeta | FormatError)


@EXAMPLES
@given(raw=st.one_of(st.binary(max_size=400), mutated(encode_key_slots(
    SealedContainer(Container(MemorySource(material().plain))).key_slots))))
def test_key_slot_tables_parse_or_say_why(raw: bytes) -> None:
    only_our_errors(lambda: decode_key_slots(raw, source="slots"))


tensor = st.builds(
    runtime_pb2.Tensor,
    name=st.text(max_size=8),
    dtype=st.one_of(st.sampled_from(["float32", "int64", "bool", "U8", "O", "(2,)f4",
                                     "V3", "float32\0", "M8[s]"]), st.text(max_size=6)),
    shape=st.lists(st.integers(0, 1 << 40), max_size=40),
    data=st.binary(max_size=64))


@EXAMPLES
@given(tensors=st.lists(tensor, max_size=4))
def test_tensors_decode_or_say_why(tensors: list[runtime_pb2.Tensor]) -> None:
    from orchestrator.tensors import from_wire

    outcome = only_our_errors(lambda: from_wire(tensors))
    assert isinstance(outcome, dict | FormatError)


@pytest.mark.parametrize("depth", [50, 5000, 200_000])
def test_deep_metadata_is_refused_unparsed(depth: int) -> None:
    with pytest.raises(FormatError, match="nests deeper"):
        MdpMeta.decode(_nested_json(depth), source="meta")
    assert json.loads(MdpMeta((Partition(0, "p0"),)).encode())["format"] == "modelip-mdp/1"
