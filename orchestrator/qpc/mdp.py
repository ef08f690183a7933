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
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise FormatError(source, "mdp_meta_info is not valid MDP metadata") from None
        if not partitions:
            raise FormatError(source, "mdp_meta_info lists no partitions")
        for position, partition in enumerate(partitions):
            if partition.index != position:
                raise FormatError(source, "mdp_meta_info partitions are not in order")
            check_segment_name(partition.segment)
        if len({p.segment for p in partitions}) != len(partitions):
            raise FormatError(source, "mdp_meta_info names a segment twice")
        return meta


def _tensors(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(str(t["name"]), str(t["dtype"]), tuple(t.get("shape", []))) for t in items
    )


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
