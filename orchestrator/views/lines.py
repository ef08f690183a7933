"""One plain line per engine event: what `deploy` and `watch` print when their output is a
pipe or a log, not a terminal (--json prints the events themselves)."""

from __future__ import annotations

import datetime as dt

from orchestrator.engine.events import (
    CardChanged,
    Deployed,
    Event,
    HintDisproved,
    HostChanged,
    InternalError,
    LeaseChanged,
    Placed,
    ProtocolViolation,
    Rekeyed,
    RolloutChanged,
    Staged,
    StoreStatus,
)


def event_line(event: Event) -> str:
    stamp = dt.datetime.fromtimestamp(event.ts, dt.UTC).strftime("%H:%M:%S")
    match event:
        case CardChanged():
            reason = f" ({event.reason})" if event.reason else ""
            return (f"{stamp} {event.host}/{event.device} {event.previous} -> "
                    f"{event.state}{reason}")
        case HostChanged():
            reason = f" ({event.reason})" if event.reason else ""
            return f"{stamp} host {event.host} {event.previous} -> {event.state}{reason}"
        case Rekeyed():
            return (f"{stamp} {event.host}/{event.device} serving again after "
                    f"{event.outage_ms:.0f} ms")
        case HintDisproved():
            return f"{stamp} {event.host}/{event.device} {event.trigger} disproved (same session)"
        case Staged():
            return (f"{stamp} {event.host} program {event.program_id} "
                    f"{'already staged' if event.already_staged else 'staged'}")
        case ProtocolViolation():
            return f"{stamp} host {event.host} protocol violation: {event.what} (x{event.count})"
        case InternalError():
            return f"{stamp} internal error in {event.where}: {event.error}"
        case LeaseChanged():
            whom = f" from {event.previous_owner}" if event.previous_owner else ""
            why = f" ({event.reason})" if event.reason else ""
            return f"{stamp} {event.replica} {event.action} host {event.host}{whom}{why}"
        case StoreStatus():
            said = "answers again" if event.reachable else f"unreachable: {event.reason}"
            return f"{stamp} store {said}"
        case Placed():
            moved = "; ".join(filter(None, (
                f"placed on {', '.join(event.added)}" if event.added else "",
                f"no longer on {', '.join(event.removed)}" if event.removed else "")))
            return f"{stamp} deployment {event.deployment}: {moved} ({event.why})"
        case RolloutChanged():
            whose = f" {event.deployment}" if event.deployment else ""
            return (f"{stamp} rollout{whose} {event.from_version} -> {event.to_version} wave "
                    f"{event.wave}/{event.waves} {event.phase}: {event.what}")
        case Deployed():
            return (f"{stamp} settled in {event.seconds} s: {event.serving} serving, "
                    f"{event.disconnected} disconnected, {event.quarantined} quarantined, "
                    f"{event.failed} failed")
    return f"{stamp} {event.KIND}"
