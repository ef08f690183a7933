"""The file-level commands, driven through the CLI as a user would."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.cli.main import main
from orchestrator.crypto.container import SealedContainer, encode_key_slots
from orchestrator.emulator.card import EmulatedCard
from orchestrator.errors import IntegrityError, SessionInvalidError
from orchestrator.qpc.container import open_container
from orchestrator.qpc.writer import bytes_segment, rewrite_last_segment, write_container
from tests.conftest import SHAPES

SMALL_CHUNK = "1024"


def run(*argv: str) -> int:
    return main([str(a) for a in argv])


def load_card(path: Path) -> EmulatedCard:
    return EmulatedCard.from_state(json.loads(path.read_text()), source=str(path))


@pytest.fixture
def fleet(tmp_path: Path, pki_dir: Path):  # type: ignore[no-untyped-def]
    """Three files-only cards with fresh evidence, and a MEK."""
    cards, evidence = [], []
    for index in range(3):
        card = tmp_path / f"card{index}.json"
        assert run("card", "init", "--pki", pki_dir, "--id", f"card-{index}", "-o", card) == 0
        report = tmp_path / f"card{index}.dat"
        assert run("card", "attest", card, "-o", report) == 0
        cards.append(card)
        evidence.append(report)
    mek = tmp_path / "mek.dat"
    assert run("generate-mek", "-o", mek) == 0
    return {"cards": cards, "evidence": evidence, "mek": mek, "root": pki_dir / "root.pem"}


def encrypt(qpc: Path, fleet, out: Path, n: int) -> Path:  # type: ignore[no-untyped-def]
    code = run("encrypt-model", "--qpc", qpc, "--mek", fleet["mek"], "--output-dir", out,
               "--chunk-size", SMALL_CHUNK, "--trust-root", fleet["root"],
               "--pub-keys", *fleet["evidence"][:n])
    assert code == 0
    return out / "programqpc.bin"


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_shape_round_trips_to_the_exact_bytes(tmp_path: Path, fleet, make_qpc,  # type: ignore[no-untyped-def]
                                                    shape: str) -> None:
    qpc, contents = make_qpc(SHAPES[shape])
    program = encrypt(qpc, fleet, tmp_path / "out", 2)
    for index in range(2):  # the same model on two cards: one slot each
        card = load_card(fleet["cards"][index])
        with open_container(program) as container:
            card.load(container, program_id="p")
        assert card.program is not None
        assert {k: bytes(v) for k, v in card.program.segments.items()} == contents
    extract = tmp_path / "plain"
    assert run("verify", "--qpc", program, "--mek", fleet["mek"], "--extract", extract) == 0
    assert {p.name: p.read_bytes() for p in extract.iterdir()} == contents
    body = (tmp_path / "out" / "encrypted_model.qpc").read_bytes()
    for name, data in contents.items():
        if len(data) >= 16 and name not in ("networkdesc.bin", "constantsdesc.bin"):
            assert data not in body  # model bytes never appear in clear


def test_mdp_container_one_partition_per_card(tmp_path: Path, fleet, make_mdp) -> None:  # type: ignore[no-untyped-def]
    mdp, parts = make_mdp(3)
    program = encrypt(mdp, fleet, tmp_path / "out", 3)
    for index in range(3):
        card = load_card(fleet["cards"][index])
        with open_container(program) as container:
            card.load(container, program_id="p", partition=index)
        assert card.program is not None
        assert {k: bytes(v) for k, v in card.program.segments.items()} == parts[index]
    # a card cannot load a partition its slot is not for
    card = load_card(fleet["cards"][0])
    with open_container(program) as container, pytest.raises(IntegrityError, match="partition"):
        card.load(container, program_id="p", partition=1)


def test_swapped_partitions_are_refused_by_verify_and_the_card(  # type: ignore[no-untyped-def]
        tmp_path: Path, fleet, make_mdp, capsys) -> None:
    """The host swaps the nested containers of partitions 0 and 1 (each still a valid
    container of this model, under this MEK) and fixes up the segment table."""
    mdp, _ = make_mdp(3)
    program = encrypt(mdp, fleet, tmp_path / "out", 3)

    def swap(data: dict[str, bytes]) -> None:
        data["partition_0.qpc"], data["partition_1.qpc"] = (data["partition_1.qpc"],
                                                            data["partition_0.qpc"])
    swapped = _rewritten(program, swap, tmp_path / "swapped.qpc")
    capsys.readouterr()
    assert run("verify", "--qpc", swapped, "--mek", fleet["mek"]) == 3
    assert "partitions swapped" in capsys.readouterr().err
    error = _load_error(fleet["cards"][0], swapped, partition=0)
    assert isinstance(error, IntegrityError) and "partitions swapped" in str(error)


def _rewritten(program: Path, change: Callable[[dict[str, bytes]], None], out: Path) -> Path:
    """The container with its segments' bytes changed by ``change`` (name -> bytes) and
    the segment table fixed up, as a host that rewrites a body would."""
    with open_container(program) as container:
        names = container.names()
        data = {name: container.read(name) for name in names}
        offsets = {s.name: s.offset for s in container.segments}
    change(data)
    with open(out, "wb") as handle:
        write_container(handle, [bytes_segment(n, data[n], offset=offsets[n]) for n in names])
    return out


def test_mdp_needs_one_key_per_partition(tmp_path: Path, fleet, make_mdp, capsys) -> None:  # type: ignore[no-untyped-def]
    mdp, _ = make_mdp(3)
    code = run("encrypt-model", "--qpc", mdp, "--mek", fleet["mek"], "--output-dir",
               tmp_path / "out", "--trust-root", fleet["root"], "--pub-keys",
               *fleet["evidence"][:2])
    assert code == 2
    assert "3 partitions" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# --- tampering: each its own clear error, no output -------------------------------------


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _segment_offset(path: Path, name: str) -> tuple[int, int]:
    with open_container(path) as container:
        segment = container.segment(name)
        return segment.file_offset, segment.size


def _load_error(card_path: Path, program: Path, partition: int = 0) -> Exception:
    card = load_card(card_path)
    with pytest.raises(Exception) as info:  # noqa: B017,PT011 - callers check the message
        with open_container(program) as container:
            card.load(container, program_id="p", partition=partition)
    assert card.program is None
    return info.value


@pytest.mark.parametrize(
    ("target", "expected", "card_expected"),
    [
        ("ciphertext", "chunk 0 failed authentication", None),
        # the card binds the info's digest into the slot: an altered info opens no slot
        ("encinfo", "encryption info was altered", "made for another program"),
        ("wrapped_mek", "wrapped MEK does not open", None),
        ("plaintext_desc", "plaintext segment 'networkdesc.bin' was altered", None),
    ],
)
def test_flipped_bits_are_detected(tmp_path: Path, fleet, make_qpc, capsys,  # type: ignore[no-untyped-def]
                                   target: str, expected: str, card_expected: str | None
                                   ) -> None:
    qpc, _ = make_qpc(SHAPES["many-segments"])
    program = encrypt(qpc, fleet, tmp_path / "out", 1)
    if target == "ciphertext":
        start, _ = _segment_offset(program, "network.elf")
        _flip(program, start + 7)
    elif target == "encinfo":
        start, size = _segment_offset(program, "modelip_encinfo")
        _flip(program, start + size - 16 - 3)  # the segment list, not salt or key check
    elif target == "wrapped_mek":
        start, size = _segment_offset(program, "modelip_keyslots")
        with open_container(program) as container:
            wrapped = SealedContainer(container).key_slots[0].wrapped_mek
        _flip(program, program.read_bytes().index(wrapped, start) + 3)
    else:
        start, _ = _segment_offset(program, "networkdesc.bin")
        _flip(program, start)
    error = _load_error(fleet["cards"][0], program)
    assert (card_expected or expected) in str(error)
    extract = tmp_path / "plain"
    if target != "wrapped_mek":  # the owner's check does not use the slots
        assert run("verify", "--qpc", program, "--mek", fleet["mek"], "--extract", extract) == 3
        assert expected in capsys.readouterr().err
        assert not extract.exists() or not [p for p in extract.rglob("*") if p.is_file()]


def test_truncation_and_swapped_chunks(tmp_path: Path, fleet, make_qpc) -> None:  # type: ignore[no-untyped-def]
    qpc, _ = make_qpc({"network.elf": 4 * 1024})
    program = encrypt(qpc, fleet, tmp_path / "out", 1)
    data = program.read_bytes()
    start, size = _segment_offset(program, "network.elf")
    chunk = 1024 + 16
    swapped = bytearray(data)
    swapped[start : start + chunk] = data[start + chunk : start + 2 * chunk]
    swapped[start + chunk : start + 2 * chunk] = data[start : start + chunk]
    program.write_bytes(bytes(swapped))
    assert "chunk 0 failed authentication" in str(_load_error(fleet["cards"][0], program))
    program.write_bytes(data[: start + size - 5])
    assert "header says" in str(_load_error(fleet["cards"][0], program))


def _rewrite_slots(program: Path, mutate) -> None:  # type: ignore[no-untyped-def]
    with open_container(program) as container:
        slots = SealedContainer(container).key_slots
    fd = os.open(program, os.O_RDWR)
    try:
        with open_container(program) as container:
            rewrite_last_segment(fd, container, encode_key_slots(mutate(slots)))
    finally:
        os.close(fd)


def test_slot_moved_to_another_card_session_or_partition(tmp_path: Path, fleet, make_mdp  # type: ignore[no-untyped-def]
                                                         ) -> None:
    mdp, _ = make_mdp(2)
    program = encrypt(mdp, fleet, tmp_path / "out", 2)
    card1 = load_card(fleet["cards"][1])
    # another card: slot 0 (card-0's) relabelled for card-1 and put in card-1's place
    _rewrite_slots(program, lambda s: [s[0], replace(s[0], slot=1, card_id="card-1",
                                                     session_id=card1.session_id)])
    assert "does not open" in str(_load_error(fleet["cards"][1], program, partition=1))
    # another partition: card-0's slot renumbered to partition 1
    program = encrypt(mdp, fleet, tmp_path / "out2", 2)
    _rewrite_slots(program, lambda s: [replace(s[0], slot=1), replace(s[1], slot=0)])
    assert "does not open" in str(_load_error(fleet["cards"][0], program, partition=1))
    # another session: the card was reset
    program = encrypt(mdp, fleet, tmp_path / "out3", 2)
    assert run("card", "reset", fleet["cards"][0]) == 0
    error = _load_error(fleet["cards"][0], program)
    assert isinstance(error, SessionInvalidError) and "earlier session" in str(error)


@pytest.mark.parametrize(
    ("make_bad", "expected"),
    [
        ("wrong_root", "does not lead to a trusted vendor root"),
        ("bare_key", "bare public key"),
        ("garbage", "not attestation evidence"),
    ],
)
def test_bad_evidence_is_refused_and_nothing_is_written(tmp_path: Path, fleet, make_qpc,  # type: ignore[no-untyped-def]
                                                        capsys, make_bad, expected) -> None:
    qpc, _ = make_qpc(SHAPES["one-segment"])
    evidence = fleet["evidence"][0]
    root = fleet["root"]
    if make_bad == "wrong_root":
        assert run("pki", "init", tmp_path / "other") == 0
        root = tmp_path / "other" / "root.pem"
    elif make_bad == "bare_key":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        evidence = tmp_path / "bare.pem"
        evidence.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    else:
        evidence = tmp_path / "garbage.dat"
        evidence.write_bytes(b"\xff\x00not evidence" * 5)
    out = tmp_path / "out"
    code = run("encrypt-model", "--qpc", qpc, "--mek", fleet["mek"], "--output-dir", out,
               "--trust-root", root, "--pub-keys", evidence)
    assert code in (2, 3)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
    assert not out.exists() or not any(out.iterdir())


def test_card_enforces_the_models_minimum_firmware(tmp_path: Path, fleet, make_qpc, pki_dir,  # type: ignore[no-untyped-def]
                                                   capsys) -> None:
    qpc, _ = make_qpc(SHAPES["one-segment"])
    card = tmp_path / "old.json"
    assert run("card", "init", "--pki", pki_dir, "--id", "old", "-o", card,
               "--firmware", "0.9.0") == 0
    assert run("card", "attest", card, "-o", tmp_path / "old.dat") == 0
    code = run("encrypt-model", "--qpc", qpc, "--mek", fleet["mek"], "--output-dir",
               tmp_path / "out", "--trust-root", fleet["root"], "--pub-keys",
               tmp_path / "old.dat", "--min-firmware", "1.10")
    assert code == 0
    capsys.readouterr()
    assert run("card", "load", card, tmp_path / "out" / "programqpc.bin") == 3
    assert "needs firmware >= 1.10, card has 0.9.0" in capsys.readouterr().err


def test_bare_key_is_accepted_only_when_insecure(tmp_path: Path, fleet, make_qpc, capsys  # type: ignore[no-untyped-def]
                                                 ) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    qpc, _ = make_qpc(SHAPES["one-segment"])
    program = encrypt(qpc, fleet, tmp_path / "out", 1)
    bare = tmp_path / "bare.pem"
    bare.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    assert run("wrap-mek", "--mek", fleet["mek"], "--encrypted-qpc", program, "--pub-keys",
               bare, "--output-dir", tmp_path / "w", "--insecure-unverified-key") == 0
    assert "WARNING" in capsys.readouterr().err
    assert (tmp_path / "w" / "slot_0" / "MEK.encrypt").stat().st_size == 32


# --- reset and replace-mek --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["in-place", "output-dir"])
def test_reset_then_replace_mek_makes_the_same_body_load(tmp_path: Path, fleet, make_qpc,  # type: ignore[no-untyped-def]
                                                         mode: str) -> None:
    qpc, contents = make_qpc(SHAPES["multi-chunk"])
    program = encrypt(qpc, fleet, tmp_path / "out", 2)
    card = fleet["cards"][1]
    assert run("card", "reset", card) == 0
    assert isinstance(_load_error(card, program), SessionInvalidError)
    fresh = tmp_path / "fresh.dat"
    assert run("card", "attest", card, "-o", fresh) == 0
    # wrap for slot 1 only: wrap-mek numbers slots in --pub-keys order
    assert run("wrap-mek", "--mek", fleet["mek"], "--encrypted-qpc", program, "--trust-root",
               fleet["root"], "--pub-keys", fleet["evidence"][0], fresh, "--output-dir",
               tmp_path / "w") == 0
    start, size = _segment_offset(program, "network.elf")
    body_before = program.read_bytes()[start : start + size]
    if mode == "in-place":
        assert run("replace-mek", "--encrypted-qpc", program, "--wrapped-meks",
                   tmp_path / "w" / "slot_1", "--in-place") == 0
        result = program
    else:
        assert run("replace-mek", "--encrypted-qpc", program, "--wrapped-meks",
                   tmp_path / "w" / "slot_1", "--output-dir", tmp_path / "new") == 0
        result = tmp_path / "new" / "programqpc.bin"
    start2, size2 = _segment_offset(result, "network.elf")
    assert result.read_bytes()[start2 : start2 + size2] == body_before  # never re-encrypted
    for index in (0, 1):  # card 0's slot kept, card 1's replaced
        loaded = load_card(fleet["cards"][index])
        with open_container(result) as container:
            loaded.load(container, program_id="p")
        assert loaded.program is not None
        assert {k: bytes(v) for k, v in loaded.program.segments.items()} == contents


def test_a_wrapped_mek_goes_only_into_the_program_it_was_made_for(  # type: ignore[no-untyped-def]
        tmp_path: Path, fleet, make_qpc, capsys) -> None:
    qpc, _ = make_qpc(SHAPES["one-segment"])
    first = encrypt(qpc, fleet, tmp_path / "a", 1)
    second = encrypt(qpc, fleet, tmp_path / "b", 1)  # same model and MEK, new salt
    assert run("wrap-mek", "--mek", fleet["mek"], "--encrypted-qpc", first, "--trust-root",
               fleet["root"], "--pub-keys", fleet["evidence"][0], "--output-dir",
               tmp_path / "w") == 0
    config = json.loads((tmp_path / "w" / "slot_0" / "config.json").read_text())
    with open_container(first) as container:
        assert config["program"] == hashlib.sha256(
            SealedContainer(container).info_bytes).hexdigest()
    capsys.readouterr()
    before = second.read_bytes()
    assert run("replace-mek", "--encrypted-qpc", second, "--wrapped-meks", tmp_path / "w",
               "--in-place") == 2
    assert "was made for another program" in capsys.readouterr().err
    assert second.read_bytes() == before
    assert run("replace-mek", "--encrypted-qpc", first, "--wrapped-meks", tmp_path / "w",
               "--in-place") == 0


def test_replace_mek_in_place_survives_repeated_swaps(tmp_path: Path, fleet, make_qpc  # type: ignore[no-untyped-def]
                                                      ) -> None:
    """Each swap writes the slots beside the live copy; the file does not grow."""
    qpc, _ = make_qpc(SHAPES["one-segment"])
    program = encrypt(qpc, fleet, tmp_path / "out", 1)
    sizes = set()
    for round_ in range(4):
        evidence = tmp_path / f"e{round_}.dat"
        assert run("card", "reset", fleet["cards"][0]) == 0
        assert run("card", "attest", fleet["cards"][0], "-o", evidence) == 0
        wrapped = tmp_path / f"w{round_}"
        assert run("wrap-mek", "--mek", fleet["mek"], "--encrypted-qpc", program,
                   "--trust-root", fleet["root"], "--pub-keys", evidence, "--output-dir",
                   wrapped) == 0
        assert run("replace-mek", "--encrypted-qpc", program, "--wrapped-meks", wrapped,
                   "--in-place") == 0
        assert run("card", "load", fleet["cards"][0], program) == 0
        sizes.add(program.stat().st_size)
    _, slot_size = _segment_offset(program, "modelip_keyslots")
    assert max(sizes) - min(sizes) <= slot_size + 16  # ping-pong, no growth per swap


def test_verify_with_the_wrong_mek(tmp_path: Path, fleet, make_qpc, capsys) -> None:  # type: ignore[no-untyped-def]
    qpc, _ = make_qpc(SHAPES["one-segment"])
    program = encrypt(qpc, fleet, tmp_path / "out", 1)
    other = tmp_path / "other.dat"
    assert run("generate-mek", "-o", other) == 0
    assert run("verify", "--qpc", program, "--mek", other) == 3
    assert "not the one this model was encrypted with" in capsys.readouterr().err


def test_inspect_shows_structure_without_a_key(tmp_path: Path, fleet, make_mdp, capsys  # type: ignore[no-untyped-def]
                                               ) -> None:
    mdp, _ = make_mdp(2)
    program = encrypt(mdp, fleet, tmp_path / "out", 2)
    capsys.readouterr()
    assert run("inspect", program, "--json") == 0
    document = json.loads(capsys.readouterr().out)
    assert document["encrypted"] is True
    assert [s["card_id"] for s in document["key_slots"]] == ["card-0", "card-1"]
    assert [p["segment"] for p in document["mdp"]["partitions"]] == ["partition_0.qpc",
                                                                     "partition_1.qpc"]
    names = [s["name"] for s in document["segments"]]
    assert names[0] == "modelip_encinfo" and names[-1] == "modelip_keyslots"
    assert run("inspect", program) == 0
    assert "key slot 1: card 'card-1'" in capsys.readouterr().out


@pytest.mark.parametrize(("script", "marker"), [("seed_flow.sh", "SEED FLOW OK"),
                                                ("reference_flow.sh", "REFERENCE FLOW OK"),
                                                ("mdp_flow.sh", "MDP FLOW OK"),
                                                ("documented_flow.sh", "DOCUMENTED FLOW OK")])
def test_flow_as_a_shell_script(tmp_path: Path, script: str, marker: str) -> None:
    """seed_flow: files only. reference_flow: against a live `modelip emulate`."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHON"] = sys.executable
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    assert shutil.which("modelip", path=env["PATH"]), "the modelip console script is installed"
    result = subprocess.run(["bash", str(Path(__file__).parent / "flows" / script)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=110,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert marker in result.stdout


def test_an_unbound_wrap_opens_any_program_under_the_mek_but_never_below_the_floor(  # type: ignore[no-untyped-def]
        tmp_path: Path, fleet, make_qpc, capsys) -> None:
    """The reference's wrap-mek names no program: its slot is bound to card, session and
    slot only (docs/protocol.md). A host may then pair it with any program sealed under
    the MEK, and the card still refuses every version below its rollback floor."""
    qpc, _ = make_qpc(SHAPES["one-segment"])
    programs = {}
    for version in (1, 2):
        out = tmp_path / f"v{version}"
        assert run("encrypt-model", "--qpc", qpc, "--mek", fleet["mek"], "--output-dir", out,
                   "--model-version", version, "--trust-root", fleet["root"],
                   "--pub-keys", fleet["evidence"][0]) == 0
        programs[version] = out / "programqpc.bin"
    card = load_card(fleet["cards"][0])
    with open_container(programs[2]) as container:
        card.load(container, program_id="v2")   # the card's floor for this model is now 2
    fleet["cards"][0].write_text(json.dumps(card.to_state()))
    capsys.readouterr()
    assert run("wrap-mek", "--mek", fleet["mek"], "--trust-root", fleet["root"],
               "--pub-keys", fleet["evidence"][0], "--output-dir", tmp_path / "w") == 0
    said = capsys.readouterr().err
    assert "bound to card, session and slot, not to one program" in said
    assert "--encrypted-qpc" in said
    for version in (1, 2):  # replace-mek takes an unbound slot into either program
        assert run("replace-mek", "--encrypted-qpc", programs[version], "--wrapped-meks",
                   tmp_path / "w", "--in-place") == 0
    assert run("inspect", programs[1]) == 0
    assert "for any program under the MEK (unbound)" in capsys.readouterr().out
    error = _load_error(fleet["cards"][0], programs[1])
    assert "below this card's rollback floor 2" in str(error)
    card = load_card(fleet["cards"][0])
    with open_container(programs[2]) as container:
        assert card.load(container, program_id="v2")
    assert card.program is not None and card.program.model_version == 2


def test_the_vendor_root_is_configured_once(tmp_path: Path, fleet, make_qpc, capsys,  # type: ignore[no-untyped-def]
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    qpc, _ = make_qpc(SHAPES["one-segment"])
    monkeypatch.delenv("MODELIP_TRUST_ROOT", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    args = ["encrypt-model", "--qpc", qpc, "--mek", fleet["mek"], "--pub-keys",
            fleet["evidence"][0]]
    assert run(*args, "--output-dir", tmp_path / "none") == 2
    said = capsys.readouterr().err
    assert "no vendor trust root" in said and "$MODELIP_TRUST_ROOT" in said
    assert str(tmp_path / "config" / "modelip" / "trust-root.pem") in said
    assert not (tmp_path / "none").exists()
    monkeypatch.setenv("MODELIP_TRUST_ROOT", str(tmp_path / "missing.pem"))
    assert run(*args, "--output-dir", tmp_path / "none") == 2
    said = capsys.readouterr().err
    assert "$MODELIP_TRUST_ROOT" in said and "missing.pem: no such file" in said
    monkeypatch.setenv("MODELIP_TRUST_ROOT", str(fleet["root"]))
    assert run(*args, "--output-dir", tmp_path / "by-env") == 0
    monkeypatch.delenv("MODELIP_TRUST_ROOT")
    (tmp_path / "config" / "modelip").mkdir(parents=True)
    shutil.copy(fleet["root"], tmp_path / "config" / "modelip" / "trust-root.pem")
    assert run(*args, "--output-dir", tmp_path / "by-file") == 0
    # and it verifies: evidence from another vendor's card is refused
    from orchestrator.emulator.pki import VendorPKI

    other = VendorPKI.create()
    other.save(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "root.pem",
                tmp_path / "config" / "modelip" / "trust-root.pem")
    assert run(*args, "--output-dir", tmp_path / "other-root") == 3
    assert not (tmp_path / "other-root").exists()


def test_the_same_card_session_twice_is_refused(tmp_path: Path, fleet, make_qpc, capsys  # type: ignore[no-untyped-def]
                                               ) -> None:
    qpc, _ = make_qpc(SHAPES["one-segment"])
    copy = tmp_path / "copy.dat"
    shutil.copy(fleet["evidence"][0], copy)
    assert run("encrypt-model", "--qpc", qpc, "--mek", fleet["mek"], "--output-dir",
               tmp_path / "out", "--trust-root", fleet["root"], "--pub-keys",
               fleet["evidence"][0], copy) == 2
    assert "holds the same session key as" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_outputs_are_replaced_only_when_asked(tmp_path: Path, fleet, make_qpc, capsys  # type: ignore[no-untyped-def]
                                              ) -> None:
    """One rule for every command that writes: refuse an existing output before writing
    anything, --force replaces it."""
    qpc, _ = make_qpc(SHAPES["one-segment"])
    out = tmp_path / "out"
    base = ["encrypt-model", "--qpc", qpc, "--mek", fleet["mek"], "--output-dir", out,
            "--trust-root", fleet["root"]]
    assert run(*base) == 0
    body = (out / "encrypted_model.qpc").read_bytes()
    assert run(*base, "--pub-keys", fleet["evidence"][0]) == 2
    assert "encrypted_model.qpc: already exists" in capsys.readouterr().err
    assert (out / "encrypted_model.qpc").read_bytes() == body
    assert not (out / "programqpc.bin").exists()   # all or nothing: not the program alone
    assert run(*base, "--pub-keys", fleet["evidence"][0], "--force") == 0
    assert (out / "encrypted_model.qpc").read_bytes() != body   # a fresh salt
    program = (out / "programqpc.bin").read_bytes()
    session_keys = ["encrypt-with-session-keys", "--input-dir", out, "--mek", fleet["mek"],
                    "--trust-root", fleet["root"], "--pub-keys", fleet["evidence"][1]]
    assert run(*session_keys) == 2
    assert (out / "programqpc.bin").read_bytes() == program
    assert run(*session_keys, "--force") == 0
    assert (out / "programqpc.bin").read_bytes() != program
    mek_before = fleet["mek"].read_bytes()
    assert run("card", "attest", fleet["cards"][0], "-o", fleet["mek"]) == 2
    assert fleet["mek"].read_bytes() == mek_before
    assert run("card", "attest", fleet["cards"][0], "-o", fleet["evidence"][0], "--force") == 0
    wrapped = ["wrap-mek", "--mek", fleet["mek"], "--trust-root", fleet["root"],
               "--pub-keys", fleet["evidence"][0], "--output-dir", tmp_path / "w"]
    assert run(*wrapped) == 0
    capsys.readouterr()
    assert run(*wrapped) == 2
    assert "w/config.json: already exists" in capsys.readouterr().err
    assert run(*wrapped, "--force") == 0
    assert run("verify", "--qpc", out / "programqpc.bin", "--mek", fleet["mek"],
               "--extract", tmp_path / "x") == 0
    assert run("verify", "--qpc", out / "programqpc.bin", "--mek", fleet["mek"],
               "--extract", tmp_path / "x") == 2
    assert run("replace-mek", "--encrypted-qpc", out, "--wrapped-meks", tmp_path / "w",
               "--output-dir", tmp_path / "x") == 0
    assert run("replace-mek", "--encrypted-qpc", out, "--wrapped-meks", tmp_path / "w",
               "--output-dir", tmp_path / "x") == 2


def test_a_failed_encryption_leaves_no_directory_behind(tmp_path: Path, fleet, small_fs,  # type: ignore[no-untyped-def]
                                                        make_qpc, capsys) -> None:
    qpc, _ = make_qpc({"network.elf": 3 << 20})   # larger than the 2 MiB filesystem
    target = small_fs / "out" / "deeper"
    assert run("encrypt-model", "--qpc", qpc, "--mek", fleet["mek"], "--output-dir",
               target) == 2
    assert "no space left" in capsys.readouterr().err.lower()
    assert list(small_fs.iterdir()) == []


def test_bytes_added_to_a_partition_are_refused(tmp_path: Path, fleet, make_mdp,  # type: ignore[no-untyped-def]
                                                capsys) -> None:
    """The host appends bytes to partition 0 inside the MDP body (its plaintext cannot
    change, but its content address would, and the card used to load it): the outer
    info records each partition's size and info digest, so verify and the card refuse."""
    mdp, _ = make_mdp(2)
    program = encrypt(mdp, fleet, tmp_path / "out", 2)

    def grow(data: dict[str, bytes]) -> None:
        data["partition_0.qpc"] += b"\0" * 64
    grown = _rewritten(program, grow, tmp_path / "grown.qpc")
    capsys.readouterr()
    assert run("verify", "--qpc", grown, "--mek", fleet["mek"]) == 3
    assert "bytes added or cut" in capsys.readouterr().err
    error = _load_error(fleet["cards"][0], grown, partition=0)
    assert isinstance(error, IntegrityError) and "bytes added or cut" in str(error)
