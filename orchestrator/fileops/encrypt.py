"""The file-level operations (the ``qaic-encrypt``-style commands).

Each function takes paths, validates everything before writing anything, and
writes its outputs atomically (docs/formats.md documents every file).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from orchestrator.atomicfile import (
    atomic_output,
    output_directory,
    refuse_existing,
    write_bytes_atomic,
)
from orchestrator.crypto.container import SealedContainer, SealSettings, encode_key_slots
from orchestrator.crypto.mek import MEK
from orchestrator.crypto.seal import write_sealed
from orchestrator.crypto.wrap import Kem, KeySlot, wrap_mek
from orchestrator.errors import FileInputError, FormatError, UsageError
from orchestrator.qpc.container import Container, FileSource, open_container
from orchestrator.qpc.mdp import read_mdp_meta
from orchestrator.qpc.writer import rewrite_last_segment

if TYPE_CHECKING:
    from orchestrator.crypto.evidence import VerifiedReport

BODY_NAME = "encrypted_model.qpc"
PROGRAM_NAME = "programqpc.bin"
WRAPPED_FORMAT = "modelip-wrapped-mek/1"


@dataclass(frozen=True, slots=True)
class SessionTarget:
    """Where one wrapped MEK goes: a card's session key, verified or explicitly not."""

    card_id: str
    session_id: bytes
    kem: Kem
    public_key: bytes
    verified: bool
    source: str
    boot_counter: int = 0

    @classmethod
    def from_report(cls, report: VerifiedReport, source: str) -> SessionTarget:
        return cls(report.card_id, report.session_id, report.kem, report.session_public_key,
                   True, source, report.boot_counter)


def read_file(path: str | os.PathLike[str], what: str, *, limit: int = 1 << 20) -> bytes:
    """Read a small input file; FileInputError naming ``what`` if it cannot be read."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise FileInputError(path, f"{what} not found") from None
    except IsADirectoryError:
        article = "an" if what[:1] in "aeiou" else "a"
        raise FileInputError(path, f"is a directory, not {article} {what}") from None
    except OSError as exc:
        raise FileInputError(path, f"cannot read {what}: {exc.strerror}") from None
    if len(data) > limit:
        raise FileInputError(path, f"{what} is larger than {limit} bytes")
    return data


def wrap_to_targets(mek: MEK, targets: Sequence[SessionTarget], program: bytes
                    ) -> list[KeySlot]:
    """Slot k for target k, each opening only ``program`` (its encryption-info digest)."""
    return [
        wrap_mek(mek, slot=index, card_id=t.card_id, session_id=t.session_id, kem=t.kem,
                 public_key=t.public_key, program=program)
        for index, t in enumerate(targets)
    ]


def info_digest(sealed: SealedContainer) -> bytes:
    """What a key slot is bound to: SHA-256 of the program's encryption info."""
    return hashlib.sha256(sealed.info_bytes).digest()


def program_for_wrap(path: str, mek: MEK) -> bytes:
    """The encryption-info digest of the program at ``path`` (FILE, or DIR holding
    programqpc.bin or encrypted_model.qpc), after checking it is sealed under ``mek``."""
    target = Path(path)
    if target.is_dir():
        target = next((target / name for name in (PROGRAM_NAME, BODY_NAME)
                       if (target / name).is_file()), target / PROGRAM_NAME)
    if not target.is_file():
        raise FileInputError(target, "encrypted program not found")
    with open_container(target) as container:
        sealed = SealedContainer(container)
        sealed.check_mek(mek)
        return info_digest(sealed)


def _check_slot_count(container: Container, count: int) -> None:
    meta = read_mdp_meta(container)
    if meta is not None and count != len(meta.partitions):
        raise UsageError(f"{container.label}: MDP container has {len(meta.partitions)} "
                         f"partitions; give one key per partition in order (got {count})")


# --- encrypt-model / encrypt-with-session-keys ---------------------------------------


def encrypt_model(qpc: str, mek: MEK, out_dir: str, settings: SealSettings, *,
                  targets: Sequence[SessionTarget] = (), overwrite: bool = False
                  ) -> list[Path]:
    """Encrypt a container once; with targets, also the fully encrypted program.

    Writes OUT/encrypted_model.qpc (no key slots); with ``targets`` also
    OUT/programqpc.bin (slot k wrapped to target k). Returns the paths written.
    Existing outputs are refused unless ``overwrite``; on failure nothing is left.
    """
    names = [BODY_NAME, PROGRAM_NAME] if targets else [BODY_NAME]
    refuse_existing([Path(out_dir) / name for name in names], overwrite=overwrite)
    with open_container(qpc) as source, output_directory(out_dir) as directory:
        if targets:
            _check_slot_count(source, len(targets))
        written = [directory / BODY_NAME]
        with atomic_output(written[0], overwrite=overwrite) as handle:
            write_sealed(handle, source, mek, settings, key_slots=[])
        try:
            if targets:
                written.append(encrypt_with_session_keys(str(directory), mek, targets,
                                                         out_dir=str(directory),
                                                         overwrite=overwrite))
        except BaseException:
            written[0].unlink(missing_ok=True)  # the body without its program: half done
            raise
    return written


def encrypt_with_session_keys(in_dir: str, mek: MEK, targets: Sequence[SessionTarget], *,
                              out_dir: str | None = None, overwrite: bool = False) -> Path:
    """Wrap the MEK to each target and write OUT/programqpc.bin from IN/encrypted_model.qpc."""
    body = Path(in_dir) / BODY_NAME
    refuse_existing([Path(out_dir or in_dir) / PROGRAM_NAME], overwrite=overwrite)
    with open_container(body) as container:
        sealed = SealedContainer(container)
        sealed.check_mek(mek)
        _check_slot_count(container, len(targets))
        program = info_digest(sealed)
    slots = wrap_to_targets(mek, targets, program)
    with output_directory(out_dir or in_dir) as directory:
        target = directory / PROGRAM_NAME
        write_with_slots(body, target, slots, overwrite=overwrite)
    return target


def write_with_slots(body: Path, target: Path, slots: Sequence[KeySlot], *,
                     overwrite: bool) -> None:
    """Copy an encrypted container and give the copy new key slots (atomic)."""
    with atomic_output(target, overwrite=overwrite) as handle:
        _copy_file_into(body, handle)
        _rewrite_slots(handle.fileno(), str(target), slots)


def _copy_file_into(source: Path, handle: BinaryIO) -> None:
    with open(source, "rb") as src:
        _fast_copy(src, handle)


def _fast_copy(src: BinaryIO, dst: BinaryIO) -> None:
    dst.flush()
    remaining = os.fstat(src.fileno()).st_size
    offset = 0
    while remaining:
        try:
            copied = os.copy_file_range(src.fileno(), dst.fileno(), remaining, offset, offset)
        except OSError:
            copied = 0
        if copied == 0:  # not supported here: fall back to user-space copy
            src.seek(offset)
            dst.seek(offset)
            shutil.copyfileobj(src, dst, 8 << 20)
            dst.flush()
            return
        offset += copied
        remaining -= copied


def _rewrite_slots(fd: int, label: str, slots: Sequence[KeySlot]) -> None:
    container = Container(FileSource(fd, os.fstat(fd).st_size), label=label)
    sealed = SealedContainer(container)
    if not sealed.has_key_slot_segment:
        raise FormatError(label, "has no key-slot segment (not a top-level encrypted program)")
    rewrite_last_segment(fd, container, encode_key_slots(slots))


# --- wrap-mek / replace-mek -----------------------------------------------------------


def wrap_mek_to_dir(mek: MEK, targets: Sequence[SessionTarget], out_dir: str, *,
                    program: bytes, overwrite: bool = False) -> list[Path]:
    """One sub-directory per target: MEK.encrypt, MEK.pub, MEK.nonce, config.json.

    Every wrap opens only ``program`` (an encryption-info digest, program_for_wrap),
    or any program under the MEK if it is UNBOUND_PROGRAM.
    """
    files = ("MEK.encrypt", "MEK.pub", "MEK.nonce", "config.json")
    refuse_existing([Path(out_dir) / "config.json",
                     *(Path(out_dir) / f"slot_{k}" / name
                       for k in range(len(targets)) for name in files)], overwrite=overwrite)
    slots = wrap_to_targets(mek, targets, program)
    written = []
    summary = []
    with output_directory(out_dir) as directory:
        for target, slot in zip(targets, slots, strict=True):
            slot_dir = directory / f"slot_{slot.slot}"
            slot_dir.mkdir(exist_ok=True)
            config = _slot_config(slot, target)
            for name, data in zip(files, (slot.wrapped_mek, slot.enc, slot.info(),
                                          _json(config)), strict=True):
                write_bytes_atomic(slot_dir / name, data, overwrite=overwrite)
            summary.append({**config, "dir": slot_dir.name})
            written.append(slot_dir)
        write_bytes_atomic(directory / "config.json", _json({
            "format": WRAPPED_FORMAT, "mek_fingerprint": mek.fingerprint(), "slots": summary}),
            overwrite=overwrite)
    return written


def _slot_config(slot: KeySlot, target: SessionTarget) -> dict[str, Any]:
    return {
        "format": WRAPPED_FORMAT,
        "slot": slot.slot,
        "card_id": slot.card_id,
        "session_id": slot.session_id.hex(),
        "kem": slot.kem.value,
        "program": slot.program.hex(),
        "boot_counter": target.boot_counter,
        "verified": target.verified,
        "evidence": target.source,
    }


def _json(document: Any) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


def load_wrapped_dirs(paths: Sequence[str]) -> list[KeySlot]:
    """Key slots from wrap-mek output: slot directories, or directories holding them."""
    slots: list[KeySlot] = []
    for path in paths:
        directory = Path(path)
        if not directory.is_dir():
            raise FileInputError(directory, "wrapped-MEK directory not found")
        if (directory / "MEK.encrypt").exists():
            slots.append(_load_slot_dir(directory))
            continue
        children = sorted((p for p in directory.iterdir() if (p / "MEK.encrypt").exists()),
                          key=lambda p: p.name)
        if not children:
            raise FileInputError(directory, "holds no wrapped MEK (MEK.encrypt)")
        slots.extend(_load_slot_dir(child) for child in children)
    numbers = [slot.slot for slot in slots]
    if len(set(numbers)) != len(numbers):
        raise UsageError("--wrapped-meks: two wrapped MEKs are for the same slot")
    return slots


def _load_slot_dir(directory: Path) -> KeySlot:
    where = str(directory)
    try:
        config = json.loads(read_file(directory / "config.json", "wrapped-MEK config"))
        if config.get("format") != WRAPPED_FORMAT:
            raise ValueError("format")
        slot = KeySlot(
            slot=int(config["slot"]),
            card_id=str(config["card_id"]),
            session_id=bytes.fromhex(config["session_id"]),
            kem=Kem.parse(config["kem"]),
            enc=read_file(directory / "MEK.pub", "MEK.pub"),
            wrapped_mek=read_file(directory / "MEK.encrypt", "MEK.encrypt"),
            program=bytes.fromhex(config["program"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise FormatError(where, "wrapped-MEK directory has a malformed config.json") from None
    nonce = read_file(directory / "MEK.nonce", "MEK.nonce")
    if nonce != slot.info():
        raise FormatError(where, "MEK.nonce does not match config.json (mixed directories?)")
    if len(slot.enc) != slot.kem.enc_bytes:
        raise FormatError(where, "MEK.pub has the wrong length for its KEM")
    return slot


def merge_slots(current: Sequence[KeySlot], new: Sequence[KeySlot]) -> list[KeySlot]:
    """New slots replace the ones with the same number; the rest are kept."""
    merged = {slot.slot: slot for slot in current}
    merged.update({slot.slot: slot for slot in new})
    return [merged[number] for number in sorted(merged)]


def resolve_program(path: str) -> Path:
    """--encrypted-qpc FILE or DIR (then DIR/programqpc.bin)."""
    target = Path(path)
    if target.is_dir():
        target = target / PROGRAM_NAME
    if not target.is_file():
        raise FileInputError(target, "encrypted program not found")
    return target


def replace_mek(encrypted: str, wrapped_dirs: Sequence[str], *, out_dir: str | None,
                in_place: bool, overwrite: bool = False) -> Path:
    """Swap key slots only; never re-encrypts. Returns the file written."""
    if in_place == (out_dir is not None):
        raise UsageError("replace-mek: give exactly one of --output-dir or --in-place")
    program = resolve_program(encrypted)
    new_slots = load_wrapped_dirs(wrapped_dirs)
    with open_container(program) as container:
        sealed = SealedContainer(container)
        if not sealed.has_key_slot_segment:
            raise FormatError(str(program), "has no key-slot segment")
        program_digest = info_digest(sealed)
        for slot in new_slots:
            if slot.bound and slot.program != program_digest:
                raise FormatError(str(program), f"the wrapped MEK for slot {slot.slot} was made "
                                  f"for another program ({slot.program.hex()[:16]}, this one is "
                                  f"{program_digest.hex()[:16]}); wrap-mek --encrypted-qpc "
                                  "names the program")
        slots = merge_slots(sealed.key_slots, new_slots)
        meta = read_mdp_meta(container)
        if meta is not None and any(s.slot >= len(meta.partitions) for s in slots):
            raise UsageError(f"{program}: MDP container has {len(meta.partitions)} partitions; "
                             "a wrapped MEK names a slot beyond them")
    if in_place:
        fd = os.open(program, os.O_RDWR)
        try:
            _rewrite_slots(fd, str(program), slots)
        finally:
            os.close(fd)
        return program
    assert out_dir is not None  # noqa: S101 - checked above
    if (Path(out_dir) / PROGRAM_NAME).resolve() == program.resolve():
        raise UsageError("replace-mek: --output-dir is the input's directory; use --in-place")
    refuse_existing([Path(out_dir) / PROGRAM_NAME], overwrite=overwrite)
    with output_directory(out_dir) as directory:
        target = directory / PROGRAM_NAME
        write_with_slots(program, target, slots, overwrite=overwrite)
    return target
