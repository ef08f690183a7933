"""The reference tool's file-level commands (encrypt-model, encrypt-with-session-keys,
wrap-mek, replace-mek, verify, inspect, pack, package): flags in, one call into the
product (orchestrator/fileops/), one line or a JSON document out."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Any

from orchestrator.cli import keys
from orchestrator.errors import UsageError


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def _seal_settings(args: argparse.Namespace, default_id: str) -> Any:
    from orchestrator.crypto.container import ContentPolicy, SealSettings

    expires = _expiry(args.expires) if args.expires else 0
    if args.min_firmware:
        from orchestrator.crypto.evidence import parse_version

        parse_version(args.min_firmware)
    floor = args.model_version if args.rollback_floor is None else args.rollback_floor
    if floor < args.model_version:
        print(f"WARNING: --rollback-floor {floor} is below --model-version "
              f"{args.model_version}: cards will accept older versions", file=sys.stderr)
    return SealSettings(
        model_id=args.model_id or default_id,
        model_version=args.model_version,
        policy=ContentPolicy(not_after=expires, min_firmware=args.min_firmware or "",
                             rollback_floor=floor),
        chunk_size=args.chunk_size,
        workers=os.cpu_count() or 1,
    )


_SPAN = {"d": 86400, "h": 3600, "m": 60}


def _expiry(text: str) -> int:
    """--expires: an ISO date/time (UTC unless it says), or a span from now (365d, 12h,
    30m); a moment already past is refused (every card would refuse the model)."""
    now = dt.datetime.now(dt.UTC)
    number, unit = text[:-1], text[-1:].lower()
    if unit in _SPAN and number.isdigit():
        if int(number) == 0 or int(number) > 100 * 365:
            raise UsageError(f"--expires {text}: a span is 1 to {100 * 365} days (or hours, "
                             "minutes) from now")
        moment = now + dt.timedelta(seconds=int(number) * _SPAN[unit])
    else:
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            raise UsageError(f"--expires: {text!r} is not an ISO date/time (2030-06-30) nor a "
                             "span from now (365d, 12h, 30m)") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.UTC)
    if moment <= now:
        raise UsageError(f"--expires {text}: that moment has passed "
                         f"({moment:%Y-%m-%d %H:%M} UTC); every card would refuse the model")
    return int(moment.timestamp())


def _targets(args: argparse.Namespace) -> Any:
    from orchestrator.fileops.targets import load_session_targets

    return load_session_targets(args.pub_keys, trust_root=args.trust_root,
                                insecure=args.insecure_unverified_key, warn=_warn)


def cmd_encrypt_model(args: argparse.Namespace) -> int:
    from orchestrator.fileops.encrypt import encrypt_model

    mek = keys.mek_from_args(args)
    settings = _seal_settings(args, Path(args.qpc).stem)
    targets = _targets(args) if args.pub_keys else ()
    for path in encrypt_model(args.qpc, mek, args.output_dir, settings, targets=targets,
                              overwrite=args.force):
        print(f"wrote {path}")
    mek.wipe()
    return 0


def cmd_encrypt_with_session_keys(args: argparse.Namespace) -> int:
    from orchestrator.fileops.encrypt import encrypt_with_session_keys

    mek = keys.mek_from_args(args)
    path = encrypt_with_session_keys(args.input_dir, mek, _targets(args),
                                     out_dir=args.output_dir, overwrite=args.force)
    mek.wipe()
    print(f"wrote {path}")
    return 0


def cmd_wrap_mek(args: argparse.Namespace) -> int:
    from orchestrator.crypto.wrap import UNBOUND_PROGRAM
    from orchestrator.fileops.encrypt import program_for_wrap, wrap_mek_to_dir

    mek = keys.mek_from_args(args)
    if args.encrypted_qpc:
        program = program_for_wrap(args.encrypted_qpc, mek)
    else:
        program = UNBOUND_PROGRAM
        print("modelip: note: the wrapped MEKs are bound to card, session and slot, not to one "
              "program: any program sealed under this MEK at or above the card's rollback "
              "floor opens with them (--encrypted-qpc FILE|DIR binds them to that program)",
              file=sys.stderr)
    for path in wrap_mek_to_dir(mek, _targets(args), args.output_dir, program=program,
                                overwrite=args.force):
        print(f"wrote {path}")
    mek.wipe()
    return 0


def cmd_replace_mek(args: argparse.Namespace) -> int:
    from orchestrator.fileops.encrypt import replace_mek

    path = replace_mek(args.encrypted_qpc, args.wrapped_meks, out_dir=args.output_dir,
                       in_place=args.in_place, overwrite=args.force)
    print(f"{'patched' if args.in_place else 'wrote'} {path}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from orchestrator.fileops.verify import verify_program

    mek = keys.mek_from_args(args)
    summary = verify_program(args.qpc, mek, extract=args.extract, overwrite=args.force)
    mek.wipe()
    for segment in summary["segments"]:
        print(f"ok  {segment['name']}  {segment['size']} bytes")
    print(f"{args.qpc}: every segment decrypts and authenticates "
          f"(model {summary['model_id']!r})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from orchestrator.fileops.verify import inspect_container

    document = inspect_container(args.file)
    if args.json:
        print(json.dumps(document, indent=2, sort_keys=True))
        return 0
    print(f"{document['file']}: container {document['version']}, {document['size']} bytes, "
          f"{'encrypted' if document['encrypted'] else 'plaintext'}")
    for segment in document["segments"]:
        flag = "enc" if segment["encrypted"] else "   "
        print(f"  {flag} {segment['name']:<28} {segment['size']:>14,} bytes")
    if "encryption" in document:
        info = document["encryption"]
        print(f"  model {info['model_id']!r} version {info['model_version']}, "
              f"{info['aead']} chunks of {info['chunk_size']} bytes")
        policy = info["policy"]
        expires = (dt.datetime.fromtimestamp(policy["not_after"], dt.UTC)
                   .strftime("%Y-%m-%d %H:%M:%S UTC") if policy["not_after"] else "never")
        print(f"  policy: expires {expires}, min firmware "
              f"{policy['min_firmware'] or 'any'}, rollback floor {policy['rollback_floor']}")
    for slot in document.get("key_slots", []):
        program = f"program {slot['program'][:16]}" if slot["bound"] \
            else "any program under the MEK (unbound)"
        print(f"  key slot {slot['slot']}: card {slot['card_id']!r} session "
              f"{slot['session_id'][:16]} ({slot['kem']}), for {program}")
    if "io" in document:
        def tensors(specs: list[dict[str, Any]]) -> str:
            return ", ".join(f"{t['name']} {t['dtype']} {list(t['shape'])}" for t in specs)
        print(f"  inputs: {tensors(document['io']['inputs'])}; "
              f"outputs: {tensors(document['io']['outputs'])}")
    if "mdp" in document:
        for part in document["mdp"]["partitions"]:
            print(f"  partition {part['index']}: {part['segment']} cost "
                  f"{part['cost_share']:.1%}, {part['crossing_bytes']:,} bytes to next")
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from orchestrator.qpc.build import pack_files, pack_mdp

    if args.partition and args.segment:
        raise UsageError("pack: give --segment (plain) or --partition (MDP), not both")
    if args.partition:
        size = pack_mdp(args.output, args.partition, overwrite=args.force)
    else:
        pairs = []
        for item in args.segment or []:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise UsageError(f"--segment {item!r}: expected NAME=FILE")
            pairs.append((name, path))
        size = pack_files(args.output, pairs, overwrite=args.force)
    print(f"wrote {args.output} ({size} bytes)")
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    from orchestrator.plan.paths import PACKAGE_SCHEME, package_path
    from orchestrator.qpc.partition import describe, package_onnx

    model = args.model
    if model.startswith(PACKAGE_SCHEME):
        try:
            model = str(package_path(model))
        except LookupError as err:
            raise UsageError(f"{args.model}: {err}") from None
    plan = package_onnx(model, args.output, partitions=args.partitions,
                        balance=args.balance, overwrite=args.force)
    kind = "MDP container" if args.partitions > 1 else "container"
    print(f"wrote {args.output}: {kind} of {len(plan.stages)} stage(s)")
    for line in describe(plan):
        print(f"  {line}")
    return 0
