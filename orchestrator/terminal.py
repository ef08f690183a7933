"""What may reach an operator's terminal from a host or a store.

Every string a host sends (status details, card ids, program ids, segment and
tensor names) and every string read back from a store is hostile input: an
escape sequence in it would set the terminal's title, write its clipboard
(OSC 52), rewrite what the operator sees or hide a line. ``terminal_safe`` is
applied once, where such text enters (transport/client.py, the stores' record
readers, the evidence parser), so no view can forget it (docs/security.md).
"""

from __future__ import annotations

import re

# C0 controls (ESC, BEL, CR, backspace...), DEL, C1 controls (0x80-0x9f: CSI and OSC
# in 8 bits), Unicode bidirectional overrides and isolates (text shown reordered),
# and lone surrogates (bytes that were not UTF-8).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def terminal_safe(text: str, limit: int = 500) -> str:
    """``text`` with every control character shown as an escape (ESC -> ``\\x1b``),
    cut to ``limit`` characters. Never raises."""
    text = str(text)[:limit]
    return _UNSAFE.sub(lambda match: f"\\x{ord(match.group()):02x}"
                       if ord(match.group()) < 0x100 else f"\\u{ord(match.group()):04x}", text)
