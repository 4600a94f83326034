"""The Lua script that every operation of a Redis budget runs (EVALSHA, else EVAL).

It is written as five files under ``scripts/``, one concern each, and sent as one script (their
concatenation, in this order): ``args.lua`` (the keys and arguments, by name), ``state.lua``
(the state's fields as named locals, refill and reclaim), ``calls.lua`` (call ids and their
outcomes), ``operations.lua`` (one branch per operation) and ``main.lua`` (the order of a
call). The files are package data, read with :mod:`importlib.resources`.

The state stays one msgpack array under one key (a GET and a SET cost less than half of an
HMGET and an HSET of its fields), unpacked into named locals in one place (``load_state``) and
packed from them in one other (``save_state``): no code reads a field by its position. Named
locals, not a table keyed by names, and one function with a branch per operation, not a table
of closures, because the server runs the whole chunk on every call: each table and closure is
made again each time, which more than doubled the script's cost on the server.
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

_PARTS: Final = ("args.lua", "state.lua", "calls.lua", "operations.lua", "main.lua")


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
