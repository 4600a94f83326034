-- Call ids: each state-changing call carries an id made by the client, and is applied once.
--
-- redis-py retries a command after a timeout or a dropped connection, and the library re-sends
-- a call that raised; either may reach the server more than once. The outcome of every applied
-- call is kept under its id, and a repeated id is answered from it instead of being applied
-- again (operations.lua). Outcomes:
--   'taken'   a try_reserve took its units       'leased'  a lease was granted
--   'done'    applied (a release, refill, settlement, refund, extension)
--   'gone'    an extension found no lease        'void'    rolled back, or voided in advance
-- A denial changes nothing and is not kept: a repeat is decided afresh, so at most one copy is
-- granted. A rollback that arrives before its call leaves 'void', so the call, if it ever
-- arrives, is refused.
--
-- Outcomes are kept in two generations, two hashes: CALLS_KEY, written since calls_since, and
-- PRIOR_KEY, the generation before. Once the current one is calls_keep old (the longest `keep`
-- a client sent with its configuration: max(lease, 10 minutes)), it becomes the prior one and
-- the prior one is dropped (UNLINK: freed in the background). So an outcome is kept at least
-- calls_keep, at most twice that, for one HSET a call: no index of expiry times to maintain.

local KEEP_AT_LEAST = 600000000  -- 10 minutes, whatever a state written without calls_keep says

local function recall(call_id)
  local outcome = redis.call('HGET', CALLS_KEY, call_id)
  if outcome then return outcome end
  return redis.call('HGET', PRIOR_KEY, call_id)
end

local function remember(call_id, outcome)
  redis.call('HSET', CALLS_KEY, call_id, outcome)
  if calls_since == 0 then calls_since, dirty = clock(), true end
end

-- Start a new generation when the current one is due.
local function rotate_calls()
  if calls_since == 0 or clock() < calls_since + math.max(calls_keep, KEEP_AT_LEAST) then
    return
  end
  redis.call('UNLINK', PRIOR_KEY)
  redis.pcall('RENAME', CALLS_KEY, PRIOR_KEY)  -- an error (no such key) changes nothing
  calls_since, dirty = 0, true
end
