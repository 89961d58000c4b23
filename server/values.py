"""A setting's value from TOML, an environment variable or a flag, as its kind, in wsfan's words.

Used by ``config`` (every setting) and ``namespaces`` (every namespace option): a value that is
not of its kind is ``BadValue`` whose text says what is allowed, never a validator's message.
"""

from __future__ import annotations

import math
import re
from typing import Any

#: What each kind of setting accepts, in the words of a validation error.
KINDS: dict[str, str] = {
    "int": "a whole number",
    "float": "a finite number",
    "bool": "true or false",
    "str": "a string",
}


class BadValue(ValueError):
    """A setting's value that is not of its kind or breaks its rule; ``str()`` is what is allowed."""


def convert_kind(kind: str, value: Any, allowed: str) -> Any:
    """``value`` as ``kind`` ("int", "float", "bool", "str"); ``BadValue(allowed)`` when it is not one."""
    if kind == "str":
        if isinstance(value, str):
            return value
    elif kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]+", value.strip()):
            return int(value.strip())
    elif kind == "float":
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                number = None
        if number is not None and math.isfinite(number):
            return number
    raise BadValue(allowed)
