"""One settings object, filled from defaults, a TOML file, environment variables and CLI flags.

Precedence, lowest first: defaults, ``--config`` TOML file, ``WSFAN_*`` environment
variables, command-line flags. Every option is declared once, in ``Settings``,
with its help text in ``HELP``; the CLI, the env names and the TOML keys are all
derived from it so that they cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
import ssl
import tomllib
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import msgspec

from wsfan.server import namespaces as ns_config
from wsfan.server.values import KINDS, BadValue, convert_kind

ENV_PREFIX = "WSFAN_"


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    port: int = 8765
    rate_limit: float = 100.0
    rate_burst: float = 200.0
    rate_abuse_strikes: int = 50
    max_message_size: int = 64 * 1024
    max_control_frames: float = 50.0
    max_fragments: int = 1024
    heartbeat: int = 30_000
    heartbeat_timeout: int = 10_000
    slow_consumer_limit: int = 4 * 1024 * 1024
    history_size: int = 300
    history_ttl: float = 300.0
    history_meta_ttl: float = 86_400.0
    max_rooms: int = 1_000_000
    max_rooms_per_connection: int = 100
    presence: bool = False
    join_leave: bool = False
    allow_publish: bool = True
    allow_history: bool = True
    presence_ttl: float = 60.0
    namespaces: dict[str, dict[str, Any]] = msgspec.field(default_factory=dict)
    echo_endpoint: bool = False
    log_level: str = "info"
    drain_timeout: float = 10.0
    read_buffer_size: int = 2048
    backlog: int = 4096
    aiofastnet: bool = False
    cork_ms: float = 0.0
    compression: bool = False
    compression_threshold: int = 128
    compression_level: int = 6
    node_id: str = ""
    # security and HTTP surface
    jwt_secret: str = ""
    jwt_leeway: float = 5.0
    jwt_public_key: str = ""
    jwks_url: str = ""
    jwks_refresh: float = 300.0
    jwt_audience: str = ""
    jwt_issuer: str = ""
    admin_key: str = ""
    http_port: int = 0
    max_connections: int = 0
    max_connections_per_ip: int = 0
    fd_reserve: int = 64
    max_handshake_rate: float = 0.0
    allowed_origins: str = ""
    request_timeout: float = 5.0
    tls_cert: str = ""
    tls_key: str = ""
    demo: bool = False
    # production and cluster
    broker: str = ""
    workers: int = 1
    production: bool = False
    allow_anonymous: bool = False
    # application API (docs/app-api.md): "module:attribute" of a wsfan.App; `wsfan run module:attr` sets it
    app: str = ""
    log_format: str = "text"
    metrics_port: int = 0
    metrics_host: str = ""
    worker_timeout: float = 30.0
    drain_spread: float = 0.0


HELP: dict[str, str] = {
    "host": "address to listen on",
    "port": "TCP port for WebSocket (/ws, /echo) and plain GET endpoints",
    "rate_limit": "messages per second per connection (token bucket refill rate); 0 turns the limit off",
    "rate_burst": "token bucket size: messages a connection may send at once before the rate applies",
    "rate_abuse_strikes": "RATE_LIMITED refusals, without a quiet second between them, before close 4029",
    "max_message_size": "largest inbound message in bytes, after reassembling fragments; larger closes with 1009",
    "max_control_frames": "pings and pongs a connection may send per second (token bucket of this rate and size); "
    "more closes with 1008; 0 turns the limit off",
    "max_fragments": "frames one inbound message may arrive in; more closes with 1008; 0 turns the limit off",
    "heartbeat": "ms of inbound silence before the server pings a connection; 0 turns heartbeats off",
    "heartbeat_timeout": "ms to wait for the pong before closing with 4000",
    "slow_consumer_limit": "bytes queued for one connection that cannot keep up before it is closed with 4008",
    "history_size": "publications kept per room for recovery with `since`; 0 keeps none (default namespace)",
    "history_ttl": "seconds without a publication after which a room's history is dropped (default namespace)",
    "history_meta_ttl": "seconds a room's seq and epoch outlive its last publication or join (with --broker; "
    "when they lapse the room starts over under a new epoch; a room never published in keeps its epoch "
    "only --presence-ttl past its last subscriber)",
    "max_rooms": "rooms with history or subscribers a single node keeps at most; past it a join or publish "
    "that would create a room gets UNAVAILABLE until idle rooms expire",
    "max_rooms_per_connection": "rooms one connection may be in at once; a join past it gets LIMIT_EXCEEDED "
    "(the server's own joins, Conn.join, are not refused)",
    "presence": "answer presence and presence_stats requests (default namespace)",
    "join_leave": "send joined/left events to a room's other subscribers (default namespace)",
    "allow_publish": "clients may publish; when off only POST /publish can (default namespace)",
    "allow_history": "join with since replays history; when off no history is kept (default namespace)",
    "presence_ttl": "seconds a node's presence entries live in Redis unless refreshed (every third of it); "
    "a node that dies leaves presence within this time",
    "namespaces": "room namespaces, the room-name prefix before ':', as NAME:key=value,... specs (repeat the "
    "flag or separate with ';'); keys: history_size history_ttl presence join_leave allow_publish "
    "allow_history; unset keys inherit the default namespace. TOML: [namespaces.NAME] tables",
    "echo_endpoint": "serve /echo, which echoes every message verbatim (for RFC 6455 conformance suites)",
    "log_level": "debug, info, warning or error",
    "app": "application to serve, as module:attribute or path/to/file.py:attribute naming a wsfan.App (what "
    "`wsfan run module:app` sets); "
    "imported by every worker (docs/app-api.md)",
    "drain_timeout": "seconds to wait for close handshakes on shutdown before dropping connections",
    "read_buffer_size": "initial per-connection read buffer in bytes (grows on demand); small keeps idle connections cheap",
    "backlog": "listen backlog: connection attempts the kernel queues before accept (capped by net.core.somaxconn); "
    "a reconnection storm overflows a small one",
    "aiofastnet": "use picows' aiofastnet transport: about 5%% less CPU per echo reply, fan-out cost equal within "
    "noise, but about 5 KB more memory per idle connection (bench core)",
    "cork_ms": "hold a busy connection's output up to this many ms to batch writes (0: flush every loop iteration)",
    "compression": "accept permessage-deflate (RFC 7692) when a client offers it: deliveries are compressed once "
    "per publication and encoding, without context takeover, and shared by every subscriber",
    "compression_threshold": "with --compression: messages smaller than this many bytes are sent uncompressed",
    "compression_level": "with --compression: zlib level 1 (fastest) .. 9 (smallest)",
    "node_id": "name of this node in welcome messages and conn ids; random when empty",
    "jwt_secret": "HS256 secret, at least 32 bytes (RFC 7518 section 3.2; shorter is refused): when set, every "
    "upgrade needs a JWT (Authorization: Bearer or ?token=)",
    "jwt_leeway": "seconds of clock skew tolerated on exp/nbf/iat",
    "jwt_public_key": "PEM public key file: when set, every upgrade needs a JWT signed with its private key "
    "(RS256.. for RSA, ES256 for P-256, EdDSA for Ed25519: the key decides, never the token)",
    "jwks_url": "JWKS URL of an identity provider: tokens are verified with the key their kid names "
    "(fetched at start, refreshed, and fetched again for an unknown kid)",
    "jwks_refresh": "seconds between JWKS refreshes",
    "jwt_audience": "when set, tokens must carry this aud claim",
    "jwt_issuer": "when set, tokens must carry this iss claim",
    "admin_key": "bearer key for POST /publish; the endpoint is off when empty",
    "http_port": "port of the aiohttp side server (POST /publish, /sse, /metrics, /healthz); 0 = off",
    "max_connections": "open WebSocket connections and SSE streams at most; past it upgrades and new streams get "
    "503 + Retry-After; 0 = no limit",
    "max_connections_per_ip": "open WebSocket connections and SSE streams from one client IP address at most; past "
    "it its upgrades and new streams get 503 + Retry-After; 0 = no limit (clients behind one NAT or proxy share an address)",
    "fd_reserve": "file descriptors kept for the broker and the HTTP side: upgrades get 503 + Retry-After once "
    "fewer are left under the open-files limit (raised to the hard limit at start); 0 = no reserve",
    "max_handshake_rate": "new connections per second (token bucket, burst = 1 s worth); past it 503 + Retry-After; 0 = off",
    "allowed_origins": "browser origins allowed to open /ws and /sse: shell globs separated by commas "
    "(e.g. 'https://example.com,https://*.example.com'); others get 403; empty = any origin "
    "(a warning under --production)",
    "request_timeout": "seconds a new connection gets to send a complete request head, on both ports (on the "
    "WebSocket port one sweep every quarter of it, at most 1 s, drops the late ones); also the idle limit between "
    "keep-alive requests on --http-port",
    "demo": "serve the chat demo page at / (uses the browser client)",
    "tls_cert": "PEM certificate chain: --port serves wss:// and --http-port https:// (needs --tls-key); "
    "empty = plain ws:// and http:// (TLS ends at a proxy, see deploy/nginx/)",
    "tls_key": "PEM private key of --tls-cert (unencrypted)",
    "broker": "broker URL for a cluster (redis://host:port/db, or redis+cluster://host:port,host:port for a "
    "Redis Cluster >= 7 with sharded pub/sub, or redis+sentinel://host:port,host:port/master-name); empty = single node, in-process",
    "workers": "worker processes sharing the port (SO_REUSEPORT); more than 1 needs --broker",
    "production": "production profile: workers = CPU cores with --broker (one without it) and log-format json "
    "(unless given), /echo and the demo page off, refuses to start without a JWT key (secret, public key or JWKS) and --admin-key unless "
    "--allow-anonymous",
    "allow_anonymous": "with --production: start without --jwt-secret/--admin-key (anonymous users)",
    "log_format": "text or json (one JSON object per line)",
    "metrics_port": "internal listener for /metrics and /healthz (with --workers > 1: the supervisor's, merged over "
    "all workers); when set, /metrics is no longer served on the public ports; 0 = /metrics on the public ports "
    "(one worker only)",
    "metrics_host": "address of the --metrics-port listener; empty = --host",
    "worker_timeout": "seconds a worker's event loop may miss its heartbeat before the supervisor kills and "
    "restarts it (gunicorn's --timeout)",
    "drain_spread": "on SIGHUP (zero-downtime restart), seconds over which the old workers' connections are closed "
    "with 1001, so that clients do not all reconnect at once",
}


MIN_HS256_SECRET = 32  # bytes: 256 bits, the size of HS256's hash output (RFC 7518 section 3.2)


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: v >= low


#: Rules on one setting's value: (the test, what is allowed). Settings without one accept any value of
#: their kind. Rules between settings (--tls-cert with --tls-key, --workers with --broker) are in validate.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "port": (lambda v: 0 < v < 65536, "a port number 1..65535"),
    "http_port": (lambda v: 0 <= v < 65536, "a port number 1..65535, or 0 (off)"),
    "metrics_port": (lambda v: 0 <= v < 65536, "a port number 1..65535, or 0 (off)"),
    "workers": (_at_least(1), "a whole number >= 1"),
    "rate_limit": (_at_least(0), "a number >= 0 (0: no limit)"),
    "rate_burst": (_at_least(1), "a number >= 1"),
    "max_message_size": (_at_least(1), "a whole number of bytes >= 1"),
    "max_control_frames": (lambda v: v == 0 or v >= 1, "0 (no limit) or a number >= 1"),
    "max_fragments": (_at_least(0), "a whole number >= 0 (0: no limit)"),
    "heartbeat": (_at_least(0), "a whole number of ms >= 0 (0: off)"),
    "heartbeat_timeout": (lambda v: v > 0, "a whole number of ms > 0"),
    "slow_consumer_limit": (_at_least(1024), "a whole number of bytes >= 1024"),
    "history_size": (_at_least(0), "a whole number >= 0"),
    "history_ttl": (lambda v: v > 0, "a number of seconds > 0"),
    "history_meta_ttl": (_at_least(1), "a number of seconds >= 1"),
    "presence_ttl": (_at_least(1), "a number of seconds >= 1"),
    "max_rooms": (_at_least(1), "a whole number >= 1"),
    "max_rooms_per_connection": (_at_least(1), "a whole number >= 1"),
    "log_level": (
        lambda v: v.lower() in ("debug", "info", "warning", "error"),
        "debug, info, warning or error",
    ),
    "log_format": (lambda v: v in ("text", "json"), "text or json"),
    "backlog": (_at_least(1), "a whole number >= 1"),
    "cork_ms": (lambda v: 0 <= v <= 50, "a number of ms from 0 to 50"),
    "compression_level": (lambda v: 1 <= v <= 9, "a zlib level 1..9"),
    "compression_threshold": (_at_least(0), "a whole number of bytes >= 0"),
    "request_timeout": (lambda v: 0 < v <= 300, "a number of seconds > 0 and <= 300"),
    "jwks_refresh": (_at_least(1), "a number of seconds >= 1"),
    "fd_reserve": (_at_least(0), "a whole number >= 0"),
    "max_connections": (_at_least(0), "a whole number >= 0 (0: no limit)"),
    "max_connections_per_ip": (_at_least(0), "a whole number >= 0 (0: no limit)"),
    "max_handshake_rate": (_at_least(0), "a number >= 0 (0: off)"),
    "worker_timeout": (lambda v: v > 0, "a number of seconds > 0"),
    "drain_spread": (_at_least(0), "a number of seconds >= 0"),
    "drain_timeout": (_at_least(0), "a number of seconds >= 0"),
    "jwt_leeway": (_at_least(0), "a number of seconds >= 0"),
    "read_buffer_size": (_at_least(1), "a whole number of bytes >= 1"),
    "rate_abuse_strikes": (_at_least(0), "a whole number >= 0"),
    # RFC 7518 section 3.2: "A key of the same size as the hash output (for instance, 256 bits for
    # "HS256") or larger MUST be used with this algorithm."
    "jwt_secret": (
        lambda v: v == "" or len(v.encode("utf-8", "surrogatepass")) >= MIN_HS256_SECRET,
        f"empty (off) or at least {MIN_HS256_SECRET} bytes (an HS256 key has at least 256 bits, "
        "RFC 7518 section 3.2: openssl rand -hex 32 makes one)",
    ),
}

#: Settings whose values never appear in a message (a refusal says how long the value was instead).
SECRETS = frozenset({"jwt_secret", "admin_key"})


def shown(name: str, value: Any) -> str:
    """A setting's value as a refusal quotes it: ``repr``, or its length for a secret."""
    if name in SECRETS and isinstance(value, str):
        return f"{len(value.encode('utf-8', 'surrogatepass'))} bytes"
    return repr(value)


def allowed(name: str) -> str:
    """What setting ``name`` accepts, as a phrase: its rule's text, else its kind's."""
    rule = RULES.get(name)
    return rule[1] if rule else KINDS[Settings.__annotations__[name]]


def convert(name: str, value: Any) -> Any:
    """``value`` (a TOML value, or text from an environment variable or a flag) as setting ``name``'s
    kind, checked against its rule; ``BadValue`` otherwise. Whole numbers are decimal digits (a TOML
    float that is whole passes); numbers are finite (nan and inf are not); booleans are true/false
    (any case) or 1/0."""
    kind = Settings.__annotations__[name]
    out = convert_kind(kind, value, allowed(name))
    rule = RULES.get(name)
    if rule is not None and not rule[0](out):
        raise BadValue(rule[1])
    return out


def _arg_type(name: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return convert(name, text)
        except BadValue as exc:
            raise argparse.ArgumentTypeError(f"expected {exc}, got {shown(name, text)}") from None

    parse.__name__ = Settings.__annotations__[name]
    return parse


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that says what to do, not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        message = message.removeprefix("argument ")  # argparse's "argument --port: ...": the flag is enough
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser(prog: str = "wsfan") -> argparse.ArgumentParser:
    from wsfan import __version__

    defaults = Settings()
    parser = _Parser(
        prog=prog,
        description="Pub/sub WebSocket server (PROTOCOL.md v1). Every flag can also be set with an "
        f"environment variable {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}PORT=9000) or a key in the --config TOML file.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with settings (keys as flag names, _ or -)"
    )
    for name, field_type in Settings.__annotations__.items():
        default = getattr(defaults, name)
        help_text = f"{HELP[name]} (env {ENV_PREFIX}{name.upper()}; default: {default!r})"
        if field_type.startswith("dict"):
            parser.add_argument(_flag(name), dest=name, action="append", metavar="SPEC", help=help_text)
        elif field_type == "bool":
            parser.add_argument(
                _flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(_flag(name), dest=name, type=_arg_type(name), default=None, help=help_text)
    return parser


def _from_env(environ: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in Settings.__annotations__:
        raw = environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            out[name] = raw
    return out


def _from_toml(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    section = dict(data.get("server", data))
    if "namespaces" in data and section is not data:
        section.setdefault("namespaces", data["namespaces"])
    return {k.replace("-", "_"): v for k, v in section.items()}


def _label(name: str, origin: str, config_path: str) -> str:
    """Where a setting was given, in the user's words: the flag, the variable or the TOML key."""
    if origin == "env":
        return f"{ENV_PREFIX}{name.upper()} ({_flag(name)})"
    if origin == "toml":
        return f"{name} in --config {config_path} ({_flag(name)})"
    return _flag(name)


def load(argv: Sequence[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Merge all sources into one validated ``Settings``; raises ``SystemExit`` (exit 2) with one line on bad input.

    Every refusal names where the setting came from (``--port``, ``WSFAN_PORT``, ``port in --config
    FILE``, ``--namespaces chat``...), the value and what is allowed (``KINDS``, ``RULES``,
    ``namespaces.ALLOWED``); no validator's own text reaches the user.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    config_path = args.config or ""
    if args.config:
        try:
            merged.update(_from_toml(args.config))
        except OSError as exc:
            parser.error(f"--config {args.config}: cannot read it ({exc.strerror or type(exc).__name__})")
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            parser.error(f"--config {args.config}: not valid TOML ({exc})")
        origin.update(dict.fromkeys(merged, "toml"))
    table: dict[str, Any] = merged.pop("namespaces", None) or {}
    if not isinstance(table, dict):
        parser.error(f"namespaces in --config {config_path} must be tables: [namespaces.NAME]")
    ns_origin = {name: f"[namespaces.{name}] in --config {config_path}" for name in table}
    env = _from_env(dict(os.environ) if environ is None else environ)
    specs = [(f"{ENV_PREFIX}NAMESPACES", env.pop("namespaces"))] if "namespaces" in env else []
    specs += [("--namespaces", spec) for spec in args.namespaces or []]
    args.namespaces = None
    for where, spec in specs:
        try:
            for name, options in ns_config.parse_specs(spec).items():
                table[name] = {**(table.get(name) or {}), **options}
                ns_origin[name] = f"{where} {name}"
        except ValueError as exc:
            parser.error(f"{where}: {exc}")
    merged.update(env)
    origin.update(dict.fromkeys(env, "env"))
    flags = {k: v for k, v in vars(args).items() if k != "config" and v is not None}
    merged.update(flags)
    origin.update(dict.fromkeys(flags, "flag"))
    for name in list(merged):
        if name not in Settings.__annotations__:
            parser.error(
                f"{name} in --config {config_path}: not a setting (the keys are the flag names without --)"
            )
        try:
            merged[name] = convert(name, merged[name])
        except BadValue as exc:
            label = _label(name, origin.get(name, "flag"), config_path)
            parser.error(f"{label}: expected {exc}, got {shown(name, merged[name])}")
    merged["namespaces"] = table
    try:
        settings = msgspec.convert(merged, Settings)
    except msgspec.ValidationError:  # every field was converted above: a bug here, not the user's input
        parser.error("invalid settings; see wsfan --help")
    if settings.production:
        settings = production_profile(settings, given=set(merged))
    problems = validate(settings, ns_origin)
    if problems:
        parser.error("; ".join(problems))
    return settings


def production_profile(s: Settings, given: set[str]) -> Settings:
    """What --production changes, unless a setting was given explicitly (then the explicit value wins)."""
    changes: dict[str, Any] = {"echo_endpoint": False, "demo": False}
    if "workers" not in given:
        # Workers share rooms only through a broker: without one, a single worker is the only correct choice.
        changes["workers"] = (os.cpu_count() or 1) if s.broker else 1
    if "log_format" not in given:
        changes["log_format"] = "json"
    return msgspec.structs.replace(s, **changes)


def warnings(s: Settings) -> list[str]:
    """Settings that run but that a production deployment should not keep: one sentence each, logged at start."""
    out = []
    if s.production and not s.allowed_origins.strip():
        out.append(
            "--allowed-origins is not set: a page on any web site can open WebSocket connections "
            "and SSE streams here with its visitors' cookies (cross-site WebSocket hijacking)"
        )
    return out


def validate(s: Settings, ns_origin: dict[str, str] | None = None) -> list[str]:
    """What is wrong with settings as a whole (empty when nothing): each setting's ``RULES`` (``load``
    applies them first, naming where the value came from) and the rules between settings.
    ``ns_origin`` names where each namespace was configured (``--namespaces``, ``--config FILE``)."""
    problems = []
    for name, (ok, text) in RULES.items():
        value = getattr(s, name)
        if not ok(value):
            problems.append(f"{_flag(name)}: expected {text}, got {shown(name, value)}")
    if s.workers > 1 and not s.broker:
        problems.append("--workers > 1 needs --broker redis://...: workers share rooms only through a broker")
    if s.broker.startswith(("redis+cluster://", "redis+sentinel://")):
        from wsfan.server.broker.redis_cluster import seeds
        from wsfan.server.broker.redis_sentinel import parse

        try:
            (seeds if s.broker.startswith("redis+cluster://") else parse)(s.broker)
        except ValueError as exc:
            problems.append(f"--broker: {exc}")
    elif s.broker and not s.broker.startswith(("redis://", "rediss://", "unix://")):
        problems.append(
            "--broker must be a redis:// URL (or rediss://, redis+cluster://host:port,host:port, "
            "redis+sentinel://host:port,host:port/master-name)"
        )
    if bool(s.tls_cert) != bool(s.tls_key):
        problems.append("--tls-cert and --tls-key go together: give both or neither")
    elif s.tls_cert:
        try:
            tls_context(s)
        except ValueError as exc:
            problems.append(str(exc))
    if s.jwks_url and not s.jwks_url.startswith(("https://", "http://")):
        problems.append("--jwks-url must be an https:// (or http://) URL")
    if (
        s.production
        and not s.allow_anonymous
        and not ((s.jwt_secret or s.jwt_public_key or s.jwks_url) and s.admin_key)
    ):
        problems.append(
            "--production needs --jwt-secret, --jwt-public-key or --jwks-url, and --admin-key (or --allow-anonymous)"
        )
    if s.metrics_port and s.metrics_port in (s.port, s.http_port):
        problems.append("--metrics-port must differ from --port and --http-port")
    problems += namespaces(s, ns_origin)[1]
    return problems


def namespaces(s: Settings, origin: dict[str, str] | None = None) -> tuple[ns_config.Namespaces, list[str]]:
    """The room namespaces these settings describe, and what is wrong with them (empty when valid);
    ``origin`` names where each was configured, for the problems' text."""
    default = ns_config.Namespace(
        history_size=s.history_size,
        history_ttl=s.history_ttl,
        presence=s.presence,
        join_leave=s.join_leave,
        allow_publish=s.allow_publish,
        allow_history=s.allow_history,
    )
    return ns_config.build(default, s.namespaces, origin)


def tls_context(s: Settings) -> ssl.SSLContext | None:
    """The server-side TLS context of ``--tls-cert``/``--tls-key``; ``None`` when TLS is off.

    TLS 1.2 is the floor (RFC 8996 deprecates 1.0 and 1.1); ALPN offers only ``http/1.1``,
    the one HTTP version both listeners speak (a WebSocket upgrade is an HTTP/1.1 request,
    RFC 6455 section 4.1). Raises ``ValueError`` with a one-line reason (the file and what is
    wrong with it) when the files cannot be read or do not make a key pair.
    """
    if not (s.tls_cert and s.tls_key):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(s.tls_cert, s.tls_key)
    except OSError as exc:
        if isinstance(exc, ssl.SSLError):
            why = "not a PEM certificate and matching private key"
        else:
            why = exc.strerror or type(exc).__name__
        raise ValueError(
            f"--tls-cert {s.tls_cert} / --tls-key {s.tls_key}: cannot load them ({why})"
        ) from None
    return ctx
