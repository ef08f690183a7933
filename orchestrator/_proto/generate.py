"""Regenerate orchestrator/_proto/ from protos/ (``make proto``).

Also importable by the staleness test: ``generate(into)`` writes the modules
into a directory so they can be compared with the committed ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOS = ROOT / "protos"
OUT = Path(__file__).resolve().parent


def generate(into: Path) -> list[Path]:
    """Run protoc on every .proto; imports rewritten into our package."""
    import grpc_tools
    from grpc_tools import protoc

    sources = sorted(PROTOS.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={into}",
        f"--pyi_out={into}",
        f"--grpc_python_out={into}",
        *[str(path) for path in sources],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = sorted(path for path in into.rglob("*_pb2*")  # not the compiled .pyc
                     if path.suffix in (".py", ".pyi"))
    for path in written:
        text = path.read_text()
        text = text.replace("from modelip.v1 import", "from orchestrator._proto.modelip.v1 import")
        path.write_text(text)
    for package in {path.parent for path in written} | {into / "modelip"}:
        init = package / "__init__.py"
        if not init.exists():
            init.write_text("")
    return written


if __name__ == "__main__":
    generate(OUT)
    sys.exit(0)
