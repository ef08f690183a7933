"""The committed generated code in orchestrator/_proto matches protos/."""

from __future__ import annotations

from pathlib import Path

from orchestrator._proto.generate import OUT, generate


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert written, "protoc produced nothing"
    for fresh in written:
        committed = OUT / fresh.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `make proto`"
        assert committed.read_text() == fresh.read_text(), f"{committed} is stale: run `make proto`"
