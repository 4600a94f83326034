-- Call ids: each state-changing call carries an id made by the client, and is applied once.
--
-- redis-py retries a command after a timeout or a dropped connection, and the library re-sends
-- a call that raised; either may reach the server more than once. The outcome of every applied
-- call is kept under its id for `keep` microseconds (the client sends max(lease, 10 minutes)),
-- and a repeated id is answered from it instead of being applied again. Outcomes:
--   'taken'   a try_reserve took its units       'leased'  a lease was granted
--   'done'    applied (a release, refill, settlement, refund, extension)
--   'gone'    an extension found no lease        'void'    rolled back, or voided in advance
-- A denial changes nothing and is not kept: a repeat is decided afresh, so at most one copy is
-- granted. A rollback that arrives before its call leaves 'void', so the call, if it ever
-- arrives, is refused.

local keep  -- microseconds to remember an outcome (from the call's arguments)

local function recall(call_id)
  return redis.call('HGET', CALLS_KEY, call_id)
end

local function remember(call_id, outcome)
  redis.call('HSET', CALLS_KEY, call_id, outcome)
  local forget_at = clock() + keep
  redis.call('ZADD', FORGET_KEY, forget_at, call_id)
  if state.next_forget == 0 or forget_at < state.next_forget then
    state.next_forget, dirty = forget_at, true
  end
end

-- Change a kept outcome (a rollback of an applied call); it is forgotten when it was due to be.
local function amend(call_id, outcome)
  redis.call('HSET', CALLS_KEY, call_id, outcome)
end

-- Forget at most 64 outcomes past their time a call; next_forget says when one is due.
local function forget_expired()
  if state.next_forget <= 0 or clock() < state.next_forget then return end
  local old = redis.call('ZRANGEBYSCORE', FORGET_KEY, '-inf', now, 'LIMIT', 0, 64)
  if #old > 0 then
    redis.call('ZREM', FORGET_KEY, unpack(old))
    redis.call('HDEL', CALLS_KEY, unpack(old))
  end
  local first = redis.call('ZRANGE', FORGET_KEY, 0, 0, 'WITHSCORES')
  state.next_forget, dirty = tonumber(first[2]) or 0, true
end
