-- The operations, applied by apply(operation, call_id, first, second): the call's id and its
-- two operands (strings, '' when unused). Each returns its reply:
--   {DONE, ...}                    done or granted
--   {DENIED, micros, capacity}     denied; micros until the rate makes it fit, -1 if never
-- (and, from main.lua, {MISSING} and {MISMATCH, kind, capacity, rate_num, rate_den}).
-- One function with a branch per operation: a closure per operation would be made again on
-- every call, and that costs the server more than all the branches.

local DONE, DENIED, MISSING, MISMATCH = 1, 0, 3, -1
-- Every operation's name, between spaces (checked before anything is written).
local OPERATIONS = ' take lease give settle unlease extend refill void snapshot '

local function deny(amount)
  if waiting then
    wanted_until, dirty = math.max(wanted_until, clock() + 5000000), true
  end
  if rate_num > 0 and amount <= capacity then
    local short = (amount - balance) * rate_den * 1000000 - carry
    return {DENIED, math.ceil(short / rate_num), capacity}
  end
  return {DENIED, -1, capacity}
end

local function apply(operation, call_id, first, second)
  if operation == 'snapshot' then
    return {DONE, capacity, rate_num, rate_den, balance, consumed, held, leases, reclaimed}
  end

  local outcome = recall(call_id)

  if operation == 'void' then
    -- The rollback of a take or a lease whose caller never heard the reply (cancelled, timed
    -- out): call_id is that call's id, first its amount. Applied, it is undone; not (yet)
    -- applied, it is voided in advance. Repeating the rollback does nothing more.
    if outcome == false then
      remember(call_id, 'void')
    elseif outcome == 'taken' then
      give(tonumber(first))
      redis.call('HSET', CALLS_KEY, call_id, 'void')
    elseif outcome == 'leased' then
      local amount = drop_lease(call_id .. '|' .. first)
      if amount then give(amount) end
      redis.call('HSET', CALLS_KEY, call_id, 'void')
    end
    return {DONE}
  end

  -- A repeated call id: the reply its kept outcome stands for, nothing applied again.
  if outcome == 'gone' then return {DENIED} end
  if outcome == 'void' then return {DENIED, -1, capacity} end
  if outcome then return {DONE} end

  if operation == 'take' then
    -- try_reserve: take `first` units if they fit.
    local amount = tonumber(first)
    if balance < amount then return deny(amount) end
    balance, dirty = balance - amount, true
    remember(call_id, 'taken')

  elseif operation == 'lease' then
    -- A lease of `first` units for `second` microseconds; its member is 'call_id|first'.
    local amount = tonumber(first)
    if balance < amount then return deny(amount) end
    local expiry = clock() + tonumber(second)
    redis.call('ZADD', LEASES_KEY, expiry, call_id .. '|' .. first)
    if leases == 0 or expiry < next_expiry then next_expiry = expiry end
    balance, held, leases, dirty = balance - amount, held + amount, leases + 1, true
    remember(call_id, 'leased')

  elseif operation == 'give' then
    -- release: give `first` units back.
    give(tonumber(first))
    remember(call_id, 'done')

  elseif operation == 'settle' then
    -- record_usage: end the lease `first` and charge `second`. A lease already reclaimed
    -- charges `second` alone, once.
    local actual = tonumber(second)
    local delta = (drop_lease(first) or 0) - actual
    if delta > 0 then
      give(delta)
    elseif delta < 0 then
      balance = math.max(balance + delta, -MAX)
    end
    consumed, dirty = math.min(consumed + actual, MAX), true
    remember(call_id, 'done')

  elseif operation == 'unlease' then
    -- A refund (a dropped reservation, a released permit): end the lease `first`, give
    -- `second` back.
    local amount = drop_lease(first)
    if amount then give(math.min(amount, tonumber(second))) end
    remember(call_id, 'done')

  elseif operation == 'extend' then
    -- Push the expiry of the lease `first` to `second` microseconds from now; {DENIED} when
    -- it is no longer held.
    if not redis.call('ZSCORE', LEASES_KEY, first) then
      remember(call_id, 'gone')
      return {DENIED}
    end
    local expiry = clock() + tonumber(second)
    redis.call('ZADD', LEASES_KEY, 'XX', expiry, first)
    if expiry < next_expiry then next_expiry, dirty = expiry, true end
    remember(call_id, 'done')

  elseif operation == 'refill' then
    give(capacity)
    remember(call_id, 'done')
  end
  return {DONE}
end
