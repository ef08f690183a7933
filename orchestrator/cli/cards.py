"""pki init and card init|attest|reset|load: files-only emulated cards, for the
file-level commands' examples and tests (a card's state lives in its JSON file)."""

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
    return EmulatedCard.from_state(state, source=path)


def _save_card(card: Any, path: str, *, overwrite: bool = True) -> None:
    """The card file: created once (never over another file), then the card's own."""
    from orchestrator.atomicfile import write_bytes_atomic

    data = (json.dumps(card.to_state(), indent=1) + "\n").encode()
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
    card = _load_card(args.card)
    card.reset()
    _save_card(card, args.card)
    print(f"card {card.card_id!r} reset: boot {card.boot_counter}, new session "
          f"{card.session_id.hex()[:16]}")
    return 0


def cmd_card_load(args: argparse.Namespace) -> int:
    from orchestrator.qpc.container import open_container

    card = _load_card(args.card)
    with open_container(args.qpc) as container:
        names = card.load(container, program_id=Path(args.qpc).name, partition=args.partition)
    for name in names:
        print(f"loaded {name}  {len(card.program.segments[name])} bytes")
    _save_card(card, args.card)  # rollback floors are the card's persistent state
    card.unload()
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
    p.set_defaults(handler=cmd_card_load)
