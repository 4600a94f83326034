-- The script's arguments, by name. KEYS (one hash tag, so one cluster slot):
--   STATE_KEY   {name}          the state (state.lua)
--   LEASES_KEY  {name}:leases   a sorted set of leases: member 'id|amount', score the expiry
--   CALLS_KEY   {name}:calls    a hash: call id -> its outcome (calls.lua)
--   PRIOR_KEY   {name}:calls:prior   the same, the generation before
-- ARGV:
--   1 operation, 2 call_id, 3 first, 4 second   this call ('' for an unused id or operand)
--   5 keep      microseconds to remember call outcomes (calls.lua)
--   6 waiting   '1' when the caller waits for room (it wants a message), else '0'
--   7 config    '' (none), 'check' (a mismatch is refused), 'store' (reconfigure) or 'create'
--               (only to create a missing budget); unless '', 8-11 are kind, capacity,
--               rate_num, rate_den
--   then queued, the number of calls queued by the client, and for each of them: operation,
--   call_id, first, second

local STATE_KEY, LEASES_KEY, CALLS_KEY, PRIOR_KEY = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local operation, call_id, first, second = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local keep = tonumber(ARGV[5])
local waiting = ARGV[6] == '1'
local config_mode = ARGV[7]
local config_kind, config_capacity, config_rate_num, config_rate_den
local QUEUED_AT = 8
if config_mode ~= '' then
  config_kind, config_capacity = ARGV[8], tonumber(ARGV[9])
  config_rate_num, config_rate_den = tonumber(ARGV[10]), tonumber(ARGV[11])
  QUEUED_AT = 12
end
local queued = tonumber(ARGV[QUEUED_AT])
local QUEUED_FROM = QUEUED_AT + 1
