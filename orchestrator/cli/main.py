"""Command-line front end: parses flags and calls into the product. Thin.

Every ModelIPError becomes one line on stderr and the error family's exit code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator import __version__
from orchestrator.cli import argtypes, keys
from orchestrator.cli.argtypes import OneLineParser
from orchestrator.errors import ModelIPError, UsageError

Handler = Callable[[argparse.Namespace], int]


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


# --- file-level commands ----------------------------------------------------------


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
                                insecure=args.insecure_unverified_key, warn=_err)


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
        _err("modelip: note: the wrapped MEKs are bound to card, session and slot, not to one "
             "program: any program sealed under this MEK at or above the card's rollback floor "
             "opens with them (--encrypted-qpc FILE|DIR binds them to that program)")
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
        _print_json(document)
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


def cmd_completion(args: argparse.Namespace) -> int:
    from orchestrator.cli.completion import bash_script, zsh_script

    parser = build_parser()
    print(bash_script(parser) if args.shell == "bash" else zsh_script(parser), end="")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from orchestrator.cli.samples import write_samples

    for name, what in write_samples(Path(args.dir), overwrite=args.force):
        print(f"wrote {Path(args.dir) / name}: {what}")
    return 0


# --- files-only emulated cards ------------------------------------------------------


# --- parser --------------------------------------------------------------------------


def _add_seal_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-id", help="model identity bound into the encryption "
                        "(default: the QPC file name)")
    parser.add_argument("--model-version", type=argtypes.version, default=1)
    parser.add_argument("--expires", help="when cards start refusing the model: an ISO "
                        "date/time (UTC unless it says) or a span from now (365d, 12h)")
    parser.add_argument("--min-firmware", help="cards with older firmware refuse the model")
    parser.add_argument("--rollback-floor", type=argtypes.version, default=None,
                        help="cards that load this refuse versions below it afterwards "
                        "(default: --model-version; lower only on purpose, with a warning)")
    parser.add_argument("--chunk-size", type=int, default=1 << 20, help=argparse.SUPPRESS)


def _add_key_flags(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--pub-keys", nargs="+", action="extend", required=required,
                        metavar="FILE", help="attestation evidence files, one per card/slot")
    parser.add_argument("--trust-root", metavar="PEM",
                        help="vendor root to verify evidence (default: $MODELIP_TRUST_ROOT, "
                             "else ~/.config/modelip/trust-root.pem, else "
                             "/etc/modelip/trust-root.pem)")
    parser.add_argument("--insecure-unverified-key", action="store_true",
                        help="wrap to keys whose evidence is not verified (prints a warning)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="modelip",
        description="Deploy encrypted AI models to fleets of attested accelerator cards "
                    "whose hosts are not trusted. `modelip COMMAND --help` shows a command's "
                    "flags and an example; the README walks through every command.")
    parser.add_argument("--version", action="version", version=f"modelip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=OneLineParser)

    keys.register(sub)

    p = sub.add_parser("encrypt-model", help="encrypt a QPC (and wrap to cards)")
    p.add_argument("--qpc", required=True)
    p.add_argument("--mek", required=True, metavar="FILE",
                   help="MEK file, or a sealed MEK (with the PKCS#11 options)")
    keys.add_token_flags(p)
    p.add_argument("--output-dir", required=True)
    _add_key_flags(p, required=False)
    _add_seal_flags(p)
    argtypes.add_force_flag(p)
    p.set_defaults(handler=cmd_encrypt_model)

    p = sub.add_parser("encrypt-with-session-keys", help="fully encrypted QPC from a body")
    p.add_argument("--input-dir", required=True)
    p.add_argument("--mek", required=True, metavar="FILE",
                   help="MEK file, or a sealed MEK (with the PKCS#11 options)")
    keys.add_token_flags(p)
    p.add_argument("--output-dir")
    _add_key_flags(p, required=True)
    argtypes.add_force_flag(p)
    p.set_defaults(handler=cmd_encrypt_with_session_keys)

    p = sub.add_parser("wrap-mek", help="wrap the MEK to each card's session key")
    p.add_argument("--mek", required=True, metavar="FILE",
                   help="MEK file, or a sealed MEK (with the PKCS#11 options)")
    keys.add_token_flags(p)
    p.add_argument("--encrypted-qpc", metavar="FILE|DIR",
                   help="bind the wrapped MEKs to this encrypted program (and no other); "
                        "without it they open any program under the MEK "
                        "(docs/protocol.md)")
    p.add_argument("--output-dir", required=True)
    _add_key_flags(p, required=True)
    argtypes.add_force_flag(p)
    p.set_defaults(handler=cmd_wrap_mek)

    p = sub.add_parser("replace-mek", help="swap key slots of an encrypted QPC")
    p.add_argument("--encrypted-qpc", required=True, metavar="FILE|DIR")
    p.add_argument("--wrapped-meks", required=True, nargs="+", action="extend", metavar="DIR")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--output-dir")
    group.add_argument("--in-place", action="store_true")
    argtypes.add_force_flag(p)
    p.set_defaults(handler=cmd_replace_mek)

    p = sub.add_parser("verify", help="owner check: the encrypted QPC decrypts")
    p.add_argument("--qpc", required=True)
    p.add_argument("--mek", required=True, metavar="FILE",
                   help="MEK file, or a sealed MEK (with the PKCS#11 options)")
    keys.add_token_flags(p)
    p.add_argument("--extract", metavar="DIR", help="write the decrypted segments here")
    argtypes.add_force_flag(p)
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("pack", help="build a plaintext QPC from files (or an MDP QPC)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--segment", action="append", metavar="NAME=FILE")
    p.add_argument("--partition", action="append", metavar="QPC",
                   help="partition containers in pipeline order (makes an MDP container)")
    argtypes.add_force_flag(p)
    p.set_defaults(handler=cmd_pack)

    p = sub.add_parser("completion", help="print shell completion: "
                       'eval "$(modelip completion bash)"')
    p.add_argument("shell", choices=["bash", "zsh"])
    p.set_defaults(handler=cmd_completion)

    p = sub.add_parser("sample", help="write small sample inputs: a model, its input, "
                       "segment files, a request")
    p.add_argument("dir", nargs="?", default=".", help="where (default: here)")
    argtypes.add_force_flag(p)
    p.set_defaults(handler=cmd_sample)

    p = sub.add_parser("package", help="ONNX model -> program container (N pipeline stages)")
    p.add_argument("model", metavar="MODEL.onnx",
                   help="a file, or package:PKG/PATH inside an installed Python package")
    p.add_argument("--partitions", type=argtypes.positive_int, default=1)
    p.add_argument("-o", "--output", default="programqpc.bin")
    p.add_argument("--balance", choices=["params", "flops"], default="params")
    argtypes.add_force_flag(p)
    p.set_defaults(handler=cmd_package)

    p = sub.add_parser("inspect", help="show a container's structure")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_inspect)

    from orchestrator.cli import cards, fleet, hosts, rollouts

    cards.register(sub)
    hosts.register(sub)
    fleet.register(sub)
    rollouts.register(sub)

    p = sub.add_parser("demo", help="watch the demo's emulated fleet for a while (make demo)")
    p.add_argument("--plan", help="another plan (default: the packaged demo plan, its state "
                                  "in $XDG_STATE_HOME/modelip/demo)")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_demo)
    from orchestrator.cli.help import document

    document(parser)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from orchestrator.cli import fleet
    from orchestrator.cli.demo import load_demo_plan

    args.metrics_port = args.store = None
    args.retry_quarantined = args.retry_rollout = args.plain = args.store_word = False
    plan = None if args.plan else load_demo_plan()
    return fleet.watch_plan(args, plan)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ModelIPError as err:
        _err(f"modelip: error: {err}")
        return err.exit_code
    except BrokenPipeError:  # the reader went away (`| head`, `| grep -q`): as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
        return 141
    except OSError as err:  # a path named on the command line, unusable as asked
        _err(f"modelip: error: {os_problem(err)}")
        return 2
    except UnicodeEncodeError as err:  # a name or identifier typed in bytes that are not UTF-8
        shown = err.object.encode("utf-8", "backslashreplace").decode("ascii", "replace") \
            if isinstance(err.object, str) else repr(err.object)
        _err(f"modelip: error: '{shown}': not valid UTF-8 text (names and identifiers must "
             "be; file names may be anything)")
        return 2
    except BaseExceptionGroup as group:  # concurrent work: report its first error
        first = _first_error(group)
        if isinstance(first, ModelIPError):
            _err(f"modelip: error: {first}")
            return first.exit_code
        if isinstance(first, OSError):
            _err(f"modelip: error: {os_problem(first)}")
            return 2
        raise
    except KeyboardInterrupt:
        _err("modelip: interrupted")
        return 130


def os_problem(err: OSError) -> str:
    """``PATH: the problem`` for an OSError (the target of a rename, not its temp file)."""
    name = err.filename2 or err.filename
    problem = {IsADirectoryError: "is a directory (a file is expected here)",
               NotADirectoryError: "a part of this path is not a directory",
               FileExistsError: "already exists (and is not what is expected here)",
               FileNotFoundError: "not found",
               PermissionError: "permission denied"}.get(type(err))
    problem = problem or (err.strerror or str(err)).lower()
    return f"{name}: {problem}" if name else problem


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first: BaseException = group
    while isinstance(first, BaseExceptionGroup) and first.exceptions:
        first = first.exceptions[0]
    return first


if __name__ == "__main__":
    raise SystemExit(main())
