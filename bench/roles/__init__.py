"""Every load-generator role, by name: ``python -m wsfan.bench.loadgen`` runs ``ROLES[cfg["role"]]``.

``fanout``, ``idle`` and ``echo`` (``roles/core.py``) serve the core scenario; the others the full suite.

Which client each role uses, and why:

| role | client | why |
|---|---|---|
| ``echo_lat`` | plain picows | up to 20,000+ requests/s: per-request futures would make the load generator the bottleneck |
| ``fanout_lat`` | plain picows | up to a million deliveries/s received on one core |
| ``idle_multi`` | plain picows | tens of thousands of idle connections; pings counted per server |
| ``crowd`` | bare client on uvloop transports | a reconnecting crowd (connect + join at once): the cheapest client side |
| ``oneshot_rooms`` / ``churn`` | plain picows | hundreds of thousands of rooms, or joins as fast as acks come |
| ``fanout``, ``idle``, ``echo`` | plain picows | the core scenario: closed-loop fan-out, idle memory, echo CPU |
| ``storm`` | ``client/`` | the point is the client's real reconnect logic (backoff, jitter, Retry-After, rejoin with since) |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from wsfan.bench.roles import core
from wsfan.bench.roles.crowd import crowd
from wsfan.bench.roles.echo import echo_lat
from wsfan.bench.roles.fanout import fanout_lat
from wsfan.bench.roles.idle import idle_multi
from wsfan.bench.roles.rooms import churn, oneshot_rooms
from wsfan.bench.roles.storm import storm

ROLES: dict[str, Callable[..., Any]] = {
    # core.* by attribute: the names echo, fanout and idle are this package's submodules too
    "fanout": core.fanout,
    "idle": core.idle,
    "echo": core.echo,
    "echo_lat": echo_lat,
    "fanout_lat": fanout_lat,
    "idle_multi": idle_multi,
    "crowd": crowd,
    "storm": storm,
    "oneshot_rooms": oneshot_rooms,
    "churn": churn,
}
