"""Quota state shared through Redis: one Lua script, one atomic call per operation.

The script is the twin of `limiting_local.evaluate` (same argument vector, same
answers). Each quota owns four keys under the hash tag ``{namespace/quota}``,
so that one quota's keys share a Redis Cluster slot; every key expires. Time
comes from Redis's own clock (TIME), so replicas with skewed clocks agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from headway_contract import RedisSettings
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

KEY_PREFIX = "headway"
KEY_KINDS = ("minute", "day", "month", "leases")
MAX_CONNECTIONS = 8  # per sidecar; a script call holds one for well under a millisecond

# NB: everything stored goes through fmt(): Lua's tostring() keeps only 14
# significant digits, which would round bucket levels of large limits.
SCRIPT = r"""
local TICKS, DAY_MS, CONCURRENCY_WAIT_MS = 60000, 86400000, 1000
local REFUSED, ADMITTED, DEMOTED, NEVER_FITS = 0, 1, 2, 3
local TPM, RPM, TPD, CONCURRENCY, COST = 1, 2, 3, 4, 5
local RESERVE_HEADER, RESERVE_BLOCK, ADJUST_HEADER, ADJUST_BLOCK = 8, 5, 11, 4
local RENEW_HEADER = 4
local floor = math.floor

local function fmt(x) return string.format('%.0f', x) end
-- Exact for integers below 2**53, where a/b alone may round across an integer.
local function ceil_div(a, b)
  local q = floor(a / b)
  if q * b < a then q = q + 1 elseif (q - 1) * b >= a then q = q - 1 end
  return q
end
local function num(x) return tonumber(x) or 0 end

-- Howard Hinnant's civil-from-days, for UTC day and month windows.
local function civil(days)
  local z = days + 719468
  local era = floor(z / 146097)
  local doe = z - era * 146097
  local yoe = floor((doe - floor(doe / 1460) + floor(doe / 36524) - floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + floor(yoe / 4) - floor(yoe / 100))
  local mp = floor((5 * doy + 2) / 153)
  local d = doy - floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m, d
end

local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = floor(y / 400)
  local yoe = y - era * 400
  local mp = m > 2 and m - 3 or m + 9
  local doy = floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function windows(now)
  local days = floor(now / DAY_MS)
  local y, m, d = civil(days)
  local ny, nm = y, m + 1
  if nm > 12 then ny, nm = y + 1, 1 end
  return y * 10000 + m * 100 + d, (days + 1) * DAY_MS, y * 100 + m,
    days_from_civil(ny, nm, 1) * DAY_MS
end

local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
end
local op, n = ARGV[1], tonumber(ARGV[3])
local day_id, day_end, month_id, month_end = windows(now)

local function key(i, kind) return KEYS[(i - 1) * 4 + kind] end
local MINUTE, DAY, MONTH, LEASES = 1, 2, 3, 4

-- A bucket: used ticks at a time, draining `rate` ticks per ms.
local function bucket(i, p)
  local v = redis.call('HMGET', key(i, MINUTE), p .. 'u', p .. 'a', p .. 'r')
  return { used = num(v[1]), at = num(v[2]), rate = num(v[3]) }
end
local function level(b) return math.max(0, b.used - math.max(0, now - b.at) * b.rate) end
local function store_bucket(i, p, used, rate)
  redis.call('HSET', key(i, MINUTE), p .. 'u', fmt(used), p .. 'a', fmt(now), p .. 'r', fmt(rate))
end
-- The minute hash lives until both its buckets have drained.
local function expire_minute(i)
  local longest = 0
  for _, p in ipairs({ 't', 'r' }) do
    local b = bucket(i, p)
    if b.rate > 0 then longest = math.max(longest, ceil_div(level(b), b.rate)) end
  end
  redis.call('PEXPIRE', key(i, MINUTE), fmt(longest + 1000))
end

local function day_counts(i)
  local v = redis.call('HMGET', key(i, DAY), 'id', 'tokens', 'requests')
  if num(v[1]) ~= day_id then return 0, 0 end
  return num(v[2]), num(v[3])
end
local function store_day(i, tokens, requests)
  redis.call('HSET', key(i, DAY), 'id', fmt(day_id), 'tokens', fmt(tokens),
    'requests', fmt(requests))
  redis.call('PEXPIRE', key(i, DAY), fmt(day_end - now + 60000))
end
local function month_cost(i)
  local v = redis.call('HMGET', key(i, MONTH), 'id', 'cost')
  if num(v[1]) ~= month_id then return 0 end
  return num(v[2])
end
local function store_month(i, cost)
  redis.call('HSET', key(i, MONTH), 'id', fmt(month_id), 'cost', fmt(cost))
  redis.call('PEXPIRE', key(i, MONTH), fmt(month_end - now + 60000))
end

local function held(i)
  redis.call('ZREMRANGEBYSCORE', key(i, LEASES), '-inf', fmt(now))
  return redis.call('ZCARD', key(i, LEASES))
end
-- The lease set lives as long as its longest lease.
local function expire_leases(i)
  local last = redis.call('ZRANGE', key(i, LEASES), -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIRE', key(i, LEASES), fmt(math.max(1, num(last[2]) - now) + 1000))
  end
end

local function reserve()
  local tokens, cost = tonumber(ARGV[4]), tonumber(ARGV[5])
  local may_demote, member, lease = ARGV[6] == '1', ARGV[7], tonumber(ARGV[8])
  local limits, levels = {}, {}
  for i = 1, n do
    local b = RESERVE_HEADER + (i - 1) * RESERVE_BLOCK
    limits[i] = { tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]),
      tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5]) }
    local t, r = 0, 0
    if limits[i][TPM] >= 0 then t = level(bucket(i, 't')) end
    if limits[i][RPM] >= 0 then r = level(bucket(i, 'r')) end
    levels[i] = { t, r }
  end

  local function answer(outcome, code, index, wait)
    local out = { outcome, code, index, wait, now, day_id, month_id }
    for i = 1, n do
      out[#out + 1] = levels[i][1]
      out[#out + 1] = levels[i][2]
    end
    return out
  end

  for i = 1, n do
    local l = limits[i]
    local code = 0
    if l[TPM] >= 0 and l[TPM] < tokens then code = TPM
    elseif l[RPM] >= 0 and l[RPM] < 1 then code = RPM
    elseif l[TPD] >= 0 and l[TPD] < tokens then code = TPD
    elseif l[CONCURRENCY] >= 0 and l[CONCURRENCY] < 1 then code = CONCURRENCY
    elseif l[COST] >= 0 and l[COST] < cost then code = COST end
    if code ~= 0 then return answer(NEVER_FITS, code, i, 0) end
  end

  local minute, hard = false, false
  local worst, worst_index, worst_wait = 0, 0, 0
  local slow, slow_index, slow_wait = 0, 0, 0
  for i = 1, n do
    local l = limits[i]
    local waits = { 0, 0, 0, 0, 0 }
    if l[TPM] >= 0 then
      waits[TPM] = math.max(0, ceil_div(levels[i][1] + (tokens - l[TPM]) * TICKS, l[TPM]))
    end
    if l[RPM] >= 0 then
      waits[RPM] = math.max(0, ceil_div(levels[i][2] + (1 - l[RPM]) * TICKS, l[RPM]))
    end
    if l[TPD] >= 0 then
      local day_tokens = day_counts(i)
      if day_tokens + tokens > l[TPD] then waits[TPD] = day_end - now end
    end
    if l[CONCURRENCY] >= 0 and held(i) >= l[CONCURRENCY] then
      waits[CONCURRENCY] = CONCURRENCY_WAIT_MS
    end
    if l[COST] >= 0 and month_cost(i) + cost > l[COST] then waits[COST] = month_end - now end
    minute = minute or waits[TPM] > 0 or waits[RPM] > 0
    hard = hard or waits[TPD] > 0 or waits[CONCURRENCY] > 0 or waits[COST] > 0
    for code = TPM, RPM do
      if waits[code] > slow_wait then slow, slow_index, slow_wait = code, i, waits[code] end
    end
    for code = TPM, COST do
      if waits[code] > worst_wait and not (may_demote and code <= RPM) then
        worst, worst_index, worst_wait = code, i, waits[code]
      end
    end
  end
  if hard or (minute and not may_demote) then
    return answer(REFUSED, worst, worst_index, worst_wait)
  end

  for i = 1, n do
    local l = limits[i]
    if not minute then
      if l[TPM] >= 0 then
        levels[i][1] = levels[i][1] + tokens * TICKS
        store_bucket(i, 't', levels[i][1], l[TPM])
      end
      if l[RPM] >= 0 then
        levels[i][2] = levels[i][2] + TICKS
        store_bucket(i, 'r', levels[i][2], l[RPM])
      end
      if l[TPM] >= 0 or l[RPM] >= 0 then expire_minute(i) end
    end
    local day_tokens, day_requests = day_counts(i)
    store_day(i, day_tokens + tokens, day_requests + 1)
    store_month(i, month_cost(i) + cost)
    if l[CONCURRENCY] >= 0 then
      redis.call('ZADD', key(i, LEASES), fmt(now + lease), member)
      expire_leases(i)
    end
  end
  if minute then return answer(DEMOTED, slow, slow_index, slow_wait) end
  return answer(ADMITTED, 0, 0, 0)
end

-- Give back only what is left of the reservation after draining since t0;
-- the rest has already flowed out and refunding it would over-grant.
local function adjust_bucket(i, p, limit, delta, end_level, t0)
  if limit < 0 or delta == 0 then return end
  if delta < 0 then
    local left = end_level - math.max(0, now - t0) * limit
    if left <= 0 then return end
    delta = math.max(delta, -left)
  end
  store_bucket(i, p, math.max(0, level(bucket(i, p)) + delta), limit)
  expire_minute(i)
end

local function adjust()
  local t0, charged = tonumber(ARGV[4]), ARGV[5] == '1'
  local tokens_delta, requests_delta = tonumber(ARGV[6]), tonumber(ARGV[7])
  local for_day, for_month, cost_delta = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])
  local member = ARGV[11]
  for i = 1, n do
    local b = ADJUST_HEADER + (i - 1) * ADJUST_BLOCK
    if charged then
      adjust_bucket(i, 't', tonumber(ARGV[b + 1]), tokens_delta * TICKS, tonumber(ARGV[b + 3]), t0)
      adjust_bucket(i, 'r', tonumber(ARGV[b + 2]), requests_delta * TICKS, tonumber(ARGV[b + 4]),
        t0)
    end
    -- Adjustments to a window that has closed are dropped: the new one owes nothing.
    if for_day == day_id and (tokens_delta ~= 0 or requests_delta ~= 0) then
      local tokens, requests = day_counts(i)
      store_day(i, math.max(0, tokens + tokens_delta), math.max(0, requests + requests_delta))
    end
    if for_month == month_id and cost_delta ~= 0 then
      store_month(i, math.max(0, month_cost(i) + cost_delta))
    end
    if member ~= '' then redis.call('ZREM', key(i, LEASES), member) end
  end
  return { now }
end

local function usage()
  local out = {}
  for i = 1, n do
    local tokens, requests = day_counts(i)
    for _, v in ipairs({ level(bucket(i, 't')), level(bucket(i, 'r')), tokens, requests,
      month_cost(i), held(i) }) do
      out[#out + 1] = v
    end
  end
  return out
end

local function renew()
  local lease = tonumber(ARGV[4])
  for i = 1, n do
    for m = RENEW_HEADER + 1, #ARGV do
      redis.call('ZADD', key(i, LEASES), 'XX', fmt(now + lease), ARGV[m])
    end
    expire_leases(i)
  end
  return { now }
end

if #KEYS ~= n * 4 then return redis.error_reply('expected 4 keys per quota') end
if op == 'reserve' then return reserve() end
if op == 'adjust' then return adjust() end
if op == 'usage' then return usage() end
if op == 'renew' then return renew() end
return redis.error_reply('unknown limiter operation ' .. tostring(op))
"""


def keys(quota_ids: Sequence[str]) -> list[str]:
    """The script's KEYS: four per quota, in `KEY_KINDS` order, sharing the quota's hash tag."""
    return [f"{KEY_PREFIX}:{{{q}}}:{kind}" for q in quota_ids for kind in KEY_KINDS]


def connect(settings: RedisSettings, timeout: float) -> aioredis.Redis:
    """A client whose every wait is bounded by ``timeout`` seconds and which never retries.

    NB: retries belong to the limiter's circuit breaker; redis-py's own would
    multiply the time a request can spend on a dead Redis.
    """
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 0,
    }
    tls = (settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file)
    if any(tls) and not settings.url.startswith("rediss://"):
        raise ValueError(
            f"TLS files are set, so the Redis URL must be rediss://, not {_scheme(settings.url)}"
        )
    if settings.password_file:
        options["password"] = Path(settings.password_file).read_text().strip()
    if settings.tls_ca_file:
        options["ssl_ca_certs"] = settings.tls_ca_file
    if settings.tls_cert_file:
        options["ssl_certfile"] = settings.tls_cert_file
    if settings.tls_key_file:
        options["ssl_keyfile"] = settings.tls_key_file
    # Connections are bounded too: a burst waits (within `timeout`) for one
    # instead of opening hundreds.
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url, max_connections=MAX_CONNECTIONS, timeout=timeout, **options
    )
    return aioredis.Redis.from_pool(pool)


def _scheme(url: str) -> str:
    # NB: never the whole URL: it may carry a password.
    return url.split("://", 1)[0] + "://" if "://" in url else "a URL without a scheme"


class RedisStore:
    """Runs the script in Redis; the same `call` as `limiting_local.LocalStore`."""

    def __init__(self, settings: RedisSettings, timeout: float) -> None:
        self.settings = settings
        self.client = connect(settings, timeout)
        self._script = self.client.register_script(SCRIPT)

    async def call(self, quota_ids: Sequence[str], args: Sequence[str]) -> list[int]:
        answer = await self._script(keys=keys(quota_ids), args=list(args))
        return [int(x) for x in answer]

    async def aclose(self) -> None:
        await self.client.aclose()
