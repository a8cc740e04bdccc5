"""Trim what every consumer group of a stream has acknowledged.

MAXLEN alone lets a stream grow to its bound (100,000 entries; at 64 KiB per scored
group that is gigabytes) although the entries its consumers finished are never read
again. :func:`trim_acknowledged` removes, atomically (one Lua script), every entry
older than the oldest one some group still needs:

* a group with pending entries (delivered, not acknowledged) needs its oldest pending
  entry and everything after it;
* a group with nothing pending has acknowledged everything up to its last-delivered id
  and needs what follows.

``XTRIM key MINID <that id>`` then deletes only entries every group has acknowledged.
A stream without any consumer group is left alone (its consumers have not registered
yet; MAXLEN still bounds it), and so are entries a stalled group has not acknowledged:
one dead group holds the trim back, visibly, as its lag metric grows.
"""

from __future__ import annotations

from typing import Any, NamedTuple, cast

import redis

# Returns {removed, min_id}; min_id is "" when nothing may be trimmed.
_TRIM_LUA = """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 or redis.call('TYPE', key).ok ~= 'stream' then
  return {0, ''}
end
local groups = redis.call('XINFO', 'GROUPS', key)
if #groups == 0 then return {0, ''} end
local best_ms, best_seq = nil, nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
  local id
  if tonumber(info['pending']) > 0 then
    id = redis.call('XPENDING', key, info['name'])[2]
  else
    id = info['last-delivered-id']
  end
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  ms, seq = tonumber(ms), tonumber(seq)
  if tonumber(info['pending']) == 0 then seq = seq + 1 end
  if best_ms == nil or ms < best_ms or (ms == best_ms and seq < best_seq) then
    best_ms, best_seq = ms, seq
  end
end
local min_id = string.format('%.0f-%.0f', best_ms, best_seq)
local removed = redis.call('XTRIM', key, 'MINID', min_id)
return {removed, min_id}
"""


class TrimResult(NamedTuple):
    """What one trim did: entries removed and the oldest id kept (None: no trim)."""

    removed: int
    min_id: str | None


def trim_acknowledged(redis_client: redis.Redis, stream_key: str) -> TrimResult:
    """Delete the entries of ``stream_key`` that every consumer group has acknowledged."""
    raw = cast("list[Any]", redis_client.eval(_TRIM_LUA, 1, stream_key))
    removed, min_id = int(raw[0]), raw[1]
    if isinstance(min_id, bytes):
        min_id = min_id.decode()
    return TrimResult(removed, str(min_id) or None)
