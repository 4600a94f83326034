"""The Lua script that every operation of a Redis budget runs (EVALSHA, else EVAL).

It is written as four files under ``scripts/``, one concern each, and sent as one script (their
concatenation, in this order): ``state.lua`` (the keys, the named state fields, refill and
reclaim), ``calls.lua`` (call ids and their outcomes), ``operations.lua`` (one function per
operation) and ``main.lua`` (the arguments, by name, and the order of a call). The files are
package data, read with :mod:`importlib.resources`.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from typing import Final

__all__ = [
    "DENIED",
    "DONE",
    "EXTEND",
    "GIVE",
    "KEEP_SECONDS",
    "LEASE",
    "MISMATCH",
    "MISSING",
    "REFILL",
    "SCRIPT",
    "SETTLE",
    "SHA",
    "SNAPSHOT",
    "TAKE",
    "UNLEASE",
    "VOID",
]

_PARTS: Final = ("state.lua", "calls.lua", "operations.lua", "main.lua")


def _load() -> str:
    folder = resources.files("costbound.redis") / "scripts"
    return "\n".join(folder.joinpath(part).read_text(encoding="utf-8") for part in _PARTS)


SCRIPT: Final = _load()
SHA: Final = hashlib.sha1(SCRIPT.encode()).hexdigest()

#: How long the server keeps at least the outcome of a call, to answer a repeat of it: the
#: lease duration when that is longer (spec section 15).
KEEP_SECONDS: Final = 600

# Operations (operations.lua), sent by name; bytes, which redis-py passes through as they are.
TAKE: Final = b"take"
LEASE: Final = b"lease"
GIVE: Final = b"give"
SETTLE: Final = b"settle"
UNLEASE: Final = b"unlease"
EXTEND: Final = b"extend"
REFILL: Final = b"refill"
VOID: Final = b"void"
SNAPSHOT: Final = b"snapshot"

# The first element of a reply.
DONE: Final = 1
DENIED: Final = 0
MISSING: Final = 3
MISMATCH: Final = -1
