"""pki init and card init|attest|reset|load|unload|show: files-only emulated cards, for
the file-level commands' examples and tests (a card's state lives in its JSON file).

The file *is* the card: a program loaded with ``--keep`` stays in its memory (the file
names the program's body and its key slots, and the card decrypts and verifies it again
each time the file is read) until ``card unload`` or ``card reset``. These commands are
all a card backend needs (tests/backends/cardfiles, docs/host-agent.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from orchestrator.cli import argtypes
from orchestrator.errors import FileInputError


def cmd_pki_init(args: argparse.Namespace) -> int:
    from orchestrator.emulator.pki import ROOT_KEY, VendorPKI

    if (Path(args.dir) / ROOT_KEY).exists():
        raise FileInputError(args.dir, "already holds a vendor PKI; refusing to overwrite")
    path = VendorPKI.create().save(args.dir)
    print(f"wrote {path} (trust this root) and {Path(args.dir) / ROOT_KEY} (0600)")
    return 0


def _load_card(path: str) -> Any:
    """The card of a card file, holding the program it keeps loaded, if any."""
    card, memory = _read_card(path)
    if memory is not None:
        _load_into(card, memory, path)
    return card


def _read_card(path: str) -> tuple[Any, dict[str, Any] | None]:
    """The card of a card file, and what its memory names (not loaded yet)."""
    from orchestrator.emulator.card import EmulatedCard
    from orchestrator.fileops.encrypt import read_file

    raw = read_file(path, "card file")
    try:
        state = json.loads(raw)
    except ValueError:
        state = None
    if not isinstance(state, dict):
        from orchestrator.errors import FormatError

        raise FormatError(path, "not an emulated card file")
    memory = state.get(_MEMORY)
    return (EmulatedCard.from_state(state, source=path),
            memory if isinstance(memory, dict) else None)


_MEMORY = "memory"  # the program a card file keeps loaded: body, id, partition, slots


def _load_into(card: Any, memory: dict[str, Any], source: str) -> list[str]:
    """Load the program ``memory`` names into ``card`` (decrypted and verified)."""
    from orchestrator.crypto.container import key_slots_from_proto
    from orchestrator.errors import FormatError
    from orchestrator.qpc.container import open_container

    try:
        slots = None
        if memory.get("key_slots"):
            from orchestrator._proto.modelip.v1 import evidence_pb2

            slots = key_slots_from_proto(evidence_pb2.KeySlotTable.FromString(
                bytes.fromhex(memory["key_slots"])), source=f"{source}: key slots")
        with open_container(memory["program_path"]) as container:
            names: list[str] = card.load(container, program_id=str(memory["program_id"]),
                                         partition=int(memory["partition"]), key_slots=slots)
        return names
    except (KeyError, TypeError, ValueError):
        raise FormatError(source, "its memory does not name a program") from None


def _save_card(card: Any, path: str, *, overwrite: bool = True,
               memory: dict[str, Any] | None = None) -> None:
    """The card file: created once (never over another file), then the card's own."""
    from orchestrator.atomicfile import write_bytes_atomic

    state = card.to_state()
    if memory is not None:
        state[_MEMORY] = memory
    data = (json.dumps(state, indent=1) + "\n").encode()
    write_bytes_atomic(path, data, mode=0o600, overwrite=overwrite)


def cmd_card_init(args: argparse.Namespace) -> int:
    from orchestrator.crypto.wrap import Kem
    from orchestrator.emulator.card import CardConfig, EmulatedCard
    from orchestrator.emulator.pki import VendorPKI

    pki = VendorPKI.load(args.pki)
    card = EmulatedCard(pki.issue_card(args.id),
                        CardConfig(firmware_version=args.firmware, kem=Kem.parse(args.kem)))
    _save_card(card, args.output, overwrite=False)
    print(f"wrote {args.output}: card {card.card_id!r}, boot {card.boot_counter}, "
          f"session {card.session_id.hex()[:16]}")
    return 0


def cmd_card_attest(args: argparse.Namespace) -> int:
    from orchestrator.atomicfile import write_bytes_atomic
    from orchestrator.fileops.targets import read_request

    card = _load_card(args.card)
    request = read_request(args.input)
    write_bytes_atomic(args.output, card.attest(request), overwrite=args.force)
    print(f"wrote {args.output}: evidence of card {card.card_id!r} boot {card.boot_counter}")
    return 0


def cmd_card_reset(args: argparse.Namespace) -> int:
    card, _ = _read_card(args.card)  # a reset works whatever its memory holds
    card.reset()
    _save_card(card, args.card)
    print(f"card {card.card_id!r} reset: boot {card.boot_counter}, new session "
          f"{card.session_id.hex()[:16]}")
    return 0


def cmd_card_load(args: argparse.Namespace) -> int:
    import base64

    from orchestrator.fileops.encrypt import read_file

    card = _load_card(args.card)
    memory = {"program_path": str(Path(args.qpc).resolve()),
              "program_id": args.program_id or Path(args.qpc).name,
              "partition": args.partition,
              "key_slots": read_file(args.key_slots, "key slots").hex()
              if args.key_slots else None}
    names = _load_into(card, memory, args.card)
    if args.json:
        receipt, signature = card.load_receipt()
        print(json.dumps({"segments": names, "receipt": base64.b64encode(receipt).decode(),
                          "receipt_signature": base64.b64encode(signature).decode()}))
    else:
        for name in names:
            print(f"loaded {name}  {len(card.program.segments[name])} bytes")
    # rollback floors are the card's persistent state; with --keep, so is the program
    _save_card(card, args.card, memory=memory if args.keep else None)
    card.unload()
    return 0


def cmd_card_unload(args: argparse.Namespace) -> int:
    card, memory = _read_card(args.card)
    if memory is None:
        from orchestrator.errors import ProgramNotLoaded

        raise ProgramNotLoaded(f"card {card.card_id!r}: no program loaded")
    _save_card(card, args.card)
    print(f"card {card.card_id!r}: program unloaded")
    return 0


def cmd_card_show(args: argparse.Namespace) -> int:
    shown = []
    for path in args.card:
        card = _load_card(path)
        program = card.program
        row: dict[str, Any] = {"card_id": card.card_id, "boot_counter": card.boot_counter,
                               "state": "LOADED" if program else "ONLINE",
                               "session_id": card.session_id.hex(),
                               "session_fingerprint": card.session_fingerprint.hex()}
        if program is not None:
            row.update(program_id=program.program_id, partition=program.partition)
        shown.append(row)
    if args.json:
        print(json.dumps(shown))
    else:
        for path, row in zip(args.card, shown, strict=True):
            print(f"{path}: card {row['card_id']!r} {row['state']} boot {row['boot_counter']} "
                  f"session {row['session_id'][:16]}"
                  + (f" program {row['program_id'][:16]} partition {row['partition']}"
                     if "program_id" in row else ""))
    return 0


def register(sub: Any) -> None:
    """Add pki and card to the main parser."""
    pki = sub.add_parser("pki", help="emulated card vendor PKI").add_subparsers(
        dest="pki_command", required=True, metavar="COMMAND")
    p = pki.add_parser("init", help="create an emulated vendor root in DIR")
    p.add_argument("dir")
    p.set_defaults(handler=cmd_pki_init)

    card = sub.add_parser("card", help="files-only emulated cards").add_subparsers(
        dest="card_command", required=True, metavar="COMMAND")
    p = card.add_parser("init", help="create an emulated card")
    p.add_argument("--pki", required=True, metavar="DIR")
    p.add_argument("--id", required=True)
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--firmware", default="1.12.0")
    p.add_argument("--kem", default="P256", help="P256 or hybrid (ML-KEM-768+X25519)")
    p.set_defaults(handler=cmd_card_init)
    p = card.add_parser("attest", help="write the card's attestation evidence")
    p.add_argument("card")
    p.add_argument("-i", "--input", metavar="REQUEST")
    p.add_argument("-o", "--output", default="report.dat")
    argtypes.add_force_flag(p)
    p.set_defaults(handler=cmd_card_attest)
    p = card.add_parser("reset", help="reboot the card: its session ends")
    p.add_argument("card")
    p.set_defaults(handler=cmd_card_reset)
    p = card.add_parser("load", help="load an encrypted QPC into the card's memory")
    p.add_argument("card")
    p.add_argument("qpc")
    p.add_argument("--partition", type=argtypes.device, default=0)
    p.add_argument("--key-slots", metavar="FILE",
                   help="a KeySlotTable (evidence.proto) to use instead of the QPC's own slots")
    p.add_argument("--program-id", help="the program's id (default: the QPC's file name)")
    p.add_argument("--keep", action="store_true",
                   help="the program stays loaded in the card file (until unload or reset)")
    p.add_argument("--json", action="store_true",
                   help="print the segments and the card's signed load receipt as JSON")
    p.set_defaults(handler=cmd_card_load)
    p = card.add_parser("unload", help="clear the program a card file keeps loaded")
    p.add_argument("card")
    p.set_defaults(handler=cmd_card_unload)
    p = card.add_parser("show", help="what cards are: identity, boot, session, program")
    p.add_argument("card", nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_card_show)
