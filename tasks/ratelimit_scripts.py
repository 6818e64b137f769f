"""The rate limiter's Lua scripts (tasks.ratelimit): each runs atomically in Redis, so every
worker process and host sees one connection's cooldown, in-flight slots, token bucket and
hourly window change together, and a job's admission to all of them is one round trip."""

# KEYS[1] cooldown, KEYS[2] bucket, KEYS[3] in-flight set, KEYS[4] hourly counts, KEYS[5] waiting
# jobs; ARGV rate/s, burst, now (s), longest wait (s), tokens, in-flight cap, job token ('' = no cap
# check), seconds a slot is held at most, hourly budget (0 = none), calls from which to slow down,
# window (s), alert threshold (s), job id ('' = none). One round trip per job. Returns {kind, ms,
# announce, calls in the window}: kind 1 while cooling down, 2 when the connection has `cap`
# jobs in flight (the caller defers the job, then registers it with WAIT), 3 at its hourly
# budget (ms: until enough of the window's oldest minutes fall out), 4 in the slowdown band
# before it (ms: until the band's pace allows the next job), else 0 (ms to wait for the
# tokens; 0: taken; rate 0: off); a job that will wait no longer than ARGV[4] is admitted,
# takes its in-flight slot and counts its calls in the window. announce is 1 for the one
# job of a long hourly pause that should say so (one `long_deferral` alert per pause).
GATE = """
local cool = redis.call('PTTL', KEYS[1])
if cool > 0 then return {1, cool, 0, 0} end
local now, cap, token = tonumber(ARGV[3]), tonumber(ARGV[6]), ARGV[7]
local capped = cap > 0 and token ~= ''
local job = ARGV[13]
if capped then
  -- slots whose holder's lease ran out (a worker that died mid-job) are free again, and so
  -- are slots kept for a woken job that never came
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  -- a job woken by a release (RELEASE) finds its slot kept for it ('w:' .. job id)
  if redis.call('ZSCORE', KEYS[3], token) == false and (job == '' or redis.call('ZSCORE', KEYS[3], 'w:' .. job) == false)
     and redis.call('ZCARD', KEYS[3]) >= cap then
    return {2, 0, 0, 0}
  end
end
local budget, used, pace, minute, width = tonumber(ARGV[9]), 0, 0, 0, 0
if budget > 0 then
  -- a rolling window of 60 minute counts (field = minute number); 'next' is when the
  -- slowdown band lets the next job in, 'alerted' until when a long pause was announced
  local window = tonumber(ARGV[11])
  width = window / 60
  minute = math.floor(now / width)
  local fields = redis.call('HGETALL', KEYS[4])
  local minutes, counts, nextat, alerted = {}, {}, 0, 0
  for i = 1, #fields, 2 do
    local f, v = fields[i], tonumber(fields[i + 1])
    if f == 'next' then nextat = v
    elseif f == 'alerted' then alerted = v
    elseif tonumber(f) <= minute - 60 then redis.call('HDEL', KEYS[4], f)
    else
      used = used + v
      minutes[#minutes + 1] = tonumber(f)
      counts[tonumber(f)] = v
    end
  end
  local cost = math.min(tonumber(ARGV[5]), budget)
  local kind, wait = 0, 0
  if used + cost > budget then
    -- wait until the oldest minutes falling out of the window leave room for this job
    table.sort(minutes)
    local freed = 0
    for _, m in ipairs(minutes) do
      freed = freed + counts[m]
      if used + cost - freed <= budget then wait = (m + 60) * width - now break end
    end
    kind = 3
  elseif used + cost > tonumber(ARGV[10]) and now < nextat then
    kind, wait = 4, nextat - now
  end
  if kind > 0 then
    local announce = 0
    if wait > tonumber(ARGV[12]) and alerted < now then
      announce = 1
      redis.call('HSET', KEYS[4], 'alerted', string.format('%.3f', now + wait))
    end
    return {kind, math.ceil(wait * 1000), announce, used}
  end
  -- in the band, the budget left is spread over a window: the nearer the budget, the slower
  -- (never longer than the window: by then every call counted now has fallen out)
  if used + cost > tonumber(ARGV[10]) then pace = math.min(cost * window / math.max(budget - used - cost, 1), window) end
end
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local wait = 0
if rate > 0 then
  local state = redis.call('HMGET', KEYS[2], 'tokens', 'at')
  local tokens, at = tonumber(state[1]) or burst, tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
  -- A caller that will sleep for its token takes it now (the bucket goes into debt), so the
  -- next caller queues behind it; one that would wait longer than ARGV[4] takes nothing.
  local cost = math.min(tonumber(ARGV[5]), burst)
  if tokens < cost then wait = math.ceil((cost - tokens) / rate * 1000) end
  if wait <= tonumber(ARGV[4]) * 1000 then tokens = tokens - cost end
  redis.call('HSET', KEYS[2], 'tokens', tokens, 'at', now)
  redis.call('PEXPIRE', KEYS[2], math.ceil(burst / rate * 1000) + 1000)
end
if wait <= tonumber(ARGV[4]) * 1000 then
  if capped then
    local hold = tonumber(ARGV[8])
    if job ~= '' then
      redis.call('ZREM', KEYS[3], 'w:' .. job)
      redis.call('ZREM', KEYS[5], job)
    end
    redis.call('ZADD', KEYS[3], string.format('%.3f', now + hold), token)
    -- the set outlives its newest slot by a second, then goes when idle
    local ttl = math.ceil(hold * 1000) + 1000
    if redis.call('PTTL', KEYS[3]) < ttl then redis.call('PEXPIRE', KEYS[3], ttl) end
  end
  if budget > 0 then
    used = used + tonumber(ARGV[5])
    redis.call('HINCRBY', KEYS[4], minute, tonumber(ARGV[5]))
    if pace > 0 then redis.call('HSET', KEYS[4], 'next', string.format('%.3f', now + pace)) end
    -- the counts outlive their newest minute by the window, then go when idle
    redis.call('PEXPIRE', KEYS[4], math.ceil(61 * width * 1000))
  end
end
return {0, wait, 0, used}
"""
# KEYS[1] cooldown; ARGV ms, alert threshold ms. Never shortens a longer cooldown another
# worker set. Returns {ms left, 1 if this call made the cooldown longer than the threshold}:
# of many workers hitting the same 429 storm, exactly one hears "you made it long".
COOLDOWN = """
local left = redis.call('PTTL', KEYS[1])
local ms = tonumber(ARGV[1])
if left < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end
local made_long = 0
if left <= tonumber(ARGV[2]) and ms > tonumber(ARGV[2]) then made_long = 1 end
return {math.max(left, ms), made_long}
"""
# Hands every free slot of KEYS[1] (in-flight set; cap ARGV[3], now ARGV[2]) to the oldest jobs
# of KEYS[2] (waiting set): each gets a slot kept under 'w:' .. id for ARGV[4] seconds, until its
# wake-up message comes. Returns their ids, oldest first: the caller makes them due and publishes
# them (runner._wake).
_HAND_ON = """
local now, cap = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = cap - redis.call('ZCARD', KEYS[1])
if cap <= 0 or free <= 0 then return {} end
local woken = redis.call('ZPOPMIN', KEYS[2], free)
local ids = {}
for i = 1, #woken, 2 do
  ids[#ids + 1] = woken[i]
  redis.call('ZADD', KEYS[1], string.format('%.3f', now + tonumber(ARGV[4])), 'w:' .. woken[i])
end
if #ids > 0 then
  local ttl = math.ceil(tonumber(ARGV[4]) * 1000) + 1000
  if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
end
return ids
"""
# KEYS[1] in-flight set, KEYS[2] waiting jobs, KEYS[3] hourly counts; ARGV job token, now (s),
# in-flight cap, seconds a slot is kept for a woken job, job id whose kept slot to drop ('' =
# none), hourly recount (calls made - calls charged), the minute they were charged to, ms the
# counts outlive it. Corrects the hourly window, gives the job's slot back, then hands every
# free slot on (_HAND_ON).
RELEASE = """
local recount = tonumber(ARGV[6])
-- a credit (fewer calls than charged) only to a minute still counted, never a negative one
if recount > 0 or (recount < 0 and redis.call('HEXISTS', KEYS[3], ARGV[7]) == 1) then
  redis.call('HINCRBY', KEYS[3], ARGV[7], recount)
  if redis.call('PTTL', KEYS[3]) < tonumber(ARGV[8]) then redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[8])) end
end
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[5] ~= '' then redis.call('ZREM', KEYS[1], 'w:' .. ARGV[5]) end
""" + _HAND_ON
# KEYS[1] in-flight set, KEYS[2] waiting jobs; ARGV job id, now (s), in-flight cap, seconds a slot
# is kept for a woken job, ms the waiting set outlives its newest job. A job refused a slot
# (GATE's kind 2) joins the waiting set once its row says it is waiting (keeping its place if it
# was there already), then every free slot is handed on: one may have freed since the refusal,
# and its release found nobody waiting. Registering after the row is written is what keeps a
# wake-up from ever finding the job still running (and dropping it).
WAIT = """
redis.call('ZADD', KEYS[2], 'NX', tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[5]))
""" + _HAND_ON
