"""Multi-device (MDP) containers: the ``mdp_meta_info`` encoding (docs/formats.md).

An MDP container is an outer container whose ``mdp_meta_info`` segment (UTF-8
JSON, plaintext) lists the partitions in pipeline order; each partition is an
inner container stored as its own segment.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import FormatError
from orchestrator.qpc.container import Container, check_segment_name

MDP_META = "mdp_meta_info"
MDP_FORMAT = "modelip-mdp/1"
MAX_META_BYTES = 4 << 20
MAX_PARTITIONS = 256
MAX_TENSORS = 4096
MAX_DEPTH = 16  # the format nests 4 deep; JSON deeper than this is refused unparsed


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True, slots=True)
class Partition:
    """One pipeline stage: its segment and the tensors that enter and leave it."""

    index: int
    segment: str
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    cost_share: float = 0.0
    crossing_bytes: int = 0  # bytes of the tensors leaving this stage for the next


@dataclass(frozen=True, slots=True)
class MdpMeta:
    partitions: tuple[Partition, ...]
    model_inputs: tuple[TensorSpec, ...] = ()
    model_outputs: tuple[TensorSpec, ...] = ()
    balance: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        document = {
            "format": MDP_FORMAT,
            "balance": self.balance,
            "model_inputs": [t.to_json() for t in self.model_inputs],
            "model_outputs": [t.to_json() for t in self.model_outputs],
            "partitions": [
                {
                    "index": p.index,
                    "segment": p.segment,
                    "inputs": [t.to_json() for t in p.inputs],
                    "outputs": [t.to_json() for t in p.outputs],
                    "cost_share": p.cost_share,
                    "crossing_bytes": p.crossing_bytes,
                }
                for p in self.partitions
            ],
        }
        return json.dumps(document, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def decode(cls, raw: bytes, *, source: str) -> MdpMeta:
        """Parse and check an mdp_meta_info segment; FormatError if malformed."""
        if len(raw) > MAX_META_BYTES:
            raise FormatError(source, "mdp_meta_info is larger than 4 MiB")
        if _nesting(raw) > MAX_DEPTH:
            raise FormatError(source, f"mdp_meta_info nests deeper than {MAX_DEPTH} levels")
        try:
            document = json.loads(raw.decode("utf-8"))
            if document.get("format") != MDP_FORMAT:
                raise FormatError(source, f"mdp_meta_info format is not {MDP_FORMAT}")
            partitions = tuple(
                Partition(
                    index=int(item["index"]),
                    segment=str(item["segment"]),
                    inputs=_tensors(item.get("inputs", [])),
                    outputs=_tensors(item.get("outputs", [])),
                    cost_share=float(item.get("cost_share", 0.0)),
                    crossing_bytes=int(item.get("crossing_bytes", 0)),
                )
                for item in document["partitions"]
            )
            meta = cls(
                partitions=partitions,
                model_inputs=_tensors(document.get("model_inputs", [])),
                model_outputs=_tensors(document.get("model_outputs", [])),
                balance=str(document.get("balance", "")),
            )
        except FormatError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError,
                OverflowError, RecursionError):
            raise FormatError(source, "mdp_meta_info is not valid MDP metadata") from None
        if not partitions:
            raise FormatError(source, "mdp_meta_info lists no partitions")
        if len(partitions) > MAX_PARTITIONS:
            raise FormatError(source, f"mdp_meta_info lists more than {MAX_PARTITIONS} "
                              "partitions")
        for position, partition in enumerate(partitions):
            if partition.index != position:
                raise FormatError(source, "mdp_meta_info partitions are not in order")
            check_segment_name(partition.segment)
        if len({p.segment for p in partitions}) != len(partitions):
            raise FormatError(source, "mdp_meta_info names a segment twice")
        return meta


def _nesting(raw: bytes) -> int:
    """The deepest bracket nesting of a JSON text (brackets inside strings ignored)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _tensors(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    if len(items) > MAX_TENSORS:
        raise ValueError("too many tensors")
    return tuple(
        TensorSpec(str(t["name"]), str(t["dtype"]), _shape(t.get("shape", []))) for t in items
    )


def _shape(dims: list[Any]) -> tuple[int | str, ...]:
    if not isinstance(dims, list) or len(dims) > 32:
        raise ValueError("shape")
    return tuple(d if isinstance(d, int | str) and not isinstance(d, bool) else str(d)
                 for d in dims)


def read_mdp_meta(container: Container) -> MdpMeta | None:
    """The container's MDP metadata, or None for a plain (single-device) container.

    Raises FormatError if the metadata names segments the container lacks.
    """
    if not container.has(MDP_META):
        return None
    meta = MdpMeta.decode(container.read(MDP_META), source=container.label)
    for partition in meta.partitions:
        if not container.has(partition.segment):
            raise FormatError(container.label,
                              f"MDP partition {partition.index} segment "
                              f"{partition.segment!r} is missing")
    return meta


def partition_segment_name(index: int) -> str:
    return f"partition_{index}.qpc"
