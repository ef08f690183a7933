"""Command-line front end: parses flags and calls into the product. Thin.

Every ModelIPError becomes one line on stderr and the error family's exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator import __version__
from orchestrator.cli import argtypes, keys
from orchestrator.cli.argtypes import OneLineParser
from orchestrator.cli.files import (
    cmd_encrypt_model,
    cmd_encrypt_with_session_keys,
    cmd_inspect,
    cmd_pack,
    cmd_package,
    cmd_replace_mek,
    cmd_verify,
    cmd_wrap_mek,
)
from orchestrator.errors import ModelIPError

Handler = Callable[[argparse.Namespace], int]


def _err(message: str) -> None:
    print(message, file=sys.stderr)


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


# --- file-level commands ----------------------------------------------------------


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

    from orchestrator.cli import agent, api, applying, cards, fleet, hosts, rollouts, status

    cards.register(sub)
    hosts.register(sub)
    agent.register(sub)
    api.register(sub)
    fleet.register(sub)
    status.register(sub)
    rollouts.register(sub)
    applying.register(sub)

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
    args.replace_fleet = args.take_over = False
    args.api = None
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
