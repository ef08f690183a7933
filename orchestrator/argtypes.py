"""Argument types of the command line: a value out of range is one clear line, exit 2,
before anything starts (argparse calls these; ``OneLineParser`` prints the error)."""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import NoReturn


def port(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text}: a port is 0-65535 (0: any free port)")
    return value


def device(text: str) -> int:
    value = _integer(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: a device number is 0 or more")
    return value


def positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be 1 or more")
    return value


def non_negative(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: must not be negative")
    return value


def positive(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: must be greater than 0")
    return value


def probability(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a probability is between 0 and 1")
    return value


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
