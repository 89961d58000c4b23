"""How a room lives in Redis: its keys, the scripts that change them, and the envelope.

Per room, these Redis names, hash-tagged on the room so that a Redis Cluster
keeps them on one shard and one script may touch them together:

- ``wsfan:{room}:m``  hash: ``s`` = the room's last seq, ``e`` = its epoch; TTL ``history_meta_ttl``,
  refreshed by every publish and by every join of a room published in. Before its first
  publish (no ``s``) the hash holds only the epoch its joins acked, with TTL ``presence_ttl``
  (a join creates it), kept alive by every node subscribed to the room (``HOLD_LUA``, every
  third of it): it goes soon after its last subscriber, so joins of names nobody publishes
  in leave nothing in Redis (hostile finding 13: each one left a key for a day)
- ``wsfan:{room}:h``  stream: the last ~``history_size`` envelopes, entry id ``<seq>-0``; TTL
  ``history_ttl``, refreshed by every publish
- ``wsfan:{room}:p``  hash: conn id -> msgpack ``[user, joined_at ms]``, the room's presence
- ``wsfan:{room}:x``  sorted set: conn id -> when its presence expires (Redis ``TIME``, seconds);
  both presence keys have TTL ``presence_ttl``, refreshed by every node holding members
  (Centrifugo's layout: a hash plus a sorted set of expiries)
- ``wsfan:{room}``    the pub/sub channel every node with local subscribers listens on

Every key has a TTL, so a room nobody uses leaves Redis by itself. When the meta hash
expires the room's next publish or join creates it again under a new epoch: the seq
restarts, and the epoch tells clients so (``recovered: false``), never wrong data. A
room never published in has nothing a client could miss, so its short-lived hash costs
only this: a subscriber that rejoins after nobody held the room for ``presence_ttl`` gets
``recovered: false`` and a new epoch, with nothing to replay.

``joined``/``left`` events travel on the room's channel as envelopes with seq 0 (seqs start
at 1), ``[0, [user, 1 joined | 0 left, conn, ts, b""]]``, so that they keep their order
with the room's messages and are never numbered or kept in history.

A reserved room (``$...``, the server's own: ``server/control.py``) has none of these keys
but presence's: its publications are commands, sent with a plain ``PUBLISH`` of the envelope
``[-1, body]`` (``UNNUMBERED_SEQ``): never numbered, never kept, so nothing of them stays in
Redis (the broker contract's "Reserved rooms").

A publish is one Lua script (HINCRBY + XADD ~MAXLEN + PUBLISH), so a seq is
assigned, kept in history and fanned out in one atomic step: seq has no gaps
across nodes, and what history says and what subscribers saw cannot disagree.

The epoch is a random string created together with a room's seq. Redis losing
the room (restart without persistence, FLUSHALL, eviction) restarts its seq at 1
under a new epoch, which a client's ``since`` alone could not tell from a seq it
has seen; a join that carries the epoch it knew is then not reported recovered.

The envelope is msgpack ``[seq, [sender, encoding, origin, ts, payload]]``. The
node encodes the inner array once with msgspec; the script, the only place the
seq is known, prepends the array header and the seq. The payload travels as a
msgpack ``bin``: the publisher's bytes, never decoded or re-encoded.
"""

from __future__ import annotations

import msgspec

PREFIX = "wsfan:"

# KEYS: meta hash, history stream. ARGV: body, channel, history size, epoch for a new room,
# history TTL (s), meta TTL (s).
PUBLISH_LUA = """
if redis.call('HSETNX', KEYS[1], 'e', ARGV[4]) == 1 then
  redis.call('DEL', KEYS[2])
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('EXPIRE', KEYS[1], ARGV[6])
local msg = string.char(146) .. cmsgpack.pack(seq) .. ARGV[1]
if tonumber(ARGV[3]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], string.format('%d-0', seq), 'm', msg)
  redis.call('EXPIRE', KEYS[2], ARGV[5])
end
redis.call('PUBLISH', ARGV[2], msg)
return seq
"""

# KEYS: meta hash, history stream. ARGV: since ('' = none), the client's epoch ('' = none),
# epoch for a new room, meta TTL (s), hold TTL (s). Returns {seq, epoch, envelope...}: the envelopes
# after since, or all of them when the client's epoch is not the room's (its since belongs to another
# numbering). A room is created here too, so that the epoch a first join acks is the one later
# publishes keep; until its first publish (no 's') it lives the hold TTL, not the meta TTL.
HISTORY_LUA = """
if redis.call('HSETNX', KEYS[1], 'e', ARGV[3]) == 1 then
  redis.call('DEL', KEYS[2])
end
local meta = redis.call('HMGET', KEYS[1], 's', 'e')
if meta[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
else
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
local seq = tonumber(meta[1]) or 0
local out = {seq, meta[2]}
if ARGV[1] ~= '' then
  local first = nil
  if ARGV[2] ~= '' and ARGV[2] ~= meta[2] then
    first = '-'
  elseif tonumber(ARGV[1]) < seq then
    first = string.format('%d-0', tonumber(ARGV[1]) + 1)
  end
  if first then
    local entries = redis.call('XRANGE', KEYS[2], first, '+')
    for i = 1, #entries do
      out[i + 2] = entries[i][2][2]
    end
  end
end
return out
"""

# KEYS: the meta hash of a room this node is subscribed to and has seen no publication of (one room
# per call: a Redis Cluster runs a script on one slot). ARGV: hold TTL (s). Keeps the epoch of a room
# not yet published in while a node has subscribers to it: a hash with a seq (published meanwhile)
# keeps its meta TTL, and a hash that is gone is not made again.
HOLD_LUA = """
if redis.call('HEXISTS', KEYS[1], 's') == 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
end
return 1
"""

_NOW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS: presence hash, expiry zset. ARGV: conn, info ('' = presence off), TTL (s), channel,
# event envelope ('' = no joined event).
PRESENCE_ADD_LUA = (
    _NOW_LUA
    + """
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return 1
"""
)

# KEYS: presence hash, expiry zset. ARGV: conn, '1' = presence on, channel, event envelope ('' = none).
PRESENCE_REMOVE_LUA = """
if ARGV[2] ~= '' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
end
if ARGV[4] ~= '' then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return 1
"""

# Drops expired entries; with ARGV[2] = '1' it also announces each one with a ``left`` event
# on channel ARGV[3]. Atomic, so an expired connection is announced once, by whichever
# node's script gets to it first.
_REAP_LUA = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #gone do
  local conn = gone[i]
  if ARGV[2] == '1' then
    local info = redis.call('HGET', KEYS[1], conn)
    if info then
      local user = cmsgpack.unpack(info)[1]
      redis.call('PUBLISH', ARGV[3], string.char(146, 0, 149) .. cmsgpack.pack(user) .. string.char(0)
        .. cmsgpack.pack(conn) .. cmsgpack.pack(now) .. string.char(196, 0))
    end
  end
  redis.call('ZREM', KEYS[2], conn)
  redis.call('HDEL', KEYS[1], conn)
end
"""

# KEYS: presence hash, expiry zset. ARGV: TTL (s), announce ('1' or ''), channel, conn ids...
# Pushes this node's members' expiry forward (XX: a member that left meanwhile stays gone),
# refreshes both keys' TTL, and reaps members of dead nodes.
PRESENCE_REFRESH_LUA = (
    _NOW_LUA
    + _REAP_LUA
    + """
local deadline = now + tonumber(ARGV[1])
for i = 4, #ARGV do
  redis.call('ZADD', KEYS[2], 'XX', deadline, ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[1])
end
return 1
"""
)

# KEYS: presence hash, expiry zset. ARGV: 'list' or 'stats', announce ('1' or ''), channel.
# One round trip: reap expired entries, then {conn, info, conn, info...} or {connections, users}.
PRESENCE_READ_LUA = (
    _NOW_LUA
    + _REAP_LUA
    + """
if ARGV[1] == 'stats' then
  local infos = redis.call('HVALS', KEYS[1])
  local users, n = {}, 0
  for i = 1, #infos do
    local user = cmsgpack.unpack(infos[i])[1]
    if not users[user] then
      users[user] = true
      n = n + 1
    end
  end
  return {#infos, n}
end
return redis.call('HGETALL', KEYS[1])
"""
)


class Body(msgspec.Struct, array_like=True):
    """What a node sends with a publish; Redis wraps it with the seq it assigns."""

    sender: str
    encoding: int
    origin: str
    ts: float  # wall clock at publish: the receiving node's latency histogram spans nodes
    payload: bytes


class Envelope(msgspec.Struct, array_like=True):
    seq: int
    body: Body


class PresenceInfo(msgspec.Struct, array_like=True):
    """A presence hash value."""

    user: str
    joined_at: int


EVENT_SEQ = 0  # envelopes with this seq are joined/left events; Body.encoding is 1 joined, 0 left
UNNUMBERED_SEQ = -1  # envelopes with this seq are a reserved room's publications (no seq, no history)
# msgpack: a 2-element array, then -1 (a negative fixint): what precedes the body of an unnumbered envelope
UNNUMBERED_HEAD = b"\x92\xff"

encode_body = msgspec.msgpack.Encoder().encode
decode_info = msgspec.msgpack.Decoder(PresenceInfo).decode
decode_envelope = msgspec.msgpack.Decoder(Envelope).decode


def meta_key(room: str) -> str:
    return f"{PREFIX}{{{room}}}:m"


def history_key(room: str) -> str:
    return f"{PREFIX}{{{room}}}:h"


def presence_keys(room: str) -> tuple[str, str]:
    return f"{PREFIX}{{{room}}}:p", f"{PREFIX}{{{room}}}:x"


def channel_name(room: str) -> str:
    return f"{PREFIX}{{{room}}}"


def resp_arg(value: bytes) -> bytes:
    """One RESP bulk string: publishes are packed here, not by redis-py's generic (and slower) packer."""
    return b"$%d\r\n%b\r\n" % (len(value), value)


def room_args(room: str) -> tuple[bytes, bytes]:
    """A room's part of a publish command: its two keys, and its channel (RESP, ready to join)."""
    return resp_arg(meta_key(room).encode()) + resp_arg(history_key(room).encode()), resp_arg(
        channel_name(room).encode()
    )


def unnumbered_command(channel: bytes, body: bytes, sharded: bool) -> bytes:
    """``PUBLISH <channel> [-1, body]`` as RESP (``SPUBLISH`` on a cluster shard); ``channel`` is
    already RESP (``room_args``). A reserved room's publication: no script, no key."""
    verb = b"$8\r\nSPUBLISH\r\n" if sharded else b"$7\r\nPUBLISH\r\n"
    return b"*3\r\n" + verb + channel + resp_arg(UNNUMBERED_HEAD + body)


def script_call(keys: tuple[str, ...], args: tuple[bytes | str | int, ...]) -> tuple[int, bytes]:
    """``<numkeys> <keys...> <args...>`` of an ``EVALSHA``, as RESP, and how many bulk strings that is.

    The sha goes in front separately (``evalsha_head``), so a call can be sent again under a
    reloaded script. ``str`` is sent as UTF-8, ``int`` in decimal, ``bytes`` as is.
    """
    parts = [resp_arg(b"%d" % len(keys))]
    parts += [resp_arg(key.encode()) for key in keys]
    for arg in args:
        parts.append(resp_arg(arg if isinstance(arg, bytes) else str(arg).encode()))
    return len(parts), b"".join(parts)


def evalsha_head(sha: str, argc: int) -> bytes:
    """``EVALSHA <sha>`` as the head of a RESP array of ``argc`` more bulk strings (``script_call``)."""
    return b"*%d\r\n$7\r\nEVALSHA\r\n%b" % (argc + 2, resp_arg(sha.encode()))


def publish_command_head(sha: str) -> bytes:
    """``EVALSHA <sha> 2`` of a publish, as RESP; keys and arguments follow (``room_args`` etc.)."""
    return b"*11\r\n$7\r\nEVALSHA\r\n%b$1\r\n2\r\n" % resp_arg(sha.encode())
