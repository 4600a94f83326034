"""The one Lua script that every operation of a Redis budget runs (EVALSHA, else EVAL).

Keys (one hash tag, so one cluster slot): ``{name}`` the state hash, ``{name}:leases`` a sorted
set of lease id -> expiry (server microseconds), ``{name}:held`` a hash of lease id -> amount,
``{name}:done`` a sorted set of recorded lease ids -> tombstone expiry.

State fields: ``kind`` (``u`` unit, ``t`` tokens), ``cap``, ``rp``/``rq`` (the rate as the
fraction rp/rq units per second), ``bal`` (available - debt), ``con`` (consumed), ``ts`` (last
refill, server microseconds), ``car`` (the refill's carried fraction, in 1/(rq*10^6) units),
``held`` (sum of leased amounts), ``rec`` (leases reclaimed so far), ``wt`` (until when a
waiter wants messages on the ``{name}:room`` channel).

Lua numbers are doubles: every integer here stays below 2**53 (the client caps capacities,
amounts and rates so), which keeps the arithmetic exact. The refill splits the elapsed time so
that no product exceeds 2**53 either (rq * (rp + 1) < 2**33).

ARGV: op, kind, cap, rp, rq, mode (0 follow the stored configuration, 1 check it, 2 store
ours), waiting (1: a waiter wants a message when room appears), n pending refunds, then n pairs
(lease id, amount), then the op's own arguments.

Replies: ``{1, ...}`` done or granted, ``{0, micros, cap}`` denied (micros until the rate makes
it fit, -1 if it never will by rate alone), ``{2}`` already recorded, ``{-1, kind, cap, rp, rq}``
the stored configuration differs.
"""

from __future__ import annotations

import hashlib

__all__ = ["SCRIPT", "SHA"]

SCRIPT = r"""
local S, L, H, D = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local op, kind = ARGV[1], ARGV[2]
local cap, rp, rq = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local mode, waiting = tonumber(ARGV[6]), ARGV[7] == '1'
local MAX = 9007199254740991
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local st = redis.call('HMGET', S, 'kind', 'cap', 'rp', 'rq', 'bal', 'con', 'ts', 'car', 'held',
                      'rec', 'wt')
local bal, con, ts, car, held, rec, wt
if not st[1] then
  bal, con, ts, car, held, rec, wt = cap, 0, now, 0, 0, 0, 0
else
  if st[1] ~= kind then return {-1, st[1], st[2], st[3], st[4]} end
  local scap, srp, srq = tonumber(st[2]), tonumber(st[3]), tonumber(st[4])
  bal, con, ts = tonumber(st[5]), tonumber(st[6]), tonumber(st[7])
  car, held, rec, wt = tonumber(st[8]), tonumber(st[9]), tonumber(st[10]), tonumber(st[11])
  if scap ~= cap or srp ~= rp or srq ~= rq then
    if mode == 1 then return {-1, st[1], st[2], st[3], st[4]} end
    if mode == 2 then
      bal = math.max(math.min(bal + (cap - scap), cap), -MAX)
      if srq ~= rq then car = 0 end
    else
      cap, rp, rq = scap, srp, srq
    end
  end
end

local room = false
local function give(x)
  if x > 0 then
    bal = math.min(bal + x, cap)
    room = true
  end
end

-- Rate refill, exact: add floor((elapsed * rp + car) / (rq * 10^6)) and carry the rest.
if rp > 0 and now > ts then
  if bal >= cap then
    car = 0
  else
    local d = rq * 1000000
    local e = now - ts
    local k = math.floor(e / d)
    local x = (e - k * d) * rp + car
    local q = math.floor(x / d)
    car = x - q * d
    give(k * rp + q)
    if bal >= cap then car = 0 end
  end
end
if now > ts then ts = now end

local function drop_lease(id)
  local amount = redis.call('HGET', H, id)
  if not amount then return nil end
  amount = tonumber(amount)
  redis.call('HDEL', H, id)
  redis.call('ZREM', L, id)
  held = held - amount
  return amount
end

-- Lazy reclaim: at most 16 expired leases a call, each given back exactly once.
local expired = redis.call('ZRANGEBYSCORE', L, '-inf', now, 'LIMIT', 0, 16)
for _, id in ipairs(expired) do
  local amount = drop_lease(id)
  if amount then
    give(amount)
    rec = rec + 1
  end
end

-- Refunds of dropped reservations that this client could not send at once.
local n = tonumber(ARGV[8])
for i = 0, n - 1 do
  local amount = drop_lease(ARGV[9 + 2 * i])
  if amount then give(math.min(amount, tonumber(ARGV[10 + 2 * i]))) end
end
local a = 9 + 2 * n

local function fmt(x) return string.format('%.0f', x) end
local function save()
  redis.call('HSET', S, 'kind', kind, 'cap', fmt(cap), 'rp', fmt(rp), 'rq', fmt(rq),
             'bal', fmt(bal), 'con', fmt(con), 'ts', fmt(ts), 'car', fmt(car),
             'held', fmt(held), 'rec', fmt(rec), 'wt', fmt(wt))
  if room and wt > now then redis.call('PUBLISH', S .. ':room', '1') end
end
local function deny(amount)
  if waiting then wt = math.max(wt, now + 5000000) end
  save()
  if rp > 0 and amount <= cap then
    return {0, math.ceil(((amount - bal) * rq * 1000000 - car) / rp), fmt(cap)}
  end
  return {0, -1, fmt(cap)}
end

local reply = {1}
if op == 'take' then
  local amount = tonumber(ARGV[a])
  if bal < amount then return deny(amount) end
  bal = bal - amount
elseif op == 'lease' then
  local id, amount, ttl = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if bal < amount then return deny(amount) end
  bal = bal - amount
  held = held + amount
  redis.call('HSET', H, id, fmt(amount))
  redis.call('ZADD', L, fmt(now + ttl), id)
elseif op == 'give' then
  give(tonumber(ARGV[a]))
elseif op == 'settle' then
  local id, actual, ttl = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local old = redis.call('ZRANGEBYSCORE', D, '-inf', now, 'LIMIT', 0, 64)
  if #old > 0 then redis.call('ZREM', D, unpack(old)) end
  if redis.call('ZSCORE', D, id) then
    save()
    return {2}
  end
  local amount = drop_lease(id)
  reply = {1, amount and 1 or 0}
  local delta = (amount or 0) - actual
  if delta > 0 then give(delta) else bal = math.max(bal + delta, -MAX) end
  con = math.min(con + actual, MAX)
  redis.call('ZADD', D, fmt(now + ttl), id)
elseif op == 'unlease' then
  local amount = drop_lease(ARGV[a])
  reply = {1, amount and 1 or 0}
  if amount then give(math.min(amount, tonumber(ARGV[a + 1]))) end
elseif op == 'extend' then
  local id, ttl = ARGV[a], tonumber(ARGV[a + 1])
  if redis.call('ZSCORE', L, id) then
    redis.call('ZADD', L, 'XX', fmt(now + ttl), id)
  else
    reply = {0}
  end
elseif op == 'refill' then
  give(cap)
elseif op == 'snap' then
  reply = {1, fmt(cap), fmt(rp), fmt(rq), fmt(bal), fmt(con), fmt(held),
           redis.call('HLEN', H), fmt(rec)}
else
  return redis.error_reply('costbound: unknown operation ' .. tostring(op))
end
save()
return reply
"""

SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()
