"""Key-custody commands: generate-mek (a file, or sealed by a PKCS#11 token), hsm
init-kek, hsm wrap-existing, and how every --mek is read (docs/keys.md)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from orchestrator.errors import UsageError


def cmd_generate_mek(args: argparse.Namespace) -> int:
    from orchestrator.crypto.mek import MEK, write_mek

    token = _token(args)
    if token is not None:
        from orchestrator.crypto.custody import seal, write_sealed_mek

        if args.hex:
            raise UsageError("generate-mek: --hex is for MEK files, not sealed MEKs")
        _refuse_existing(args.output)
        blob, mek = seal(token)
        write_sealed_mek(args.output, blob)
        print(f"wrote {args.output} (128-bit MEK from the token's generator, sealed under "
              f"{token.describe()}, fingerprint {mek.fingerprint()})")
        mek.wipe()
        return 0
    mek = MEK.generate()
    write_mek(args.output, mek, hex_form=args.hex)
    print(f"wrote {args.output} (128-bit MEK, mode 0600, fingerprint {mek.fingerprint()})")
    return 0


def cmd_hsm_init_kek(args: argparse.Namespace) -> int:
    from orchestrator.crypto.custody import init_kek

    token = _token(args, required=True)
    assert token is not None  # noqa: S101 - required
    init_kek(token)
    print(f"created {token.describe()}: AES-256, sensitive, not extractable")
    return 0


def cmd_hsm_wrap_existing(args: argparse.Namespace) -> int:
    from orchestrator.crypto.custody import seal, write_sealed_mek
    from orchestrator.crypto.mek import load_mek

    token = _token(args, required=True)
    assert token is not None  # noqa: S101 - required
    mek = load_mek(args.mek)
    _refuse_existing(args.output)
    blob, _ = seal(token, mek)
    write_sealed_mek(args.output, blob)
    print(f"wrote {args.output}: MEK {mek.fingerprint()} sealed under {token.describe()} "
          f"(the plaintext file {args.mek} is still there: remove it when you are ready)")
    mek.wipe()
    return 0


def _refuse_existing(path: str) -> None:
    if os.path.lexists(path):
        raise UsageError(f"{path}: exists already; refusing to overwrite a key")


def _token(args: argparse.Namespace, *, required: bool = False) -> Any:
    """The token options, all or none (``required``: all)."""
    from orchestrator.crypto.custody import TokenSpec

    given = [args.pkcs11_module, args.token, args.kek]
    if not any(given) and not required:
        return None
    if not all(given):
        raise UsageError("give --pkcs11-module, --token and --kek together")
    return TokenSpec(args.pkcs11_module, args.token, args.kek, args.pin_env)


def mek_from_args(args: argparse.Namespace) -> Any:
    """--mek FILE: a MEK file, or a sealed MEK opened by the token named by the flags."""
    import sys

    from orchestrator.crypto.custody import is_sealed, unseal
    from orchestrator.crypto.mek import exposure_warning, load_mek

    try:
        with open(args.mek, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        head = b""  # load_mek says what is wrong with the path
    if not is_sealed(head):
        mek = load_mek(args.mek)
        if (warning := exposure_warning(args.mek)) is not None:
            print(warning, file=sys.stderr)
        return mek
    token = _token(args)
    if token is None:
        raise UsageError(f"{args.mek}: is a sealed MEK; give --pkcs11-module, --token and "
                         "--kek (PIN in $MODELIP_PKCS11_PIN or --pin-env)")
    return unseal(args.mek, token)


def add_token_flags(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    group = parser.add_argument_group("PKCS#11 key custody (docs/keys.md)")
    group.add_argument("--pkcs11-module", metavar="PATH", required=required,
                       help="the token's PKCS#11 library, e.g. /usr/lib/softhsm/libsofthsm2.so")
    group.add_argument("--token", metavar="LABEL", required=required, help="token label")
    group.add_argument("--kek", metavar="LABEL", required=required,
                       help="label of the key-encryption key in the token")
    group.add_argument("--pin-env", metavar="VAR", default="MODELIP_PKCS11_PIN",
                       help="environment variable holding the user PIN "
                       "(default MODELIP_PKCS11_PIN; never a flag value)")


def register(sub: Any) -> None:
    p = sub.add_parser("generate-mek", help="write a fresh 128-bit MEK (mode 0600)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--hex", action="store_true", help="write 32 hex digits instead of raw")
    add_token_flags(p)
    p.set_defaults(handler=cmd_generate_mek)

    hsm = sub.add_parser("hsm", help="key custody in a PKCS#11 token").add_subparsers(
        dest="hsm_command", required=True, metavar="COMMAND")
    p = hsm.add_parser("init-kek", help="create the key-encryption key in the token")
    add_token_flags(p, required=True)
    p.set_defaults(handler=cmd_hsm_init_kek)
    p = hsm.add_parser("wrap-existing", help="bring an existing MEK file into custody")
    p.add_argument("--mek", required=True, metavar="FILE")
    p.add_argument("-o", "--output", required=True, metavar="SEALED")
    add_token_flags(p, required=True)
    p.set_defaults(handler=cmd_hsm_wrap_existing)
