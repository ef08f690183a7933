"""React to card resets through modelip's control API (docs/api.md).

Watches the fleet's changes and prints, for each card that was reset, how long it
took to be serving again. Its last revision is kept in a file: stopped and started
again, it resumes where it left off, missing nothing and repeating nothing. If it
was away longer than the history kept, it says so and starts from the fleet as it
is now.

    python examples/react_to_resets.py --api 127.0.0.1:62480 --state resets.rev
"""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

import grpc

from orchestrator._proto.modelip.v1 import control_pb2, control_pb2_grpc

C = control_pb2.Change
BACK = "SERVING"
AWAY = ("REKEYING", "ATTESTING", "DISCONNECTED")   # a card on its way back from a reset


def save(state: Path, revision: int) -> None:
    temporary = state.with_suffix(".tmp")
    temporary.write_text(f"{revision}\n")
    os.replace(temporary, state)   # a crash leaves the old revision or the new, never half


async def watch(api: str, state: Path, since: int | None) -> bool:
    """Watch from ``since`` (None: the fleet as it is); False if that revision is no
    longer kept."""
    left: dict[tuple[str, int], float] = {}   # card -> when it left SERVING
    async with grpc.aio.insecure_channel(api) as channel:
        stub = control_pb2_grpc.ControlStub(channel)
        request = control_pb2.WatchRequest() if since is None else \
            control_pb2.WatchRequest(since=since)
        try:
            async for batch in stub.Watch(request):   # changes come in batches
                for change in batch.changes:
                    if change.type == C.CARD and change.ts:   # a change (not the snapshot)
                        card = change.card
                        key = (card.host, card.device)
                        if card.previous == BACK and card.state in AWAY:
                            left[key] = change.ts
                        elif card.state == BACK and key in left:
                            print(f"{card.host}/{card.device} {card.card_id} (boot "
                                  f"{card.boot_counter}) re-keyed {change.ts - left.pop(key):.2f} "
                                  f"s after it left serving (revision {change.revision})",
                                  flush=True)
                save(state, batch.changes[-1].revision)   # done with it: resume after it
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.OUT_OF_RANGE:
                raise
            print(f"away too long ({err.details()}); starting from the fleet as it is",
                  flush=True)
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--api", required=True)
    parser.add_argument("--state", required=True, type=Path,
                        help="where the last revision seen is kept")
    args = parser.parse_args()
    since = int(args.state.read_text()) if args.state.exists() else None
    try:
        while not asyncio.run(watch(args.api, args.state, since)):
            since = None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
