-- The script's keys and arguments, by name. KEYS (one hash tag, so one cluster slot):
--   STATE_KEY   {name}                the state (state.lua)
--   LEASES_KEY  {name}:leases         a sorted set of leases: member 'id|amount', score the expiry
--   CALLS_KEY   {name}:calls          a hash: call id -> its outcome (calls.lua)
--   PRIOR_KEY   {name}:calls:prior    the same, the generation before
-- ARGV: this call, then the sections it needs, each led by its name (so that the common call
-- sends four arguments: with redis.asyncio each argument costs about a microsecond):
--   operation, call_id, first, second   this call ('' for an unused id or operand)
--   'waiting'                           the caller waits for room: it wants a message
--   'config', mode, kind, capacity, rate_num, rate_den, keep
--                                       mode 'check' (a mismatch is refused), 'store'
--                                       (reconfigure) or 'create' (only to create a missing
--                                       budget); keep: microseconds to remember call outcomes
--   'queued', count, then count times: operation, call_id, first, second
--                                       calls the client owes, applied first

local STATE_KEY, LEASES_KEY, CALLS_KEY, PRIOR_KEY = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local operation, call_id, first, second = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local waiting = false
local config_mode = ''
local config_kind, config_capacity, config_rate_num, config_rate_den, keep
local queued, QUEUED_FROM = 0, 0

local at = 5
while ARGV[at] do
  local section = ARGV[at]
  if section == 'waiting' then
    waiting, at = true, at + 1
  elseif section == 'config' then
    config_mode, config_kind = ARGV[at + 1], ARGV[at + 2]
    config_capacity, config_rate_num = tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
    config_rate_den, keep = tonumber(ARGV[at + 5]), tonumber(ARGV[at + 6])
    at = at + 7
  elseif section == 'queued' then
    queued, QUEUED_FROM = tonumber(ARGV[at + 1]), at + 2
    at = QUEUED_FROM + 4 * queued
  else
    return redis.error_reply('costbound: unknown argument ' .. tostring(section))
  end
end
