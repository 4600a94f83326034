"""The one Lua script that every operation of a Redis budget runs (EVALSHA, else EVAL).

Keys (one hash tag, so one cluster slot): ``{name}`` the state (one msgpack array: a GET and a
SET cost less than half of an HMGET and an HSET of its fields), ``{name}:leases`` a sorted
set of leases (member ``id|amount``, score the expiry in server microseconds), ``{name}:done``
a sorted set of settled reservation ids (score: when the tombstone may go).

State, in order (one msgpack array): ``kind`` (``u`` unit, ``t`` tokens), ``cap``, ``rp``/``rq``
(the rate as the fraction rp/rq units per second), ``bal`` (available - debt), ``con``
(consumed), ``ts`` (last refill, server microseconds), ``car`` (the refill's carried fraction,
in 1/(rq*10^6) units),
``held`` and ``nl`` (sum and number of the leases), ``rec`` (leases reclaimed so far), ``wt``
(until when a waiter wants messages on the ``{name}:room`` channel), ``nx`` and ``tn`` (never
later than the earliest lease expiry and tombstone expiry: the scans run only when one is due).

Lua numbers are doubles: every integer here stays at or below 2**53 - 1 (the client caps
capacities, amounts and rates so), which keeps the arithmetic exact. The refill splits the
elapsed time so that no product exceeds 2**53 either (rq * (rp + 1) < 2**33).

ARGV: the operation plus 16 times the flags (one argument: with redis.asyncio each argument costs
about a microsecond); then kind, cap, rp, rq when the flags have CONF; then the pending refunds
as pairs (lease member, amount); then the operation's own arguments. A lease member is
``id|amount``, so the amount never travels twice. Flags: 1 a waiter wants a message when room
appears; 2 the configuration follows; 4 check it against the stored one; 8 store it; and 16
times the number of pending refunds.

Replies: ``{1, ...}`` done or granted, ``{0, micros, cap}`` denied (micros until the rate makes
it fit, -1 if it never will by rate alone), ``{2}`` already settled, ``{3}`` the budget does not
exist and no configuration came to create it, ``{-1, kind, cap, rp, rq}`` the stored
configuration differs.
"""

from __future__ import annotations

import hashlib

#: How long the server remembers a settled reservation, to answer a retried ``record_usage``.
TOMBSTONE_SECONDS = 900
TOMBSTONE_MICROS = TOMBSTONE_SECONDS * 1_000_000

__all__ = [
    "CONF",
    "EXTEND",
    "GIVE",
    "LEASE",
    "PENDING",
    "REFILL",
    "SCRIPT",
    "SETTLE",
    "SHA",
    "SNAP",
    "STORE",
    "TAKE",
    "TOMBSTONE_SECONDS",
    "UNLEASE",
    "VERIFY",
    "WAITING",
]

# Operations (the low four bits of ARGV[1]).
TAKE, LEASE, GIVE, SETTLE, UNLEASE, EXTEND, REFILL, SNAP = range(1, 9)
# Flags (ARGV[1] // 16).
WAITING = 1
CONF = 2
VERIFY = 4
STORE = 8
PENDING = 16  # times the number of pending refunds

SCRIPT = r"""
local S, L, D = KEYS[1], KEYS[2], KEYS[3]
local code = tonumber(ARGV[1])
local op, flags = code % 16, math.floor(code / 16)
local conf = math.floor(flags / 2) % 2 == 1
local n = math.floor(flags / 16)
local a = 2
if conf then a = 6 end
local MAX = 9007199254740991
local TOMBSTONE = @TOMBSTONE@
-- v: 1 kind, 2 cap, 3 rp, 4 rq, 5 bal, 6 con, 7 ts, 8 car, 9 held, 10 nl, 11 rec, 12 wt, 13 nx,
-- 14 tn (locals and an array: a table keyed by names costs twice as much per call)
local v, dirty, room, now

local function clock()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return now
end

local raw = redis.call('GET', S)
if not raw then
  if not conf then return {3} end
  local cap = tonumber(ARGV[3])
  v = {ARGV[2], cap, tonumber(ARGV[4]), tonumber(ARGV[5]), cap, 0, clock(), 0, 0, 0, 0, 0, 0, 0}
  dirty = true
else
  v = {cmsgpack.unpack(raw)}
  if conf then
    local cap, rp, rq = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
    if v[1] ~= ARGV[2] or v[2] ~= cap or v[3] ~= rp or v[4] ~= rq then
      local stored = {-1, v[1], string.format('%.0f', v[2]), string.format('%.0f', v[3]),
                      string.format('%.0f', v[4])}
      if v[1] ~= ARGV[2] or math.floor(flags / 4) % 2 == 1 then return stored end
      if math.floor(flags / 8) % 2 == 1 then
        v[5] = math.max(math.min(v[5] + (cap - v[2]), cap), -MAX)
        if v[4] ~= rq then v[8] = 0 end
        v[2], v[3], v[4], v[7] = cap, rp, rq, clock()
        dirty = true
      end
    end
  end
end

local function give(x)
  if x > 0 then
    v[5] = math.min(v[5] + x, v[2])
    room, dirty = true, true
  end
end

-- Rate refill, exact: add floor((elapsed * rp + car) / (rq * 10^6)) and carry the rest.
if v[3] > 0 and clock() > v[7] then
  if v[5] >= v[2] then
    v[8] = 0
  else
    local d = v[4] * 1000000
    local e = now - v[7]
    local k = math.floor(e / d)
    local x = (e - k * d) * v[3] + v[8]
    local q = math.floor(x / d)
    v[8] = x - q * d
    give(k * v[3] + q)
    if v[5] >= v[2] then v[8] = 0 end
  end
  v[7], dirty = now, true
end

local function leased(member)
  return tonumber(string.match(member, '|(%d+)$'))
end
local function drop_lease(member)
  if redis.call('ZREM', L, member) == 0 then return nil end
  local amount = leased(member)
  v[9], v[10], dirty = v[9] - amount, v[10] - 1, true
  return amount
end

-- Lazy reclaim: at most 16 expired leases a call, each given back exactly once. nx is never
-- later than the earliest expiry, so no lease is missed and the scan runs only when one is due.
if v[10] > 0 and clock() >= v[13] then
  local expired = redis.call('ZRANGEBYSCORE', L, '-inf', now, 'LIMIT', 0, 16)
  if #expired > 0 then
    redis.call('ZREM', L, unpack(expired))
    local back = 0
    for _, member in ipairs(expired) do back = back + leased(member) end
    v[9], v[10], v[11] = v[9] - back, v[10] - #expired, v[11] + #expired
    give(back)
  end
  local first = redis.call('ZRANGE', L, 0, 0, 'WITHSCORES')
  v[13], dirty = tonumber(first[2]) or 0, true
end

-- Refunds of dropped reservations that this client could not send at once.
for i = 0, n - 1 do
  local amount = drop_lease(ARGV[a + 2 * i])
  if amount then give(math.min(amount, tonumber(ARGV[a + 1 + 2 * i]))) end
end
a = a + 2 * n

local function save()
  if room and v[12] > 0 then
    if clock() < v[12] then
      redis.call('PUBLISH', S .. ':room', '1')
    else
      v[12], dirty = 0, true
    end
  end
  if dirty then redis.call('SET', S, cmsgpack.pack(unpack(v))) end
end
local function deny(amount)
  if math.floor(flags) % 2 == 1 then
    v[12], dirty = math.max(v[12], clock() + 5000000), true
  end
  save()
  if v[3] > 0 and amount <= v[2] then
    return {0, math.ceil(((amount - v[5]) * v[4] * 1000000 - v[8]) / v[3]), v[2]}
  end
  return {0, -1, v[2]}
end

local reply = {1}
if op == 1 then -- take
  local amount = tonumber(ARGV[a])
  if v[5] < amount then return deny(amount) end
  v[5], dirty = v[5] - amount, true
elseif op == 2 then -- lease
  local member, ttl = ARGV[a], tonumber(ARGV[a + 1])
  local amount = leased(member)
  -- A grant sent again (a client retrying after a lost reply) is granted once.
  if v[5] < amount then
    if redis.call('ZSCORE', L, member) then
      save()
      return {1}
    end
    return deny(amount)
  end
  local expiry = clock() + ttl
  if redis.call('ZADD', L, 'NX', expiry, member) == 0 then
    save()
    return {1}
  end
  if v[10] == 0 or expiry < v[13] then v[13] = expiry end
  v[5], v[9], v[10], dirty = v[5] - amount, v[9] + amount, v[10] + 1, true
elseif op == 3 then -- give
  give(tonumber(ARGV[a]))
elseif op == 4 then -- settle
  local member, actual = ARGV[a], tonumber(ARGV[a + 1])
  local id = string.match(member, '^(.*)|')
  if v[14] > 0 and clock() >= v[14] then
    local old = redis.call('ZRANGEBYSCORE', D, '-inf', now, 'LIMIT', 0, 64)
    if #old > 0 then redis.call('ZREM', D, unpack(old)) end
    local first = redis.call('ZRANGE', D, 0, 0, 'WITHSCORES')
    v[14], dirty = tonumber(first[2]) or 0, true
  end
  local keep = clock() + TOMBSTONE
  if redis.call('ZADD', D, 'NX', keep, id) == 0 then
    save()
    return {2}
  end
  if v[14] == 0 then v[14] = keep end
  local amount = drop_lease(member)
  reply = {1, amount and 1 or 0}
  local delta = (amount or 0) - actual
  if delta > 0 then give(delta) elseif delta < 0 then v[5] = math.max(v[5] + delta, -MAX) end
  v[6], dirty = math.min(v[6] + actual, MAX), true
elseif op == 5 then -- unlease
  local amount = drop_lease(ARGV[a])
  reply = {1, amount and 1 or 0}
  if amount then give(math.min(amount, tonumber(ARGV[a + 1]))) end
elseif op == 6 then -- extend
  local member, ttl = ARGV[a], tonumber(ARGV[a + 1])
  if redis.call('ZSCORE', L, member) then
    local expiry = clock() + ttl
    redis.call('ZADD', L, 'XX', expiry, member)
    if expiry < v[13] then v[13], dirty = expiry, true end
  else
    reply = {0}
  end
elseif op == 7 then -- refill
  give(v[2])
elseif op == 8 then -- snapshot
  reply = {1, v[2], v[3], v[4], v[5], v[6], v[9], v[10], v[11]}
else
  return redis.error_reply('costbound: unknown operation ' .. tostring(op))
end
save()
return reply
""".replace("@TOMBSTONE@", str(TOMBSTONE_MICROS))

SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
