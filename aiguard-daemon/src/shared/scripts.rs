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
//! charged under; d/dl per day; t/tl tokens per minute; e: when the hash expires and c: when
//! the level's lease set expires, unix ms) and `KEYS[2i]` its concurrency leases (a sorted set
//! of lease ids scored by expiry, so a node that dies frees its slots; a settled lease scores
//! 0); then the tenant's token counter for the calendar month, then the request's record.
//!
//! Most of what a script costs Redis is the work around each `redis.call` (its arguments and
//! answer converted), more than the commands themselves; so the scripts make only the calls
//! that can change something. An expiry is renewed only when the hash's e or c says it would
//! fall short (then by a second more than needed) and never shortened (`GT`; only a key just
//! made has none); expired leases stay in their set until they could refuse a request or its
//! expiry is renewed; the month's counter gets its expiry when it is made (its name fixes it).
//! Script answers are numbers (integer replies).
use redis::Script;

/// Lua that ADMIT (for the settlements it carries) and SETTLE share: a settlement's tokens
/// given back to a tokens/minute bucket, and the month's counter moved. It needs `fmt`,
/// `floor`, `ceil` and `MIN` defined before it.
macro_rules! settlement_lua {
    () => {
        r#"
-- A token refund (or charge, below zero) in a tokens/minute arrival time at `now` (us).
local function give_back(tat, give, limit, now)
  if give > 0 then return math.max(tat - ceil(give * MIN / limit), now) end
  return math.max(tat, now) + ceil(-give * MIN / limit)
end

-- Gives `give` tokens back to (below zero: charges them to) the bucket of a level whose
-- tokens/minute limit is `tpm`. Tokens given back to a bucket that is full (its time passed, or
-- none) change nothing. Its expiry is renewed as ADMIT renews it: when e falls short of a second
-- past the arrival time.
local function give_tokens(bucket, tpm, give, now, now_ms)
  local h = redis.call('HMGET', bucket, 't', 'tl', 'e')
  local tat = (h[1] or 0) + 0
  if give > 0 and tat <= now then return end
  local limit = tpm + 0
  if tat > now and h[2] and h[2] ~= tpm then
    local old = h[2] + 0
    if old ~= 0 and old ~= limit then tat = now + floor((tat - now) * old / limit) end
  end
  tat = give_back(tat, give, limit, now)
  local due = now_ms + ceil((tat - now) / 1000) + 1000
  if (h[3] or 0) + 0 < due then
    local until_ = fmt('%d', due + 1000)
    redis.call('HSET', bucket, 't', fmt('%d', tat), 'tl', tpm, 'e', until_)
    -- NX for a hash just made, GT for one that was there.
    if redis.call('PEXPIREAT', bucket, until_, 'NX') == 0 then
      redis.call('PEXPIREAT', bucket, until_, 'GT')
    end
  else
    redis.call('HSET', bucket, 't', fmt('%d', tat), 'tl', tpm)
  end
end

-- Moves the month's counter by `delta` (`delta_s` as a string); a counter just made gets its
-- expiry, `gone`. Returns the counter.
local function move_month(month_key, delta_s, delta, gone)
  local used = redis.call('INCRBY', month_key, delta_s)
  if used < 0 then
    -- Below zero only when the counter was lost (a Redis restarted empty) with requests in
    -- flight: what they gave back was never in it.
    redis.call('SET', month_key, '0')
    redis.call('PEXPIREAT', month_key, gone)
    return 0
  elseif used == delta then
    -- It was 0 or none: a counter just made gets its expiry (one that was there has it).
    redis.call('PEXPIREAT', month_key, gone)
  end
  return used
end
"#
    };
}

/// Admits a request against every level at once, or refuses it and changes nothing of its own
/// (the settlements it carries are applied either way).
///
/// ARGV: levels, lease id, lease ms, tokens reserved, least tokens needed, monthly limit
/// (0: none), when the month's counter may go (unix ms); then per level: requests/minute,
/// requests/day, tokens/minute, max concurrent (0: none); then the number of settlements
/// carried, and per settlement: its lease id, tokens reserved, tokens used, monthly delta, and
/// a mask (bit i-1: it holds a lease at level i; bit i+2: its tokens were charged at level i).
/// KEYS after the request's record: each carried settlement's record.
///
/// A carried settlement is an earlier request of the same tenant, key and model this month,
/// settled by the node and waiting to ride with this call: the same work as `SETTLE` (record
/// marked, leases freed, tokens given back, the month's counter moved), in the reads and writes
/// this admission makes anyway.
///
/// Returns `{0, quota reserved, month used, req limit, req remaining, req reset us, tok limit,
/// tok remaining, tok reset us, tight}` (limits -1 when none; tight 1 when a level's leases
/// were over half its cap), `{6}` when the request was cancelled before this ran (a refusal
/// answers first: neither changes anything), or a refusal:
/// `{1, level, limit}` concurrency; `{2, used, needed, limit}` monthly quota;
/// `{3, level, 1|2 (minute|day), limit, retry us}` requests; `{4, level, limit, retry us}`
/// tokens; `{5, level, limit}` a request larger than the tokens/minute limit.
pub const ADMIT: &str = concat!(
    r#"
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
local now_ms = math.floor(now / 1000)
local n = ARGV[1] + 0
local fmt, floor, ceil = string.format, math.floor, math.ceil
local tokens = ARGV[4] + 0
local MIN, DAY = 60000000, 86400000000
"#,
    settlement_lua!(),
    r#"
local month_key = KEYS[2 * n + 1]

-- Settlements this call carries (earlier requests of the same tenant, key and model, this
-- month): applied whatever this admission's outcome. Their records are marked settled and their
-- leases freed first (expired in place, as SETTLE does: the set lives on for this lease instead
-- of being deleted and made anew, and the check below sweeps them when they could refuse); what
-- they give back to each level's tokens/minute bucket (back[i]) and
-- move the month's counter by (carried) goes in with this admission's own writes, or through
-- settle_carried when it is refused.
local back = {0, 0, 0}
local carried = 0
local cbase = 8 + 4 * n
local m = tonumber(ARGV[cbase]) or 0
if m > 0 then
  local freed = {{}, {}, {}}
  for j = 1, m do
    local a = cbase + 5 * j - 5
    local rk = KEYS[2 * n + 2 + j]
    local held = redis.call('GET', rk)
    if held ~= 'x' and held ~= 's' then
      redis.call('SET', rk, 's', 'PX', ARGV[3])
      local give = ARGV[a + 2] - ARGV[a + 3]
      carried = carried + ARGV[a + 4]
      -- Bit i-1: leases held at level i; bit i+2: tokens charged there.
      local mask = ARGV[a + 5] + 0
      for i = 1, 3 do
        if mask % 2 == 1 then local f = freed[i]; f[#f + 1] = '0'; f[#f + 1] = ARGV[a + 1] end
        mask = floor(mask / 2)
      end
      for i = 1, 3 do
        if mask % 2 == 1 then back[i] = back[i] + give end
        mask = floor(mask / 2)
      end
    end
  end
  for i = 1, n do
    if #freed[i] > 0 then redis.call('ZADD', KEYS[2 * i], 'XX', unpack(freed[i])) end
  end
end

-- The carried settlements' refunds and the month's move, when this admission writes nothing.
local function settle_carried()
  for i = 1, n do
    local tpm = ARGV[6 + 4 * i]
    if back[i] ~= 0 and tpm ~= '0' then give_tokens(KEYS[2 * i - 1], tpm, back[i], now, now_ms) end
  end
  if carried ~= 0 then move_month(month_key, fmt('%d', carried), carried, ARGV[7]) end
end
local function refuse(answer)
  if m > 0 then settle_carried() end
  return answer
end

-- Leases in each level's set, expired ones too unless they could refuse (0: no set yet).
local held = {false, false, false}
local tight = 0
for i = 1, n do
  local maxc = ARGV[7 + 4 * i]
  if maxc ~= '0' then
    maxc = maxc + 0
    local c = redis.call('ZCARD', KEYS[2 * i])
    if c >= maxc then
      c = c - redis.call('ZREMRANGEBYSCORE', KEYS[2 * i], '-inf', now_ms)
      if c >= maxc then return refuse({1, i, maxc}) end
    end
    held[i] = c
    -- Over half full: this request's settlement should free its slot at once.
    if 2 * (c + 1) > maxc then tight = 1 end
  end
end

local quota_reserved = tokens
if ARGV[6] ~= '0' then
  local monthly = ARGV[6] + 0
  local used = math.max((redis.call('GET', month_key) or 0) + carried, 0)
  local need = math.max(ARGV[5] + 0, 1)
  local left = monthly - used
  if left < need then return refuse({2, used, need, monthly}) end
  quota_reserved = math.min(tokens, left)
end

-- Per level with a rate, in st[5i-4 .. 5i]: the new arrival times (m, d, t), whether its hash
-- was there, how far its last arrival time is ahead. (Tables made at their size: one that
-- grows is rehashed at every power of two.) A time still ahead that was charged under another
-- limit is rescaled to this one.
local rl, rr, rs, tl, tr, ts = -1, -1, 0, -1, -1, 0
local st = {false, false, false, false, false, false, false, false, false, false, false, false,
  false, false, false}
local hs = {false, false, false}
for i = 1, n do
  local rpm, rpd, tpm = ARGV[4 + 4 * i], ARGV[5 + 4 * i], ARGV[6 + 4 * i]
  if rpm ~= '0' or rpd ~= '0' or tpm ~= '0' then
    local h = redis.call('HMGET', KEYS[2 * i - 1], 'm', 'ml', 'd', 'dl', 't', 'tl', 'e', 'c')
    local b = 5 * i - 5
    local horizon = 0
    st[b + 4] = h[1] or h[3] or h[5]
    if rpm ~= '0' then
      local limit = rpm + 0
      local tat = (h[1] or 0) + 0
      if tat > now and h[2] and h[2] ~= rpm then
        local old = h[2] + 0
        if old ~= 0 and old ~= limit then tat = now + floor((tat - now) * old / limit) end
      end
      if tat < now then tat = now end
      tat = tat + ceil(1 * MIN / limit)
      horizon = tat - now
      if horizon > MIN then return refuse({3, i, 1, limit, horizon - MIN}) end
      st[b + 1] = tat
      local rem = floor((MIN - horizon) * limit / MIN)
      if rr < 0 or rem < rr then rl, rr, rs = limit, rem, horizon end
    end
    if rpd ~= '0' then
      local limit = rpd + 0
      local tat = (h[3] or 0) + 0
      if tat > now and h[4] and h[4] ~= rpd then
        local old = h[4] + 0
        if old ~= 0 and old ~= limit then tat = now + floor((tat - now) * old / limit) end
      end
      if tat < now then tat = now end
      tat = tat + ceil(1 * DAY / limit)
      local ahead = tat - now
      if ahead > DAY then return refuse({3, i, 2, limit, ahead - DAY}) end
      st[b + 2] = tat
      if ahead > horizon then horizon = ahead end
    end
    if tpm ~= '0' then
      local limit = tpm + 0
      if tokens > limit then return refuse({5, i, limit}) end
      local tat = (h[5] or 0) + 0
      if tat > now and h[6] and h[6] ~= tpm then
        local old = h[6] + 0
        if old ~= 0 and old ~= limit then tat = now + floor((tat - now) * old / limit) end
      end
      if back[i] ~= 0 then tat = give_back(tat, back[i], limit, now) end
      if tat < now then tat = now end
      tat = tat + ceil(tokens * MIN / limit)
      local ahead = tat - now
      if ahead > MIN then return refuse({4, i, limit, ahead - MIN}) end
      st[b + 3] = tat
      if ahead > horizon then horizon = ahead end
      local rem = floor((MIN - ahead) * limit / MIN)
      if tr < 0 or rem < tr then tl, tr, ts = limit, rem, ahead end
    end
    st[b + 5] = horizon
    hs[i] = h
  end
end

-- The record, unless one is there: a cancellation ran first (or this ran already). Made
-- after the checks, so that a refusal writes nothing (and answers before {6} would).
local record = KEYS[2 * n + 2]
local reserved_s = quota_reserved == tokens and ARGV[4] or fmt('%d', quota_reserved)
if not redis.call('SET', record, reserved_s, 'PX', ARGV[3], 'NX') then return refuse({6}) end

local lease_ms = ARGV[3] + 0
local lease_at, lease_until
local lease_due = now_ms + lease_ms + 1000
local f = {false, false, false, false, false, false, false, false, false, false, false, false,
  false, false, false, false}
for i = 1, n do
  local bucket, leases = KEYS[2 * i - 1], KEYS[2 * i]
  local c = held[i]
  if c then
    lease_at = lease_at or fmt('%d', now_ms + lease_ms)
    redis.call('ZADD', leases, lease_at, ARGV[2])
  end
  local h = hs[i]
  if h then
    -- A limit is written only when it is not the one the hash holds.
    local b, k = 5 * i - 5, 0
    local rpm, rpd, tpm = ARGV[4 + 4 * i], ARGV[5 + 4 * i], ARGV[6 + 4 * i]
    if rpm ~= '0' then
      f[1] = 'm'; f[2] = fmt('%d', st[b + 1]); k = 2
      if h[2] ~= rpm then f[3] = 'ml'; f[4] = rpm; k = 4 end
    end
    if rpd ~= '0' then
      f[k + 1] = 'd'; f[k + 2] = fmt('%d', st[b + 2]); k = k + 2
      if h[4] ~= rpd then f[k + 1] = 'dl'; f[k + 2] = rpd; k = k + 2 end
    end
    if tpm ~= '0' then
      f[k + 1] = 't'; f[k + 2] = fmt('%d', st[b + 3]); k = k + 2
      if h[6] ~= tpm then f[k + 1] = 'tl'; f[k + 2] = tpm; k = k + 2 end
    end
    -- The hash lives at least a second past its last arrival time.
    local due = now_ms + ceil(st[b + 5] / 1000) + 1000
    local until_
    if (h[7] or 0) + 0 < due then
      until_ = fmt('%d', due + 1000)
      f[k + 1] = 'e'; f[k + 2] = until_; k = k + 2
    end
    -- The lease set, at least a second past its last lease.
    local renew_leases = c and (c == 0 or (h[8] or 0) + 0 < lease_due)
    if renew_leases then
      lease_until = lease_until or fmt('%d', lease_due + 1000)
      f[k + 1] = 'c'; f[k + 2] = lease_until; k = k + 2
    end
    redis.call('HSET', bucket, unpack(f, 1, k))
    if until_ then
      if st[b + 4] then
        redis.call('PEXPIREAT', bucket, until_, 'GT')
      else
        redis.call('PEXPIREAT', bucket, until_)
      end
    end
    if renew_leases then
      if c > 0 then
        redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms)
        redis.call('PEXPIREAT', leases, lease_until, 'GT')
      else
        redis.call('PEXPIREAT', leases, lease_until)
      end
    end
  elseif c then
    -- No hash to note the set's expiry in: renewed (and swept) every time.
    if c > 0 then redis.call('ZREMRANGEBYSCORE', leases, '-inf', now_ms) end
    redis.call('PEXPIRE', leases, fmt('%d', lease_ms + 1000))
  end
end

local inc = quota_reserved + carried
local month_used = redis.call('INCRBY', month_key, carried == 0 and reserved_s or fmt('%d', inc))
if month_used < quota_reserved then
  -- Below this reservation only when the counter was lost (a Redis restarted empty) with
  -- carried requests in flight: what they gave back was never in it.
  redis.call('SET', month_key, reserved_s)
  redis.call('PEXPIREAT', month_key, ARGV[7])
  month_used = quota_reserved
elseif month_used == inc then
  -- It was 0 or none: a counter just made gets its expiry (one that was there has it).
  redis.call('PEXPIREAT', month_key, ARGV[7])
end
return {0, quota_reserved, month_used, rl, rr, rs, tl, tr, ts, tight}
"#
);

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
pub const SETTLE: &str = concat!(
    r#"
local n = ARGV[1] + 0
local record = KEYS[2 * n + 2]
local held = redis.call('GET', record)
-- Cancelled (or cancelled before it ran), or settled already.
if held == 'x' or held == 's' then return -1 end
local mode = ARGV[7]
if not held then
  if mode == 'cancel' then
    -- Never admitted (yet): a late admission finds this tombstone and does nothing.
    redis.call('SET', record, 'x', 'PX', ARGV[8])
    return -1
  end
  if ARGV[9] ~= '1' then return -2 end
end
local fmt, floor, ceil = string.format, math.floor, math.ceil
local MIN = 60000000
"#,
    settlement_lua!(),
    r#"
local reserved, used, delta, delta_s = ARGV[3] + 0, ARGV[4] + 0, ARGV[5] + 0, ARGV[5]
if mode == 'cancel' then
  used = 0
  delta = -held
  delta_s = fmt('%d', delta)
end
redis.call('SET', record, 's', 'PX', ARGV[8])
local now, now_ms
for i = 1, n do
  -- Freed by expiring it now (XX: a lease swept already stays gone), so that its set lives on
  -- for the next lease instead of being made anew; ADMIT sweeps it with the expired ones.
  if ARGV[9 + 2 * i] ~= '0' then redis.call('ZADD', KEYS[2 * i], 'XX', '0', ARGV[2]) end
  local tpm = ARGV[8 + 2 * i]
  if tpm ~= '0' and used ~= reserved then
    if not now then
      local t = redis.call('TIME')
      now = t[1] * 1000000 + t[2]
      now_ms = floor(now / 1000)
    end
    give_tokens(KEYS[2 * i - 1], tpm, reserved - used, now, now_ms)
  end
end
local month_key = KEYS[2 * n + 1]
if delta == 0 then return (redis.call('GET', month_key) or 0) + 0 end
return move_month(month_key, delta_s, delta, ARGV[6])
"#
);

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
