"""Where what a plan names is: a file shipped inside an installed package
(``package:NAME/PATH``, found without importing anything), and whether a host
address stays on this machine (only those may go without TLS)."""

from __future__ import annotations

import importlib.machinery
import ipaddress
import os
import sys
from pathlib import Path

PACKAGE_SCHEME = "package:"


def is_loopback(address: str) -> bool:
    """Does ``address`` (host:port, [v6]:port, unix:PATH) stay on this machine?"""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or address.startswith("[") \
        else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def package_path(text: str) -> Path:
    """``package:onnx/backend/test/data/light/light_resnet50.onnx``: a file that ships
    inside an installed Python package (plans and `modelip package` accept these).
    LookupError if there is no such package."""
    package, _, inner = text[len(PACKAGE_SCHEME):].partition("/")
    if not package.isidentifier():
        # a dotted name would import its parent package to find it: code, run by a plan
        raise LookupError(f"{package!r} is not the name of a top-level package "
                          "(package:NAME/PATH, NAME without dots)")
    # found, never imported (importing runs the package's code); and only where packages
    # are installed, not in the working directory
    here = {"", ".", os.getcwd()}
    spec = importlib.machinery.PathFinder.find_spec(
        package, [entry for entry in sys.path if entry not in here])
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(f"no installed package {package!r}")
    root = Path(next(iter(spec.submodule_search_locations))).resolve()
    path = (root / inner).resolve()
    if not path.is_relative_to(root):
        raise LookupError(f"{text}: leaves the package {package!r}")
    return path


__all__ = ["PACKAGE_SCHEME", "is_loopback", "package_path"]
