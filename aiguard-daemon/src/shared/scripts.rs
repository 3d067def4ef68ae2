//! The Lua scripts that make each decision one atomic round trip to Redis.
//!
//! Every key a script touches carries the tenant as its Cluster hash tag (`{tenant}`), so a
//! tenant's buckets, leases and monthly counter live in one slot and one script sees them all.
//! Time is Redis's own (`TIME`), in microseconds: every node decides on the same clock.
//! Numbers are written with `%d`: Lua 5.1 prints doubles with 14 significant digits, fewer
//! than a microsecond timestamp has.
//!
//! Layout shared by `ADMIT` and `SETTLE`: for level i (tenant, key, then model) `KEYS[2i-1]`
//! is its bucket hash (fields m/ml: requests per minute arrival time and the limit it was
//! charged under; d/dl per day; t/tl tokens per minute) and `KEYS[2i]` its concurrency leases
//! (a sorted set of lease ids scored by expiry, so a node that dies frees its slots); the last
//! key is the tenant's token counter for the calendar month.
use redis::Script;

/// Admits a request against every level at once, or refuses it and changes nothing.
///
/// ARGV: levels, lease id, lease ms, tokens reserved, least tokens needed, monthly limit
/// (0: none), when the month's counter may go (unix ms); then per level: requests/minute,
/// requests/day, tokens/minute, max concurrent (0: none).
///
/// Returns `{0, quota reserved, month used, req limit, req remaining, req reset us, tok limit,
/// tok remaining, tok reset us}` (limits -1 when none), `{6}` when the request was cancelled
/// before this ran, or a refusal:
/// `{1, level, limit}` concurrency; `{2, used, needed, limit}` monthly quota;
/// `{3, level, 1|2 (minute|day), limit, retry us}` requests; `{4, level, limit, retry us}`
/// tokens; `{5, level, limit}` a request larger than the tokens/minute limit.
pub const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
local n = tonumber(ARGV[1])
local member = ARGV[2]
local lease_ms = tonumber(ARGV[3])
local tokens = tonumber(ARGV[4])
local min_tokens = tonumber(ARGV[5])
local monthly = tonumber(ARGV[6])
local month_gone = tonumber(ARGV[7])
local MIN, DAY = 60000000, 86400000000
local function fmt(x) return string.format('%d', x) end
local function weight(cost, limit, period) return math.ceil(cost * period / limit) end
local function tat_for(tat, old, limit)
  if old == limit or old == 0 or tat <= now then return tat end
  return now + math.floor((tat - now) * old / limit)
end
local function take(tat, old, cost, limit, period)
  local nt = math.max(tat_for(tat, old, limit), now) + weight(cost, limit, period)
  if nt - now <= period then return nt, 0 end
  return nil, nt - now - period
end
local function arg(i, j) return tonumber(ARGV[7 + (i - 1) * 4 + j]) end
local record = KEYS[2 * n + 2]
if redis.call('EXISTS', record) == 1 then return {6} end

for i = 1, n do
  local maxc = arg(i, 4)
  if maxc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2 * i], '-inf', now_ms)
    if redis.call('ZCARD', KEYS[2 * i]) >= maxc then return {1, i, maxc} end
  end
end

local month_key = KEYS[2 * n + 1]
local used = tonumber(redis.call('GET', month_key) or '0')
local quota_reserved = tokens
if monthly > 0 then
  local need = math.max(min_tokens, 1)
  local left = monthly - used
  if left < need then return {2, fmt(used), need, monthly} end
  quota_reserved = math.min(tokens, left)
end

local new = {}
for i = 1, n do
  local rpm, rpd, tpm = arg(i, 1), arg(i, 2), arg(i, 3)
  local h = redis.call('HMGET', KEYS[2 * i - 1], 'm', 'ml', 'd', 'dl', 't', 'tl')
  local s = {}
  for j = 1, 6 do s[j] = tonumber(h[j] or '0') or 0 end
  local r = {}
  if rpm > 0 then
    local nt, wait = take(s[1], s[2], 1, rpm, MIN)
    if not nt then return {3, i, 1, rpm, fmt(wait)} end
    r.m = nt
  end
  if rpd > 0 then
    local nt, wait = take(s[3], s[4], 1, rpd, DAY)
    if not nt then return {3, i, 2, rpd, fmt(wait)} end
    r.d = nt
  end
  if tpm > 0 then
    if tokens > tpm then return {5, i, tpm} end
    local nt, wait = take(s[5], s[6], tokens, tpm, MIN)
    if not nt then return {4, i, tpm, fmt(wait)} end
    r.t = nt
  end
  new[i] = r
end

local rl, rr, rs, tl, tr, ts = -1, -1, 0, -1, -1, 0
local function remaining(tat, limit)
  local used_us = math.min(tat - now, MIN)
  return math.floor((MIN - used_us) * limit / MIN)
end
for i = 1, n do
  local rpm, rpd, tpm, maxc = arg(i, 1), arg(i, 2), arg(i, 3), arg(i, 4)
  local r = new[i]
  local f = {}
  local horizon = 0
  if r.m then
    f[#f + 1] = 'm'; f[#f + 1] = fmt(r.m); f[#f + 1] = 'ml'; f[#f + 1] = rpm
    horizon = math.max(horizon, r.m - now)
    local rem = remaining(r.m, rpm)
    if rr < 0 or rem < rr then rl, rr, rs = rpm, rem, r.m - now end
  end
  if r.d then
    f[#f + 1] = 'd'; f[#f + 1] = fmt(r.d); f[#f + 1] = 'dl'; f[#f + 1] = rpd
    horizon = math.max(horizon, r.d - now)
  end
  if r.t then
    f[#f + 1] = 't'; f[#f + 1] = fmt(r.t); f[#f + 1] = 'tl'; f[#f + 1] = tpm
    horizon = math.max(horizon, r.t - now)
    local rem = remaining(r.t, tpm)
    if tr < 0 or rem < tr then tl, tr, ts = tpm, rem, r.t - now end
  end
  if #f > 0 then
    redis.call('HSET', KEYS[2 * i - 1], unpack(f))
    local ttl = math.ceil(horizon / 1000) + 1000
    if redis.call('PTTL', KEYS[2 * i - 1]) < ttl then
      redis.call('PEXPIRE', KEYS[2 * i - 1], ttl)
    end
  end
  if maxc > 0 then
    redis.call('ZADD', KEYS[2 * i], fmt(now_ms + lease_ms), member)
    redis.call('PEXPIRE', KEYS[2 * i], lease_ms + 1000)
  end
end

local month_used = redis.call('INCRBY', month_key, fmt(quota_reserved))
redis.call('PEXPIREAT', month_key, fmt(month_gone))
redis.call('SET', record, fmt(quota_reserved), 'PX', lease_ms)
return {0, fmt(quota_reserved), month_used, rl, rr, fmt(rs), tl, tr, fmt(ts)}
"#;

/// Settles a request: frees its concurrency leases, gives back (or charges) the tokens it
/// did not use (or used beyond its reservation), and moves the monthly counter by the
/// difference between what was used and what admission counted. The request's record is
/// replaced by a mark (`s`) that lives for the record time, so that a retry of a settlement
/// that ran (its answer lost) does nothing.
///
/// A settlement whose record expired (it came more than `store.lease` after its admission)
/// still counts: the reservation is still in the month's counter. Unless the node says it
/// cannot rule out that an earlier try of it ran and that try's mark expired too (last ARGV
/// before the levels is 0): then it does nothing and answers -2.
///
/// ARGV: levels, lease id, tokens reserved, tokens used, monthly delta, when the month's
/// counter may go (unix ms), mode (`settle`, or `cancel`: undo an admission the node gave up
/// on), record ms, whether a missing record means "never settled" (1) or "cannot tell" (0);
/// then per level: tokens/minute, max concurrent (0: none).
/// Returns the month's counter, -1 when there was nothing (left) to do, -2 as above.
pub const SETTLE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local member = ARGV[2]
local reserved = tonumber(ARGV[3])
local used = tonumber(ARGV[4])
local delta = tonumber(ARGV[5])
local month_gone = tonumber(ARGV[6])
local mode = ARGV[7]
local record_ms = tonumber(ARGV[8])
local missing_is_unsettled = ARGV[9] == '1'
local record = KEYS[2 * n + 2]
local held = redis.call('GET', record)
-- Cancelled (or cancelled before it ran), or settled already.
if held == 'x' or held == 's' then return -1 end
if not held then
  if mode == 'cancel' then
    -- Never admitted (yet): a late admission finds this tombstone and does nothing.
    redis.call('SET', record, 'x', 'PX', record_ms)
    return -1
  end
  if not missing_is_unsettled then return -2 end
end
if mode == 'cancel' then
  used = 0
  delta = -tonumber(held)
end
redis.call('SET', record, 's', 'PX', record_ms)
local MIN = 60000000
local function fmt(x) return string.format('%d', x) end
local function weight(cost, limit) return math.ceil(cost * MIN / limit) end
for i = 1, n do
  local tpm = tonumber(ARGV[9 + (i - 1) * 2 + 1])
  local maxc = tonumber(ARGV[9 + (i - 1) * 2 + 2])
  if maxc > 0 then redis.call('ZREM', KEYS[2 * i], member) end
  if tpm > 0 and used ~= reserved then
    local h = redis.call('HMGET', KEYS[2 * i - 1], 't', 'tl')
    local tat, old = tonumber(h[1] or '0') or 0, tonumber(h[2] or '0') or 0
    if old ~= 0 and old ~= tpm and tat > now then
      tat = now + math.floor((tat - now) * old / tpm)
    end
    if used < reserved then
      if tat > now then tat = math.max(tat - weight(reserved - used, tpm), now) end
    else
      tat = math.max(tat, now) + weight(used - reserved, tpm)
    end
    redis.call('HSET', KEYS[2 * i - 1], 't', fmt(tat), 'tl', tpm)
    local ttl = math.ceil((tat - now) / 1000) + 1000
    if redis.call('PTTL', KEYS[2 * i - 1]) < ttl then
      redis.call('PEXPIRE', KEYS[2 * i - 1], ttl)
    end
  end
end
local month_key = KEYS[2 * n + 1]
local month_used = tonumber(redis.call('GET', month_key) or '0')
if delta ~= 0 then
  month_used = redis.call('INCRBY', month_key, fmt(delta))
  -- Below zero only when the counter was lost (a Redis restarted empty) with requests in
  -- flight: what they gave back was never in it.
  if month_used < 0 then
    redis.call('SET', month_key, '0')
    month_used = 0
  end
  redis.call('PEXPIREAT', month_key, fmt(month_gone))
end
return month_used
"#;

/// Adds usage counted while Redis was out of reach to a tenant's monthly counter, once per
/// write id (a write retried after a timeout that ran anyway is not counted twice).
/// KEYS: the month's counter, the write's id. ARGV: tokens, when the counter may go (unix ms).
pub const ADD_USAGE: &str = r#"
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', 86400000) then
  return tonumber(redis.call('GET', KEYS[1]) or '0')
end
local used = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return used
"#;

/// Lifts bans unbanned on this node (see [`super::bans`]), each unless Redis holds a ban of
/// the range made after the unban (on another node, while this one could not reach Redis),
/// and leaves a tombstone with the unban's time, so that a node that holds the ban as its own
/// and missed the unban does not push it back on its next resync.
///
/// KEYS: the bans hash, their expiry set, then a tombstone key per range. ARGV: how long
/// tombstones live (ms), then per range: the range, when it was unbanned (unix ms).
/// Returns the ranges lifted.
pub const UNBAN: &str = r#"
local memory = tonumber(ARGV[1])
local lifted = {}
for i = 1, #KEYS - 2 do
  local range, at = ARGV[2 * i], tonumber(ARGV[2 * i + 1])
  local rec = redis.call('HGET', KEYS[1], range)
  local newer = false
  if rec then
    local ok, r = pcall(cjson.decode, rec)
    newer = ok and type(r) == 'table' and (tonumber(r.created_ms) or 0) > at
  end
  if not newer then
    redis.call('HDEL', KEYS[1], range)
    redis.call('ZREM', KEYS[2], range)
    local prior = tonumber(redis.call('GET', KEYS[2 + i]) or '0') or 0
    if at > prior then
      redis.call('SET', KEYS[2 + i], string.format('%d', at), 'PX', memory)
    end
    lifted[#lifted + 1] = range
  end
end
return lifted
"#;

/// The compiled scripts (their SHA1s), shared by every decision.
pub struct Scripts {
    pub admit: Script,
    pub settle: Script,
    pub add_usage: Script,
    pub unban: Script,
}

impl Scripts {
    pub fn new() -> Self {
        Self {
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
            add_usage: Script::new(ADD_USAGE),
            unban: Script::new(UNBAN),
        }
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Self::new()
    }
}
