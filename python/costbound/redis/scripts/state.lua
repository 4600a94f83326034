-- One budget's state, read into a table of named fields and written back once per call.
--
-- Keys (one hash tag, so one cluster slot):
--   STATE_KEY   {name}          the state: one msgpack array of the FIELDS below, in that order
--                               (a GET and a SET of one array cost less than half of an HMGET
--                               and an HSET of the same fields)
--   LEASES_KEY  {name}:leases   a sorted set of leases: member 'id|amount', score the expiry
--   CALLS_KEY   {name}:calls    a hash: call id -> its outcome (calls.lua)
--   FORGET_KEY  {name}:forget   a sorted set: call id -> when its outcome may be forgotten
--
-- Lua numbers are doubles: every integer here stays at or below 2^53 - 1 (the client caps
-- capacities, amounts and rates so), which keeps the arithmetic exact. The refill splits the
-- elapsed time so that no product exceeds 2^53 either (rate_den * (rate_num + 1) < 2^33).

local STATE_KEY, LEASES_KEY, CALLS_KEY, FORGET_KEY = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local MAX = 9007199254740991

-- The stored array's fields, by position: the only place that knows the positions.
local FIELDS = {
  'kind',          -- 'u' a unit budget, 't' a token budget
  'capacity',
  'rate_num',      -- the rate is rate_num / rate_den units per second
  'rate_den',
  'balance',       -- available - debt
  'consumed',      -- prompt + completion recorded (token budgets)
  'refilled_at',   -- server microseconds of the last rate refill
  'carry',         -- the refill's carried fraction, in 1 / (rate_den * 10^6) units
  'held',          -- sum of the outstanding leases
  'leases',        -- number of the outstanding leases
  'reclaimed',     -- leases given back by expiry so far
  'wanted_until',  -- until when a waiter wants messages on the {name}:room channel
  'next_expiry',   -- never later than the earliest lease expiry: the reclaim scan runs when due
  'next_forget',   -- never later than the earliest forget time of a call id (0: none)
}

local state        -- the named fields
local dirty        -- the state must be written back
local room         -- units came back: a waiter may fit now
local now          -- server time in microseconds, read once, when first needed

local function clock()
  if not now then
    local t = redis.call('TIME')
    now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return now
end

-- Read the stored state; false when the budget does not exist.
local function load_state()
  local raw = redis.call('GET', STATE_KEY)
  if not raw then return false end
  local values = {cmsgpack.unpack(raw)}
  state = {}
  for index, field in ipairs(FIELDS) do state[field] = values[index] or 0 end
  return true
end

local function create_state(config)
  state = {
    kind = config.kind, capacity = config.capacity, rate_num = config.rate_num,
    rate_den = config.rate_den, balance = config.capacity, consumed = 0, refilled_at = clock(),
    carry = 0, held = 0, leases = 0, reclaimed = 0, wanted_until = 0, next_expiry = 0,
    next_forget = 0,
  }
  dirty = true
end

local function save_state()
  if room and state.wanted_until > 0 then
    if clock() < state.wanted_until then
      redis.call('PUBLISH', STATE_KEY .. ':room', '1')
    else
      state.wanted_until, dirty = 0, true
    end
  end
  if dirty then
    local values = {}
    for index, field in ipairs(FIELDS) do values[index] = state[field] end
    redis.call('SET', STATE_KEY, cmsgpack.pack(unpack(values)))
  end
end

-- Add units to the balance, capped at the capacity.
local function give(units)
  if units > 0 then
    state.balance = math.min(state.balance + units, state.capacity)
    room, dirty = true, true
  end
end

-- Rate refill, exact: add floor((elapsed * rate_num + carry) / (rate_den * 10^6)), carry the rest.
local function refill_by_rate()
  if state.rate_num <= 0 or clock() <= state.refilled_at then return end
  if state.balance >= state.capacity then
    state.carry = 0
  else
    local per_unit = state.rate_den * 1000000
    local elapsed = now - state.refilled_at
    local whole = math.floor(elapsed / per_unit)
    local scaled = (elapsed - whole * per_unit) * state.rate_num + state.carry
    local units = math.floor(scaled / per_unit)
    state.carry = scaled - units * per_unit
    give(whole * state.rate_num + units)
    if state.balance >= state.capacity then state.carry = 0 end
  end
  state.refilled_at, dirty = now, true
end

local function lease_amount(member)
  return tonumber(string.match(member, '|(%d+)$'))
end

-- Remove one lease; its amount, or nil when it is not held (settled, expired, never granted).
local function drop_lease(member)
  if redis.call('ZREM', LEASES_KEY, member) == 0 then return nil end
  local amount = lease_amount(member)
  state.held, state.leases, dirty = state.held - amount, state.leases - 1, true
  return amount
end

-- Lazy reclaim: at most 16 expired leases a call, each given back exactly once. next_expiry is
-- never later than the earliest expiry, so no lease is missed and the scan runs only when due.
local function reclaim_expired()
  if state.leases <= 0 or clock() < state.next_expiry then return end
  local expired = redis.call('ZRANGEBYSCORE', LEASES_KEY, '-inf', now, 'LIMIT', 0, 16)
  if #expired > 0 then
    redis.call('ZREM', LEASES_KEY, unpack(expired))
    local back = 0
    for _, member in ipairs(expired) do back = back + lease_amount(member) end
    state.held, state.leases = state.held - back, state.leases - #expired
    state.reclaimed = state.reclaimed + #expired
    give(back)
  end
  local first = redis.call('ZRANGE', LEASES_KEY, 0, 0, 'WITHSCORES')
  state.next_expiry, dirty = tonumber(first[2]) or 0, true
end
