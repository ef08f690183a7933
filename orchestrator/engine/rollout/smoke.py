"""The smoke inference's verdict: a rollout's new version on a group passes when its outputs
are finite, or match the expected outputs within the tolerances the plan gives."""

from __future__ import annotations

from typing import Any


def smoke_verdict(outputs: dict[str, Any], expect: dict[str, Any] | None, *, rtol: float,
                  atol: float, group: int) -> str | None:
    """None if the outputs pass; else what is wrong, in one line."""
    import numpy as np

    if expect is None:
        for name, value in outputs.items():
            if not np.all(np.isfinite(value)):
                return f"smoke on group {group}: output {name!r} is not finite"
        return None
    if set(expect) == {""} and len(outputs) == 1:
        expect = {next(iter(outputs)): expect[""]}
    for name, wanted in expect.items():
        got = outputs.get(name)
        if got is None:
            return f"smoke on group {group}: the model has no output {name!r}"
        if got.shape != wanted.shape:
            return (f"smoke on group {group}: output {name!r} has shape {list(got.shape)}, "
                    f"expected {list(wanted.shape)}")
        if not np.allclose(got, wanted, rtol=rtol, atol=atol):
            worst = float(np.max(np.abs(got.astype(np.float64) - wanted)))
            return (f"smoke on group {group}: output {name!r} differs from the expected "
                    f"(largest difference {worst:.3g}, rtol {rtol:g}"
                    f"{f', atol {atol:g}' if atol else ''})")
    return None
