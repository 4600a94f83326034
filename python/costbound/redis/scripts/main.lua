-- One call: read the arguments, load (or create) the state, bring it up to date, apply the
-- calls queued by the client and then this call's operation, save, reply.
--
-- ARGV, read in this order:
--   operation, call_id, first, second   this call ('' for an unused operand or id)
--   keep                                microseconds to remember call outcomes (calls.lua)
--   waiting                             '1' when the caller waits for room, else '0'
--   config                              '' (none), 'check' (a mismatch is refused), 'store'
--                                       (reconfigure) or 'create' (only to create a missing
--                                       budget); unless '', followed by kind, capacity,
--                                       rate_num, rate_den
--   queued                              how many queued calls follow, then for each:
--                                       operation, call_id, first, second

local position = 0
local function next_arg()
  position = position + 1
  return ARGV[position]
end

local operation, call_id, first, second = next_arg(), next_arg(), next_arg(), next_arg()
keep = tonumber(next_arg())
waiting = next_arg() == '1'
local config_mode = next_arg()
local config
if config_mode ~= '' then
  config = {kind = next_arg(), capacity = tonumber(next_arg()), rate_num = tonumber(next_arg()),
            rate_den = tonumber(next_arg())}
end
local queued = {}
for index = 1, tonumber(next_arg()) do
  queued[index] = {next_arg(), next_arg(), next_arg(), next_arg()}
end

-- Refuse an unknown operation before anything is written (a script's writes are not undone).
for _, call in ipairs(queued) do
  if not operations[call[1]] then
    return redis.error_reply('costbound: unknown operation ' .. tostring(call[1]))
  end
end
if not operations[operation] then
  return redis.error_reply('costbound: unknown operation ' .. tostring(operation))
end

if not load_state() then
  if not config then return {MISSING} end
  create_state(config)
elseif config then
  local same = state.kind == config.kind and state.capacity == config.capacity
    and state.rate_num == config.rate_num and state.rate_den == config.rate_den
  if not same and (state.kind ~= config.kind or config_mode == 'check') then
    return {MISMATCH, state.kind, string.format('%.0f', state.capacity),
            string.format('%.0f', state.rate_num), string.format('%.0f', state.rate_den)}
  elseif not same and config_mode == 'store' then
    -- reconfigure=True: the balance moves by the difference of the capacities.
    state.balance = math.max(math.min(state.balance + (config.capacity - state.capacity),
                                      config.capacity), -MAX)
    if state.rate_den ~= config.rate_den then state.carry = 0 end
    state.capacity, state.rate_num, state.rate_den = config.capacity, config.rate_num,
                                                     config.rate_den
    state.refilled_at, dirty = clock(), true
  end
end

refill_by_rate()
reclaim_expired()
forget_expired()
for _, call in ipairs(queued) do apply(call[1], call[2], call[3], call[4]) end
local reply = apply(operation, call_id, first, second)
save_state()
return reply
