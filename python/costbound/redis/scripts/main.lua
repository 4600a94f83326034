-- One call: load (or create) the state, bring it up to date, apply the calls queued by the
-- client and then this call's operation, save, reply. The arguments are named in args.lua.

-- Refuse an unknown operation before anything is written (a script's writes are not undone).
for index = 0, queued - 1 do
  local name = ARGV[QUEUED_FROM + 4 * index]
  if not string.find(OPERATIONS, ' ' .. name .. ' ', 1, true) then
    return redis.error_reply('costbound: unknown operation ' .. name)
  end
end
if not string.find(OPERATIONS, ' ' .. operation .. ' ', 1, true) then
  return redis.error_reply('costbound: unknown operation ' .. operation)
end

if not load_state() then
  if config_mode == '' then return {MISSING} end
  create_state()
elseif config_mode ~= '' then
  if keep and keep > calls_keep then calls_keep, dirty = keep, true end
  local same = kind == config_kind and capacity == config_capacity
    and rate_num == config_rate_num and rate_den == config_rate_den
  if not same and (kind ~= config_kind or config_mode == 'check') then
    return {MISMATCH, kind, string.format('%.0f', capacity), string.format('%.0f', rate_num),
            string.format('%.0f', rate_den)}
  elseif not same and config_mode == 'store' then
    -- reconfigure=True: the balance moves by the difference of the capacities.
    balance = math.max(math.min(balance + (config_capacity - capacity), config_capacity), -MAX)
    if rate_den ~= config_rate_den then carry = 0 end
    capacity, rate_num, rate_den = config_capacity, config_rate_num, config_rate_den
    refilled_at, dirty = clock(), true
  end
end

refill_by_rate()
reclaim_expired()
rotate_calls()
for index = 0, queued - 1 do
  local at = QUEUED_FROM + 4 * index
  apply(ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3])
end
local reply = apply(operation, call_id, first, second)
save_state()
return reply
