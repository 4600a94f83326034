-- The operations. Each takes the call's id and its two operands (strings, '' when unused) and
-- returns its reply:
--   {DONE, ...}                    done or granted
--   {DENIED, micros, capacity}     denied; micros until the rate makes it fit, -1 if never
-- (and, from main.lua, {MISSING} and {MISMATCH, kind, capacity, rate_num, rate_den}).

local DONE, DENIED, MISSING, MISMATCH = 1, 0, 3, -1
local waiting  -- the caller waits for room: it wants a message on the room channel

local function deny(amount)
  if waiting then
    state.wanted_until, dirty = math.max(state.wanted_until, clock() + 5000000), true
  end
  if state.rate_num > 0 and amount <= state.capacity then
    local short = (amount - state.balance) * state.rate_den * 1000000 - state.carry
    return {DENIED, math.ceil(short / state.rate_num), state.capacity}
  end
  return {DENIED, -1, state.capacity}
end

-- A repeated call id: the reply its kept outcome stands for, nothing applied again.
local function replay(outcome)
  if outcome == 'gone' then return {DENIED} end
  if outcome == 'void' then return {DENIED, -1, state.capacity} end
  return {DONE}
end

local operations = {}

-- try_reserve: take `amount` if it fits.
function operations.take(call_id, amount_text)
  local amount = tonumber(amount_text)
  if state.balance < amount then return deny(amount) end
  state.balance, dirty = state.balance - amount, true
  remember(call_id, 'taken')
  return {DONE}
end

-- A lease of `amount` for `ttl` microseconds; its member is 'call_id|amount'.
function operations.lease(call_id, amount_text, ttl_text)
  local amount = tonumber(amount_text)
  if state.balance < amount then return deny(amount) end
  local expiry = clock() + tonumber(ttl_text)
  redis.call('ZADD', LEASES_KEY, expiry, call_id .. '|' .. amount_text)
  if state.leases == 0 or expiry < state.next_expiry then state.next_expiry = expiry end
  state.balance = state.balance - amount
  state.held, state.leases, dirty = state.held + amount, state.leases + 1, true
  remember(call_id, 'leased')
  return {DONE}
end

-- release: give `amount` back.
function operations.give(call_id, amount_text)
  give(tonumber(amount_text))
  remember(call_id, 'done')
  return {DONE}
end

-- record_usage: end the lease and charge `actual`. A lease already reclaimed charges `actual`
-- alone, once.
function operations.settle(call_id, member, actual_text)
  local actual = tonumber(actual_text)
  local delta = (drop_lease(member) or 0) - actual
  if delta > 0 then
    give(delta)
  elseif delta < 0 then
    state.balance = math.max(state.balance + delta, -MAX)
  end
  state.consumed, dirty = math.min(state.consumed + actual, MAX), true
  remember(call_id, 'done')
  return {DONE}
end

-- A refund (a dropped reservation, a released permit): end the lease, give `refund` back.
function operations.unlease(call_id, member, refund_text)
  local amount = drop_lease(member)
  if amount then give(math.min(amount, tonumber(refund_text))) end
  remember(call_id, 'done')
  return {DONE}
end

-- Push a lease's expiry to `ttl` microseconds from now; {DENIED} when it is no longer held.
function operations.extend(call_id, member, ttl_text)
  if not redis.call('ZSCORE', LEASES_KEY, member) then
    remember(call_id, 'gone')
    return {DENIED}
  end
  local expiry = clock() + tonumber(ttl_text)
  redis.call('ZADD', LEASES_KEY, 'XX', expiry, member)
  if expiry < state.next_expiry then state.next_expiry, dirty = expiry, true end
  remember(call_id, 'done')
  return {DONE}
end

function operations.refill(call_id)
  give(state.capacity)
  remember(call_id, 'done')
  return {DONE}
end

-- The rollback of a take or a lease whose caller never heard the reply (cancelled, timed out):
-- `call_id` is that call's id, `amount_text` its amount. Applied, it is undone; not (yet)
-- applied, it is voided in advance. Repeating the rollback does nothing more.
function operations.void(call_id, amount_text)
  local outcome = recall(call_id)
  if outcome == false then
    remember(call_id, 'void')
  elseif outcome == 'taken' then
    give(tonumber(amount_text))
    amend(call_id, 'void')
  elseif outcome == 'leased' then
    local amount = drop_lease(call_id .. '|' .. amount_text)
    if amount then give(amount) end
    amend(call_id, 'void')
  end
  return {DONE}
end

function operations.snapshot()
  return {DONE, state.capacity, state.rate_num, state.rate_den, state.balance, state.consumed,
          state.held, state.leases, state.reclaimed}
end

-- Operations that decide about a repeated id themselves, or have no id.
local UNCHECKED = {void = true, snapshot = true}

-- Apply one operation once per call id.
local function apply(operation, call_id, first, second)
  if not UNCHECKED[operation] then
    local outcome = recall(call_id)
    if outcome then return replay(outcome) end
  end
  return operations[operation](call_id, first, second)
end
