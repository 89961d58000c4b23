"""JWT authentication on connect and room permissions from the ``rooms`` claim.

Verification is PyJWT's, pinned to HS256 (so ``alg: none`` and algorithm
confusion are refused by construction). Room patterns are shell-style globs;
each distinct set of patterns is compiled once into a single regex and cached,
because many users share the same claim.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import os
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs

import jwt

ALGORITHM = "HS256"


class AuthError(Exception):
    """Why a token was refused; the text (always one of our fixed sentences) goes into the body.

    ``status`` is the HTTP answer: 401 for a missing or unacceptable token, 400 for a request
    that names its token ambiguously (two ``Authorization`` headers, two ``token`` parameters).
    """

    status = 401


class AmbiguousToken(AuthError):
    """More than one token in one request: a malformed request (400), not a bad token."""

    status = 400


class Identity:
    """Who a connection is and what it may touch."""

    __slots__ = ("user", "exp", "expires_at", "_rooms")

    def __init__(
        self, user: str, exp: float | None, rooms: tuple[str, ...] | None, leeway: float = 0.0
    ) -> None:
        self.user = user
        self.exp = exp
        # The one deadline for both decisions: a token is accepted on connect until exp + leeway,
        # and a connection (WebSocket or SSE) that carries it is closed at exp + leeway.
        self.expires_at = exp + leeway if exp is not None else None
        self._rooms = _compile(rooms) if rooms is not None else None

    def allows(self, room: str) -> bool:
        return self._rooms is None or self._rooms.fullmatch(room) is not None


@functools.lru_cache(maxsize=1024)
def _compile(patterns: tuple[str, ...]) -> re.Pattern[str]:
    if not patterns:
        return re.compile(r"(?!)")  # an empty list allows nothing
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class Authenticator:
    def __init__(self, secret: str, leeway: float = 5.0) -> None:
        self.secret = secret
        self.leeway = leeway

    def verify(self, token: str | None) -> Identity:
        """The identity a token proves, or :class:`AuthError` with a fixed reason (never a library's text).

        A token is ASCII (RFC 7519 §7.1: base64url segments and dots); anything else, such as
        ``Bearer café`` or bytes above 0x7F that picows hands over as lone surrogates, is malformed.
        """
        if not token:
            raise AuthError("missing token: send Authorization: Bearer <jwt> or ?token=<jwt>")
        if not token.isascii():
            raise AuthError("malformed token")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.secret,
                algorithms=[ALGORITHM],
                options={"require": ["sub", "exp"]},
                leeway=self.leeway,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad token signature") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(f"token algorithm must be {ALGORITHM}") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid") from None
        except jwt.InvalidTokenError:
            raise AuthError("malformed token") from None
        sub = claims["sub"]
        if not isinstance(sub, str) or not sub:
            raise AuthError("the 'sub' claim must be a non-empty string")
        rooms = claims.get("rooms")
        if rooms is not None and (not isinstance(rooms, list) or not all(isinstance(r, str) for r in rooms)):
            raise AuthError("the 'rooms' claim must be a list of glob patterns")
        try:
            exp = float(claims["exp"])  # PyJWT checked it is an integer; it may still be 10**400
        except OverflowError:
            raise AuthError("malformed token") from None
        return Identity(sub, exp, tuple(rooms) if rooms is not None else None, self.leeway)


def token_from_request(headers: Any, query: bytes | str) -> str | None:
    """The bearer token from ``Authorization`` or from ``?token=`` (for browsers, which cannot set headers).

    ``headers`` is a case-insensitive multi-dict (picows or aiohttp); ``query`` the raw query
    string. Raises :class:`AmbiguousToken` (400) for two ``Authorization`` headers or two
    ``token`` parameters: which one would be meant is not ours to guess.
    """
    lines = headers.getall("Authorization", [])
    if len(lines) > 1:
        raise AmbiguousToken("more than one Authorization header")
    if lines:
        scheme, _, value = lines[0].partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if isinstance(query, bytes):
        query = query.decode("latin-1")
    values = parse_qs(query).get("token")
    if values is not None and len(values) > 1:
        raise AmbiguousToken("more than one token parameter")
    return values[0] if values else None


def make_token(secret: str, sub: str, ttl: float = 3600, rooms: Sequence[str] | None = None) -> str:
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl), "iat": int(time.time())}
    if rooms is not None:
        claims["rooms"] = list(rooms)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def token_main(argv: Sequence[str]) -> int:
    """``python -m wsfan token``: a token for tests and demos."""
    p = argparse.ArgumentParser(prog="wsfan token", description="Print an HS256 JWT for this server.")
    p.add_argument("--sub", required=True, help="user id")
    p.add_argument(
        "--rooms", action="append", help="glob pattern the user may join/publish (repeatable; default: all)"
    )
    p.add_argument("--ttl", type=float, default=3600, help="seconds until exp (default 3600)")
    p.add_argument(
        "--secret", default=os.environ.get("WSFAN_JWT_SECRET"), help="secret (default: $WSFAN_JWT_SECRET)"
    )
    args = p.parse_args(argv)
    if not args.secret:
        p.error("no secret: pass --secret or set WSFAN_JWT_SECRET")
    print(make_token(args.secret, args.sub, args.ttl, args.rooms))
    return 0
