"""Argument types of the command line: a value out of range is one clear line, exit 2,
before anything starts (argparse calls these; ``OneLineParser`` prints the error)."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable
from typing import NoReturn, TypeVar

from orchestrator.limits import MAX_CARDS_PER_HOST, MAX_DEVICE, MAX_HOSTS, MAX_VERSION

T = TypeVar("T")


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _checked(name: str, parse: Callable[[str], T], ok: Callable[[T], bool], why: str
             ) -> Callable[[str], T]:
    """An argument type: ``parse`` the text, refuse it with ``why`` unless ``ok``."""
    def check(text: str) -> T:
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text}: {why}")
        return value
    check.__name__ = name  # argparse names the type in some messages
    return check


port = _checked("port", _integer, lambda v: 0 <= v <= 65535,
                "a port is 0-65535 (0: any free port)")
device = _checked("device", _integer, lambda v: 0 <= v <= MAX_DEVICE,
                  f"a device number is 0 to {MAX_DEVICE}")
revision = _checked("revision", _integer, lambda v: 0 <= v < 1 << 63,
                    "a revision is a whole number, 0 or more")
positive_int = _checked("positive_int", _integer, lambda v: v >= 1,
                        "must be 1 or more")
non_negative = _checked("non_negative", _number, lambda v: v >= 0,
                        "must not be negative")
positive = _checked("positive", _number, lambda v: v > 0,
                    "must be greater than 0")
version = _checked("version", _integer, lambda v: 1 <= v <= MAX_VERSION,
                   f"a version is a whole number from 1 to {MAX_VERSION}")
host_count = _checked("host_count", _integer, lambda v: 1 <= v <= MAX_HOSTS,
                      f"from 1 to {MAX_HOSTS} hosts")
cards_per_host = _checked("cards_per_host", _integer, lambda v: 1 <= v <= MAX_CARDS_PER_HOST,
                          f"from 1 to {MAX_CARDS_PER_HOST} cards per host")
probability = _checked("probability", _number, lambda v: 0 <= v <= 1,
                       "a probability is between 0 and 1")


def add_force_flag(parser: argparse.ArgumentParser) -> None:
    """``--force``: the one way to let a command replace files that already exist."""
    parser.add_argument("--force", action="store_true",
                        help="replace outputs that already exist (without it, a command "
                             "refuses them before writing anything)")


def host_address(text: str) -> str:
    """A host name or IP address without a port (the port has its own flag)."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and ":" not in host.strip("[]"):
        raise argparse.ArgumentTypeError(f"{text}: give the address alone and the port with "
                                         f"--port {port}")
    if not text.strip() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name or address")
    return text


class OneLineParser(argparse.ArgumentParser):
    """Usage errors in one line naming the command and the problem (and, for an
    unknown command, the nearest one), exit 2; `--help` still shows everything."""

    def error(self, message: str) -> NoReturn:
        if "invalid choice:" in message and "choose from" in message \
                and self._subparsers is not None:
            wrong = message.split("invalid choice:", 1)[1].split("(", 1)[0].strip(" '")
            known = [c.strip(" '") for c in message.split("choose from", 1)[1]
                     .strip(" )").split(",")]
            near = difflib.get_close_matches(wrong, known, n=1)
            message = f"unknown command {wrong!r}" + (f": did you mean {near[0]!r}?"
                                                       if near else "")
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
