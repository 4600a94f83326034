-- One budget's state, read into named locals and written back once per call.
--
-- STATE_KEY holds one msgpack array of the fields below, in order: a GET and a SET of one array
-- cost less than half of an HMGET and an HSET of the same fields.
--
-- Lua numbers are doubles: every integer here stays at or below 2^53 - 1 (the client caps
-- capacities, amounts and rates so), which keeps the arithmetic exact. The refill splits the
-- elapsed time so that no product exceeds 2^53 either (rate_den * (rate_num + 1) < 2^33).

local MAX = 9007199254740991

-- The state, one named local per field. The stored array holds them in the order of
-- load_state and save_state below (a field added later goes at the end, read as 0 when absent).
local kind          -- 'u' a unit budget, 't' a token budget
local capacity
local rate_num      -- the rate is rate_num / rate_den units per second
local rate_den
local balance       -- available - debt
local consumed      -- prompt + completion recorded (token budgets)
local refilled_at   -- server microseconds of the last rate refill
local carry         -- the refill's carried fraction, in 1 / (rate_den * 10^6) units
local held          -- sum of the outstanding leases
local leases        -- number of the outstanding leases
local reclaimed     -- leases given back by expiry so far
local wanted_until  -- until when a waiter wants messages on the {name}:room channel
local next_expiry   -- never later than the earliest lease expiry: the reclaim scan runs when due
local calls_since   -- when the current generation of call outcomes began (0: none yet)
local calls_keep    -- how long a generation of call outcomes lasts (calls.lua)

local dirty         -- the state must be written back
local room          -- units came back: a waiter may fit now
local now           -- server time in microseconds, read once, when first needed

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
  kind, capacity, rate_num, rate_den, balance, consumed, refilled_at, carry, held, leases,
    reclaimed, wanted_until, next_expiry, calls_since, calls_keep = cmsgpack.unpack(raw)
  calls_since, calls_keep = calls_since or 0, calls_keep or 0
  return true
end

local function create_state()
  kind, capacity, rate_num, rate_den = config_kind, config_capacity, config_rate_num,
                                       config_rate_den
  balance, consumed, refilled_at, carry = capacity, 0, clock(), 0
  held, leases, reclaimed, wanted_until, next_expiry = 0, 0, 0, 0, 0
  calls_since, calls_keep = 0, keep or 0
  dirty = true
end

local function save_state()
  if room and wanted_until > 0 then
    if clock() < wanted_until then
      redis.call('PUBLISH', STATE_KEY .. ':room', '1')
    else
      wanted_until, dirty = 0, true
    end
  end
  if dirty then
    redis.call('SET', STATE_KEY, cmsgpack.pack(kind, capacity, rate_num, rate_den, balance,
      consumed, refilled_at, carry, held, leases, reclaimed, wanted_until, next_expiry,
      calls_since, calls_keep))
  end
end

-- Add units to the balance, capped at the capacity.
local function give(units)
  if units > 0 then
    balance = math.min(balance + units, capacity)
    room, dirty = true, true
  end
end

-- Rate refill, exact: add floor((elapsed * rate_num + carry) / (rate_den * 10^6)), carry the rest.
local function refill_by_rate()
  if rate_num <= 0 or clock() <= refilled_at then return end
  if balance >= capacity then
    carry = 0
  else
    local per_unit = rate_den * 1000000
    local elapsed = now - refilled_at
    local whole = math.floor(elapsed / per_unit)
    local scaled = (elapsed - whole * per_unit) * rate_num + carry
    local units = math.floor(scaled / per_unit)
    carry = scaled - units * per_unit
    give(whole * rate_num + units)
    if balance >= capacity then carry = 0 end
  end
  refilled_at, dirty = now, true
end

local function lease_amount(member)
  return tonumber(string.match(member, '|(%d+)$'))
end

-- Remove one lease; its amount, or nil when it is not held (settled, expired, never granted).
local function drop_lease(member)
  if redis.call('ZREM', LEASES_KEY, member) == 0 then return nil end
  local amount = lease_amount(member)
  held, leases, dirty = held - amount, leases - 1, true
  return amount
end

-- Lazy reclaim: at most 16 expired leases a call, each given back exactly once. next_expiry is
-- never later than the earliest expiry, so no lease is missed and the scan runs only when due.
local function reclaim_expired()
  if leases <= 0 or clock() < next_expiry then return end
  local expired = redis.call('ZRANGEBYSCORE', LEASES_KEY, '-inf', now, 'LIMIT', 0, 16)
  if #expired > 0 then
    redis.call('ZREM', LEASES_KEY, unpack(expired))
    local back = 0
    for _, member in ipairs(expired) do back = back + lease_amount(member) end
    held, leases = held - back, leases - #expired
    reclaimed = reclaimed + #expired
    give(back)
  end
  local first = redis.call('ZRANGE', LEASES_KEY, 0, 0, 'WITHSCORES')
  next_expiry, dirty = tonumber(first[2]) or 0, true
end
