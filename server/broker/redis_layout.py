"""How a room lives in Redis: its keys, the scripts that change them, and the envelope.

Per room, three Redis names, hash-tagged on the room so that a Redis Cluster
keeps them on one shard and the publish script may touch them together:

- ``wsfan:{room}:m``  hash: ``s`` = the room's last seq, ``e`` = its epoch
- ``wsfan:{room}:h``  stream: the last ~``history_size`` envelopes, entry id ``<seq>-0``
- ``wsfan:{room}``    the pub/sub channel every node with local subscribers listens on

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

# KEYS: meta hash, history stream. ARGV: body, channel, history size, epoch for a new room.
PUBLISH_LUA = """
if redis.call('HSETNX', KEYS[1], 'e', ARGV[4]) == 1 then
  redis.call('DEL', KEYS[2])
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
local msg = string.char(146) .. cmsgpack.pack(seq) .. ARGV[1]
if tonumber(ARGV[3]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], string.format('%d-0', seq), 'm', msg)
end
redis.call('PUBLISH', ARGV[2], msg)
return seq
"""

# KEYS: meta hash, history stream. ARGV: since ('' = none), the client's epoch ('' = none),
# epoch for a new room. Returns {seq, epoch, envelope...}: the envelopes after since, or all
# of them when the client's epoch is not the room's (its since belongs to another numbering).
# A room is created here too, so that the epoch a first join acks is the one later publishes keep.
HISTORY_LUA = """
if redis.call('HSETNX', KEYS[1], 'e', ARGV[3]) == 1 then
  redis.call('DEL', KEYS[2])
end
local meta = redis.call('HMGET', KEYS[1], 's', 'e')
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


encode_body = msgspec.msgpack.Encoder().encode
decode_envelope = msgspec.msgpack.Decoder(Envelope).decode


def meta_key(room: str) -> str:
    return f"{PREFIX}{{{room}}}:m"


def history_key(room: str) -> str:
    return f"{PREFIX}{{{room}}}:h"


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


def publish_command_head(sha: str) -> bytes:
    """``EVALSHA <sha> 2`` of a publish, as RESP; keys and arguments follow (``room_args`` etc.)."""
    return b"*9\r\n$7\r\nEVALSHA\r\n%b$1\r\n2\r\n" % resp_arg(sha.encode())
