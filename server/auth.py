"""JWT authentication on connect and room permissions from the ``rooms`` claim.

Verification is PyJWT's: HS256 with ``--jwt-secret``, RS256/ES256 (and the other
algorithms of the key's type) with ``--jwt-public-key`` or a ``--jwks-url`` key set
(keys.py). Each key verifies only its own algorithms, so ``alg: none`` and algorithm
confusion are refused by construction. Room patterns are shell-style globs;
each distinct set of patterns is compiled once into a single regex and cached,
because many users share the same claim.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs

import jwt

from wsfan.server.keys import ASYMMETRIC, JwksKeys

ALGORITHM = "HS256"


class AuthError(Exception):
    """Why a token was refused; the text (always one of our fixed sentences) goes into the body.

    ``status`` is the HTTP answer: 401 for a missing or unacceptable token, 400 for a request
    that names its token ambiguously (two ``Authorization`` headers, two ``token`` parameters).
    """

    status = 401


class UnknownKey(AuthError):
    """The token names a JWKS key not in memory (yet): a fetch has started; retrying may succeed."""


class AmbiguousToken(AuthError):
    """More than one token in one request: a malformed request (400), not a bad token."""

    status = 400


# RFC 7519 §4.1.4-4.1.6: exp, nbf and iat are NumericDates, JSON numbers.
_NUMERIC_DATES = ("exp", "nbf", "iat")


class Identity:
    """Who a connection is and what it may touch."""

    __slots__ = ("user", "exp", "expires_at", "_rooms", "claims")

    def __init__(
        self, user: str, exp: float | None, rooms: tuple[str, ...] | None, leeway: float = 0.0
    ) -> None:
        self.user = user
        self.exp = exp
        # The one deadline for both decisions: a token is accepted on connect until exp + leeway,
        # and a connection (WebSocket or SSE) that carries it is closed at exp + leeway.
        self.expires_at = exp + leeway if exp is not None else None
        self._rooms = _compile(rooms) if rooms is not None else None
        self.claims: dict[str, Any] | None = None  # the verified token's claims (application on_connect)

    def allows(self, room: str) -> bool:
        return self._rooms is None or self._rooms.fullmatch(room) is not None


@functools.lru_cache(maxsize=1024)
def _compile(patterns: tuple[str, ...]) -> re.Pattern[str]:
    if not patterns:
        return re.compile(r"(?!)")  # an empty list allows nothing
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class Authenticator:
    """Verifies a token with the key its header points to: the HS256 secret, the PEM public key
    or a JWKS key by ``kid``. Each key verifies only its own algorithms (keys.py), so which key
    is used never depends on what the token's ``alg`` claims alone.
    """

    def __init__(
        self,
        secret: str = "",
        leeway: float = 5.0,
        *,
        public_key: tuple[Any, tuple[str, ...]] | None = None,
        jwks: JwksKeys | None = None,
        audience: str = "",
        issuer: str = "",
    ) -> None:
        self.secret = secret
        self.leeway = leeway
        self.public_key = public_key
        self.jwks = jwks
        self.audience = audience or None
        self.issuer = issuer or None
        self.required = ["sub", "exp"] + (["aud"] if audience else []) + (["iss"] if issuer else [])
        accepted = ([ALGORITHM] if secret else []) + (list(public_key[1]) if public_key else [])
        self.accepted = " or ".join(accepted + (["a JWKS key's"] if jwks else []))

    async def start(self) -> None:
        if self.jwks is not None:
            await self.jwks.start()

    async def stop(self) -> None:
        if self.jwks is not None:
            await self.jwks.stop()

    async def verify_async(self, token: str | None) -> Identity:
        """``verify`` for surfaces that may wait (SSE, HTTP): an unknown ``kid`` waits for one JWKS fetch."""
        try:
            return self.verify(token)
        except UnknownKey:
            assert self.jwks is not None
            await self.jwks.refreshed()
            return self.verify(token)

    def _key_for(self, token: str) -> tuple[Any, list[str]]:
        """The key and algorithms to verify ``token`` with, chosen by its header's ``alg`` and ``kid``."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthError("malformed token") from None
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str):  # RFC 7515 §4.1.1: a string; a list or object would not hash
            raise AuthError("malformed token")
        if alg == ALGORITHM and self.secret:
            return self.secret, [ALGORITHM]
        if alg in ASYMMETRIC:
            if self.jwks is not None and (kid is not None or self.public_key is None):
                if not isinstance(kid, str | None):
                    raise AuthError("malformed token")
                jwk = self.jwks.get(kid)
                if jwk is not None:
                    return jwk.key, [jwk.algorithm_name]
                if not self.jwks.keys:
                    raise UnknownKey("signing keys unavailable; retry shortly")
                raise UnknownKey("unknown signing key (kid); retry shortly")
            if self.public_key is not None:
                return self.public_key[0], list(self.public_key[1])
        raise AuthError(f"token algorithm must be {self.accepted}")

    def verify(self, token: str | None) -> Identity:
        """The identity a token proves, or :class:`AuthError` with a fixed reason (never a library's text).

        A token is ASCII (RFC 7519 §7.1: base64url segments and dots); anything else, such as
        ``Bearer café`` or bytes above 0x7F that picows hands over as lone surrogates, is malformed.
        """
        if not token:
            raise AuthError("missing token: send Authorization: Bearer <jwt> or ?token=<jwt>")
        if not token.isascii():
            raise AuthError("malformed token")
        key, algorithms = self._key_for(token)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=algorithms,
                options={"require": self.required},
                leeway=self.leeway,
                audience=self.audience,
                issuer=self.issuer,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("bad token signature") from None
        except jwt.InvalidAlgorithmError:
            raise AuthError(f"token algorithm must be {self.accepted}") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience (aud) not accepted") from None
        except jwt.InvalidIssuerError:
            raise AuthError("token issuer (iss) not accepted") from None
        except jwt.InvalidTokenError:
            raise AuthError("malformed token") from None
        for name in _NUMERIC_DATES:
            value = claims.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                # PyJWT takes int(value): "9999999999" or true would pass as a date.
                raise AuthError(f"the {name!r} claim must be a number (NumericDate, RFC 7519 section 2)")
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
        ident = Identity(sub, exp, tuple(rooms) if rooms is not None else None, self.leeway)
        ident.claims = claims
        return ident


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


def make_token(
    secret: str | Any,
    sub: str,
    ttl: float = 3600,
    rooms: Sequence[str] | None = None,
    *,
    algorithm: str = ALGORITHM,
    kid: str | None = None,
    audience: str | None = None,
    issuer: str | None = None,
) -> str:
    """A signed token: ``secret`` is the HS256 secret, or a private key for ``algorithm`` (RS256, ES256...)."""
    claims: dict[str, Any] = {"sub": sub, "exp": int(time.time() + ttl), "iat": int(time.time())}
    if rooms is not None:
        claims["rooms"] = list(rooms)
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, secret, algorithm=algorithm, headers={"kid": kid} if kid else None)


def _private_key(path: str) -> tuple[Any, str]:
    """A PEM private key and the algorithm its public half verifies first (RS256, ES256, EdDSA)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from wsfan.server.keys import KeyProblem, algorithms_for

    with open(path, "rb") as f:
        key = load_pem_private_key(f.read(), password=None)
    try:
        return key, algorithms_for(key.public_key())[0]
    except KeyProblem as exc:
        raise ValueError(str(exc)) from None


MAX_TTL_S = 100 * 365 * 86400.0  # `wsfan token --ttl`: beyond this, nan or inf, exp is no date


def token_main(argv: Sequence[str]) -> int:
    """``python -m wsfan token``: a token for tests and demos."""
    p = argparse.ArgumentParser(
        prog="wsfan token",
        description="Print a JWT for this server: HS256 with --secret, or signed with --private-key.",
    )
    p.add_argument("--sub", required=True, help="user id")
    p.add_argument(
        "--rooms", action="append", help="glob pattern the user may join/publish (repeatable; default: all)"
    )
    p.add_argument(
        "--ttl",
        type=float,
        default=3600,
        help="seconds until exp, negative for an expired token (default 3600)",
    )
    p.add_argument(
        "--secret", default=os.environ.get("WSFAN_JWT_SECRET"), help="secret (default: $WSFAN_JWT_SECRET)"
    )
    p.add_argument(
        "--private-key", metavar="FILE", help="PEM private key (RSA: RS256, P-256: ES256, Ed25519: EdDSA)"
    )
    p.add_argument("--kid", help="key id for the header (the kid of the key in the server's JWKS)")
    p.add_argument("--aud", help="aud claim (for --jwt-audience)")
    p.add_argument("--iss", help="iss claim (for --jwt-issuer)")
    args = p.parse_args(argv)
    if not args.sub:
        p.error("--sub must not be empty: the server refuses a token without a user id")
    if not math.isfinite(args.ttl) or abs(args.ttl) > MAX_TTL_S:
        p.error(f"--ttl must be a number of seconds within +-{MAX_TTL_S:.0f} (100 years)")
    if args.private_key:
        try:
            key, algorithm = _private_key(args.private_key)
        except (OSError, ValueError, TypeError) as exc:
            p.error(f"--private-key {args.private_key}: not a usable PEM private key ({exc})")
    elif args.secret:
        from wsfan.server.config import MIN_HS256_SECRET

        if len(args.secret.encode("utf-8", "surrogatepass")) < MIN_HS256_SECRET:
            p.error(
                f"--secret (or WSFAN_JWT_SECRET) must be at least {MIN_HS256_SECRET} bytes, as the server's "
                "--jwt-secret (an HS256 key has at least 256 bits, RFC 7518 section 3.2)"
            )
        key, algorithm = args.secret, ALGORITHM
    else:
        p.error("no key: pass --secret (or set WSFAN_JWT_SECRET) or --private-key")
    print(
        make_token(
            key,
            args.sub,
            args.ttl,
            args.rooms,
            algorithm=algorithm,
            kid=args.kid,
            audience=args.aud,
            issuer=args.iss,
        )
    )
    return 0
