"""Public keys for asymmetric JWTs (RS256/ES256...): a PEM file, or a JWKS URL kept fresh in memory.

The algorithm a key verifies is decided by the key (its type and curve), never by a token's
``alg`` header: an RSA key verifies RS*/PS*, a P-256 key ES256, and so on. That is what makes
algorithm confusion impossible (an HS256 token "signed" with the public key's PEM as its HMAC
secret names an algorithm no public key accepts).

JWKS: PyJWT's ``PyJWKClient`` fetches and parses the key set. Its HTTP request is blocking
(urllib), so it never runs on the event loop: fetches run in a worker thread, and a token is
verified only against the keys already in memory (``get``), so a slow or dead identity provider
costs a 401, never a stalled loop. Keys are fetched at start, refreshed every
``refresh_s``, retried sooner while a fetch keeps failing (from ``RETRY_S``, doubling), and fetched
again at once when a token names a ``kid`` not in memory (key rotation), at most once per
``MISS_INTERVAL_S``. One fetch at a time: every waiter shares it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

log = logging.getLogger("wsfan.auth")

RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# Every algorithm a public key may verify; HS* never comes from a public key or a key set.
ASYMMETRIC = frozenset((*RSA_ALGORITHMS, *EC_ALGORITHMS.values(), "EdDSA"))
# A token naming an unknown kid fetches the key set again, at most this often (seconds).
MISS_INTERVAL_S = 5.0
# First retry after a failed fetch (seconds); doubles up to the refresh interval.
RETRY_S = 2.0
FETCH_TIMEOUT_S = 5.0


class KeyProblem(Exception):
    """A key file or key set that cannot be used; the text is for the operator (one line)."""


def algorithms_for(key: Any) -> tuple[str, ...]:
    """The JWS algorithms (RFC 7518) a public key verifies, from its type and curve."""
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in EC_ALGORITHMS:
        return (EC_ALGORITHMS[key.curve.name],)
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    raise KeyProblem(
        f"unsupported key type {type(key).__name__}: use an RSA, EC (P-256/384/521) or Ed25519 key"
    )


def load_public_key(path: str) -> tuple[Any, tuple[str, ...]]:
    """A PEM public key (``-----BEGIN PUBLIC KEY-----``) and the algorithms it verifies."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise KeyProblem(f"--jwt-public-key {path}: cannot read it ({exc.strerror})") from None
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyProblem(
            f"--jwt-public-key {path}: not a PEM public key (-----BEGIN PUBLIC KEY-----); "
            "a certificate or private key does not do"
        ) from None
    return key, algorithms_for(key)


class JwksKeys:
    """The signing keys of a JWKS URL, by ``kid``, refreshed in the background off the event loop."""

    def __init__(self, url: str, refresh_s: float = 300.0, timeout_s: float = FETCH_TIMEOUT_S) -> None:
        from wsfan import __version__

        self.url = url
        self.refresh_s = refresh_s
        # PyJWKClient's own cache is off: this class keeps the keys and decides when to fetch.
        self.client = jwt.PyJWKClient(
            url, cache_jwk_set=False, timeout=timeout_s, headers={"User-Agent": f"wsfan/{__version__}"}
        )
        self.keys: dict[str | None, jwt.PyJWK] = {}
        self.fetches = 0  # successful fetches, for tests and logs
        self._inflight: asyncio.Task[bool] | None = None
        self._last_miss = -math.inf
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ on the event loop, never blocking

    def get(self, kid: str | None) -> jwt.PyJWK | None:
        """The key a token's ``kid`` names, from memory. A miss starts a fetch (rate-limited)."""
        key = self.keys.get(kid)
        if key is None:
            self.missed()
        return key

    def missed(self) -> None:
        """A token named a kid we do not have: fetch now, unless one is under way or one was started
        for a miss less than ``MISS_INTERVAL_S`` ago (a flood of made-up kids costs one fetch per interval)."""
        now = time.monotonic()
        if self._inflight is None and now - self._last_miss >= MISS_INTERVAL_S:
            self._last_miss = now
            self._start_fetch()

    async def refreshed(self) -> None:
        """Wait for the fetch under way (or one started now); for surfaces that may await (SSE)."""
        self.missed()
        if self._inflight is not None:
            await asyncio.shield(self._inflight)

    async def start(self) -> None:
        """First fetch (waited for, bounded by the fetch timeout), then refresh in the background."""
        await self._start_fetch()
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _start_fetch(self) -> asyncio.Task[bool]:
        if self._inflight is None:
            self._inflight = asyncio.get_running_loop().create_task(self.fetch())
            self._inflight.add_done_callback(self._fetched)
        return self._inflight

    def _fetched(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _refresh_forever(self) -> None:
        delay = self.refresh_s if self.keys else RETRY_S
        while True:
            await asyncio.sleep(delay)
            ok = await asyncio.shield(self._start_fetch())
            delay = self.refresh_s if ok else min(self.refresh_s, max(RETRY_S, delay * 2))

    async def fetch(self) -> bool:
        """Fetch the key set in a thread; on failure keep the keys we have and log why."""
        try:
            jwk_set = await asyncio.to_thread(self.client.get_jwk_set, True)
        except (jwt.PyJWKClientError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
            log.warning(
                "cannot fetch signing keys from %s (%s); %s",
                self.url, exc, f"keeping {len(self.keys)} keys" if self.keys else "tokens get 401 until it works",
                extra={"event": "jwks_failed"},
            )  # fmt: skip
            return False
        keys = {
            k.key_id: k for k in jwk_set.keys if k.algorithm_name in ASYMMETRIC and k.public_key_use != "enc"
        }
        if not keys:
            log.warning("%s has no RSA/EC/OKP signing keys; keeping %d keys", self.url, len(self.keys))
            return False
        if set(keys) != set(self.keys):
            log.info(
                "signing keys from %s: kid %s", self.url, sorted(map(str, keys)), extra={"event": "jwks_keys"}
            )
        self.keys = keys
        self.fetches += 1
        return True
