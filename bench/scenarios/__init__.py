"""Benchmark scenarios. Each module exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``.

Register a new scenario by adding its module to ``SCENARIOS``; ``python -m wsfan.bench``
builds one sub-command per entry.
"""

from __future__ import annotations

import argparse
from types import ModuleType
from typing import Protocol

from wsfan.bench import compare
from wsfan.bench.scenarios import (
    cluster,
    compression,
    connect,
    core,
    echo,
    everything,
    fanout,
    heartbeat,
    render,
    rooms,
    storm,
)


class Scenario(Protocol):
    NAME: str
    HELP: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


SCENARIOS: dict[str, ModuleType] = {
    m.NAME: m
    for m in (
        everything,
        fanout,
        echo,
        heartbeat,
        storm,
        connect,
        cluster,
        compression,
        rooms,
        core,
        render,
        compare,
    )
}
