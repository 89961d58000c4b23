"""History recovery, written once for every broker: what a join with ``since`` gets back.

``history_since`` is pure: a broker hands it what it kept of a room (oldest
first) and the room's seq and epoch, and gets back the ``History`` the hub
acks and replays. The memory broker passes its ring; the Redis broker passes
what its history script read. The rules (PROTOCOL.md "Recovery",
docs/protocol-choices.md "Epochs"; centrifuge's ``HistoryResult`` /
``recovered`` are the model):

- no ``since``: nothing to replay, not recovered; the ack still carries seq and epoch;
- a client ``epoch`` other than the room's: its ``since`` counts in a numbering that
  is gone; not recovered, and everything the room kept is replayed (it is all news);
- ``since`` equal to the room's seq: nothing missed, recovered;
- ``since`` beyond the room's seq: the client saw seqs this numbering never assigned
  (the room was lost and restarted); not recovered, nothing to replay;
- otherwise the publications with ``seq > since`` are replayed, oldest first, and
  the result is recovered only when they are exactly ``since + 1 .. seq``: history
  still reaches back far enough, and nothing is missing in between (an entry a
  broker could not decode) or at the end.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from wsfan.server.broker.publication import Publication


class History(NamedTuple):
    """What a join with ``since`` gets: publications to replay (oldest first), recovered, the room's seq now."""

    publications: list[Publication]
    recovered: bool
    seq: int
    # Names the room's numbering: it changes when the broker lost the room and its seq
    # started over, which ``since`` alone cannot reveal once the new seq has passed it.
    epoch: str = ""


def history_since(
    kept: Iterable[Publication], seq: int, epoch: str, since: int | None, client_epoch: str | None = None
) -> History:
    """The replay for a join with ``since`` (and the ``client_epoch`` it counted in) of a room.

    ``kept`` is what the broker still holds of the room, oldest first, seqs strictly
    ascending (it may already be cut to ``seq > since``, and may miss entries it could
    not read); ``seq`` and ``epoch`` are the room's now.
    Pure: no I/O, no clock, ``kept`` is only read.
    """
    if since is None:
        return History([], False, seq, epoch)
    if client_epoch and client_epoch != epoch:
        return History(list(kept), False, seq, epoch)
    if since >= seq:
        return History([], since == seq, seq, epoch)
    replay = [p for p in kept if p.seq > since]
    # Strictly ascending seqs, all in since+1..seq: exactly seq - since of them is all of them.
    recovered = len(replay) == seq - since and replay[0].seq == since + 1
    return History(replay, recovered, seq, epoch)
