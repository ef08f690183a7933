"""Numpy arrays from files: inference inputs, expected outputs (one reader for all)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.errors import FileInputError, FormatError


def read_arrays(path: str | Path) -> dict[str, Any]:
    """An .npz by name, or an .npy under the name ``""`` (the caller names it).
    FileInputError if missing, FormatError if not numpy (pickles refused)."""
    import numpy as np

    try:
        with open(path, "rb") as handle:
            if str(path).endswith(".npz"):
                with np.load(handle, allow_pickle=False) as archive:
                    return {name: archive[name] for name in archive.files}
            return {"": np.load(handle, allow_pickle=False)}
    except FileNotFoundError:
        raise FileInputError(str(path), "input file not found") from None
    except (ValueError, OSError) as err:
        raise FormatError(str(path), f"not a numpy .npy/.npz file ({err})") from None
