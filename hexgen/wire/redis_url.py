"""What a HexGen Redis URL may say, checked up front, and the redis-py client it makes.

Schemes:

- ``redis://[user:password@]host[:port][/db]`` and ``unix:///path/to/socket`` — one server;
- ``rediss://…`` — the same over TLS;
- ``redis+sentinel://[user:password@]host1:26379,host2:26379,host3:26379/<service>[/db]`` — ask the sentinels
  which server is the master of ``service`` (and again after every connection error, so clients follow a
  failover); ``rediss+sentinel://`` talks TLS to the data servers. ``user:password`` are the data servers'
  credentials; the sentinels' own go in ``sentinel_username`` / ``sentinel_password``.

Query options (anything else is an error naming the option):

- TLS (redis-py's names): ``ssl_ca_certs`` (CA bundle), ``ssl_certfile`` + ``ssl_keyfile`` (client
  certificate, when the server requires one), ``ssl_cert_reqs`` (``required`` | ``optional`` | ``none``),
  ``ssl_check_hostname`` (true | false), ``ssl_password`` (the key file's pass phrase), ``ssl_ca_path``;
- ``db`` (also the path's number; unix sockets have only this), ``socket_connect_timeout``,
  ``health_check_interval``;
- ``sentinel_username``, ``sentinel_password``;
- durability: ``wait_replicas=N`` (with ``wait_timeout_ms``, default 1000): after a client's request XADD and
  after the head's submit, ``WAIT N`` for N replicas to hold the write before going on, which closes the
  window in which a failover loses an acknowledged request (docs/reliability.md). 0 (default): no WAIT.

Secrets (password, ``sentinel_password``, ``ssl_password``) never reach logs: :func:`redact_url`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
TLS_OPTIONS = (
    "ssl_ca_certs",
    "ssl_certfile",
    "ssl_keyfile",
    "ssl_cert_reqs",
    "ssl_check_hostname",
    "ssl_password",
    "ssl_ca_path",
)
CERT_REQS = ("required", "optional", "none")
SECRET_OPTIONS = ("sentinel_password", "ssl_password")
_BOOL = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
OPTIONS = (
    "db",
    *TLS_OPTIONS,
    "socket_connect_timeout",
    "health_check_interval",
    "sentinel_username",
    "sentinel_password",
    "wait_replicas",
    "wait_timeout_ms",
)
DEFAULT_SENTINEL_PORT = 26379
DEFAULT_WAIT_TIMEOUT_MS = 1000


class RedisUrlError(ValueError):
    """A Redis URL that HexGen cannot use; the message names the part and what is allowed."""


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL. ``kwargs`` go to every redis-py connection (credentials, db, TLS options)."""

    scheme: str
    hosts: tuple[tuple[str, int], ...]  # the server, or the sentinels
    service: str = ""  # sentinel: the monitored master's name
    kwargs: dict[str, Any] = field(default_factory=dict, repr=False)
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict, repr=False)
    wait_replicas: int = 0
    wait_timeout_ms: int = DEFAULT_WAIT_TIMEOUT_MS

    @property
    def sentinel(self) -> bool:
        return self.scheme.endswith("+sentinel")

    @property
    def tls(self) -> bool:
        return self.scheme.startswith("rediss")


def _split(url: str) -> tuple[str, str, str, str, str]:
    """(scheme, userinfo, hosts, path, query) without percent-decoding."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise RedisUrlError("redis url: not a URL (no '://'); e.g. redis://localhost:6379/0")
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    return scheme.lower(), userinfo if at else "", hosts, (slash + path), query


def redact_url(url: str) -> str:
    """The URL with its password and secret options replaced by ``***`` (for logs and status output)."""
    try:
        scheme, userinfo, hosts, path, query = _split(url)
    except RedisUrlError:
        return "<invalid url>"
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    pairs = [(k, "***" if k in SECRET_OPTIONS else v) for k, v in parse_qsl(query, keep_blank_values=True)]
    q = ("?" + "&".join(f"{k}={v}" for k, v in pairs)) if pairs else ""
    return f"{scheme}://{userinfo + '@' if userinfo else ''}{hosts}{path}{q}"


def _port(text: str, what: str, url: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        raise RedisUrlError(f"redis url: {what} port {text!r} in {redact_url(url)!r} must be 1-65535")
    return port


def _hosts(hosts: str, default_port: int, url: str) -> tuple[tuple[str, int], ...]:
    out = []
    for item in hosts.split(","):
        item = item.strip()
        if item.startswith("["):  # [ipv6]:port
            host, _, port = item[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        if not host:
            raise RedisUrlError(f"redis url: {redact_url(url)!r} has an empty host (e.g. redis://localhost:6379/0)")
        out.append((unquote(host), _port(port, host, url) if port else default_port))
    return tuple(out)


def _db(text: str, url: str) -> int:
    if text in ("", "/"):
        return 0
    if not text.isdigit():
        raise RedisUrlError(f"redis url: database {text!r} in {redact_url(url)!r} must be a number ≥ 0")
    return int(text)


def _sentinel_target(
    url: str,
    scheme: str,
    hosts: str,
    path: str,
    kwargs: dict[str, Any],
    sentinel_kwargs: dict[str, Any],
    wait_replicas: int,
    wait_timeout_ms: int,
) -> RedisTarget:
    """A ``redis+sentinel://`` URL's path: /<service>[/db]."""
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise RedisUrlError(
            f"redis url: {redact_url(url)!r} names no service; use "
            "redis+sentinel://host1:26379,host2:26379/<service>[/db]"
        )
    if len(parts) > 2:
        raise RedisUrlError(f"redis url: path {path!r} must be /<service>[/db]")
    if len(parts) > 1 or "db" not in kwargs:
        kwargs["db"] = _db(parts[1] if len(parts) > 1 else "", url)
    if scheme.startswith("rediss"):
        kwargs["ssl"] = True
    return RedisTarget(
        scheme,
        _hosts(hosts, DEFAULT_SENTINEL_PORT, url),
        unquote(parts[0]),
        kwargs,
        sentinel_kwargs,
        wait_replicas,
        wait_timeout_ms,
    )


def _text(key: str, value: str) -> str:
    return value


def _cert_reqs(key: str, value: str) -> str:
    if value not in CERT_REQS:
        raise RedisUrlError(f"redis url: {key} {value!r} must be one of {', '.join(CERT_REQS)}")
    return value


def _flag(key: str, value: str) -> bool:
    if value.lower() not in _BOOL:
        raise RedisUrlError(f"redis url: {key} {value!r} must be true or false")
    return _BOOL[value.lower()]


def _seconds(key: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise RedisUrlError(f"redis url: {key} {value!r} must be a number of seconds > 0")
    return seconds


def _count(key: str, value: str) -> int:
    if not value.isdigit():
        raise RedisUrlError(f"redis url: {key} {value!r} must be an integer ≥ 0")
    return int(value)


def _timeout_ms(key: str, value: str) -> int:
    if _count(key, value) < 1:
        raise RedisUrlError(f"redis url: {key} must be ≥ 1 (0 would make WAIT block forever when a replica is down)")
    return int(value)


_PARSERS = {
    "ssl_cert_reqs": _cert_reqs,
    "ssl_check_hostname": _flag,
    "socket_connect_timeout": _seconds,
    "db": _count,
    "health_check_interval": _count,
    "wait_replicas": _count,
    "wait_timeout_ms": _timeout_ms,
}


def _option(key: str, value: str, scheme: str) -> tuple[str, Any]:
    """One query option checked: (where it goes: "kw", "sentinel" or "wait", its value)."""
    if key not in OPTIONS:
        raise RedisUrlError(f"redis url: query option {key!r} is unknown; allowed: {', '.join(OPTIONS)}")
    if key in TLS_OPTIONS and not scheme.startswith("rediss"):
        raise RedisUrlError(f"redis url: {key} needs a TLS scheme (rediss:// or rediss+sentinel://)")
    if key.startswith("sentinel_") and not scheme.endswith("+sentinel"):
        raise RedisUrlError(f"redis url: {key} is only for redis+sentinel:// URLs")
    parsed = _PARSERS.get(key, _text)(key, value)
    return ("sentinel" if key.startswith("sentinel_") else "wait" if key.startswith("wait_") else "kw"), parsed


def _options(userinfo: str, query: str, scheme: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """(connection kwargs, sentinel kwargs, wait settings) from the URL's credentials and query."""
    kwargs: dict[str, Any] = {}
    sentinel_kwargs: dict[str, Any] = {}
    wait = {"wait_replicas": 0, "wait_timeout_ms": DEFAULT_WAIT_TIMEOUT_MS}
    user, _, password = userinfo.partition(":")
    if user:
        kwargs["username"] = unquote(user)
    if password:
        kwargs["password"] = unquote(password)
    for key, value in parse_qsl(query, keep_blank_values=True):
        where, parsed = _option(key, value, scheme)
        if where == "sentinel":
            sentinel_kwargs[key.removeprefix("sentinel_")] = parsed
        elif where == "wait":
            wait[key] = parsed
        else:
            kwargs[key] = parsed
    if ("ssl_certfile" in kwargs) != ("ssl_keyfile" in kwargs):
        raise RedisUrlError("redis url: ssl_certfile and ssl_keyfile go together (the client certificate and its key)")
    return kwargs, sentinel_kwargs, wait


def parse_redis_url(url: str) -> RedisTarget:
    """Check ``url`` and say what it means; raises :class:`RedisUrlError` naming the problem."""
    if not isinstance(url, str) or not url:
        raise RedisUrlError(f"redis url: {url!r} must be a non-empty string (e.g. redis://localhost:6379/0)")
    scheme, userinfo, hosts, path, query = _split(url)
    if scheme not in SCHEMES:
        raise RedisUrlError(
            f"redis url: scheme {scheme!r} is not supported; use one of {', '.join(s + '://' for s in SCHEMES)}"
        )
    kwargs, sentinel_kwargs, wait = _options(userinfo, query, scheme)
    wait_replicas, wait_timeout_ms = wait["wait_replicas"], wait["wait_timeout_ms"]
    if scheme == "unix":
        if hosts or not path.strip("/"):
            raise RedisUrlError(f"redis url: {redact_url(url)!r} must be unix:///path/to/socket")
        return RedisTarget(
            scheme,
            (),
            kwargs={**kwargs, "unix_socket_path": unquote(path)},
            wait_replicas=wait_replicas,
            wait_timeout_ms=wait_timeout_ms,
        )
    if not hosts:
        raise RedisUrlError(f"redis url: {redact_url(url)!r} has no host (e.g. redis://localhost:6379/0)")
    if scheme.endswith("+sentinel"):
        return _sentinel_target(url, scheme, hosts, path, kwargs, sentinel_kwargs, wait_replicas, wait_timeout_ms)
    if "," in hosts:
        raise RedisUrlError(
            f"redis url: {redact_url(url)!r} names several hosts; use redis+sentinel:// for a Sentinel-managed Redis"
        )
    if path.strip("/") or "db" not in kwargs:
        kwargs["db"] = _db(path.strip("/"), url)
    if scheme == "rediss":
        kwargs["ssl"] = True
    return RedisTarget(scheme, _hosts(hosts, 6379, url), "", kwargs, sentinel_kwargs, wait_replicas, wait_timeout_ms)


def with_options(url: str, **options: Any) -> str:
    """``url`` with query options added (None values skipped; existing ones are kept unless given again)."""
    scheme, userinfo, hosts, path, query = _split(url)
    pairs = dict(parse_qsl(query, keep_blank_values=True))
    for k, v in options.items():
        if v is not None:
            pairs[k] = str(v).lower() if isinstance(v, bool) else str(v)
    q = ("?" + urlencode(pairs, quote_via=quote, safe="/")) if pairs else ""
    return f"{scheme}://{userinfo + '@' if userinfo else ''}{hosts}{path}{q}"


class _SentinelRedis(redis.Redis):
    """The master's client; closing it also closes its connections to the sentinels."""

    sentinel_clients: list[Any] = []

    def close(self) -> None:
        super().close()
        for c in self.sentinel_clients:
            c.close()


class _AsyncSentinelRedis(redis.asyncio.Redis):
    """The master's async client; closing it also closes its connections to the sentinels."""

    sentinel_clients: list[Any] = []

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        for c in self.sentinel_clients:
            await c.aclose()


def sync_client(url: str, **kwargs: Any) -> redis.Redis:
    """A redis-py client for ``url`` (sentinel-managed for ``redis+sentinel://``). ``kwargs``: socket_timeout…"""
    t = parse_redis_url(url)
    kw = {**t.kwargs, **kwargs}
    if t.sentinel:
        sentinel = redis.sentinel.Sentinel(list(t.hosts), sentinel_kwargs=_sentinel_kw(t, kw), **kw)
        client = sentinel.master_for(t.service, redis_class=_SentinelRedis)
        client.sentinel_clients = list(sentinel.sentinels)
        return client
    if t.scheme == "unix":
        return redis.Redis(**kw)
    host, port = t.hosts[0]
    return redis.Redis(host=host, port=port, **kw)


def async_client(url: str, **kwargs: Any) -> redis.asyncio.Redis:
    """A redis.asyncio client for ``url`` (sentinel-managed for ``redis+sentinel://``)."""
    t = parse_redis_url(url)
    kw = {**t.kwargs, **kwargs}
    if t.sentinel:
        sentinel = redis.asyncio.sentinel.Sentinel(list(t.hosts), sentinel_kwargs=_sentinel_kw(t, kw), **kw)
        client = sentinel.master_for(t.service, redis_class=_AsyncSentinelRedis)
        client.sentinel_clients = list(sentinel.sentinels)
        return client
    if t.scheme == "unix":
        return redis.asyncio.Redis(**kw)
    host, port = t.hosts[0]
    return redis.asyncio.Redis(host=host, port=port, **kw)


def _sentinel_kw(t: RedisTarget, kw: dict[str, Any]) -> dict[str, Any]:
    """Sentinel connections: short timeouts (they answer at once), their own credentials, no TLS."""
    return {"socket_timeout": 2.0, "socket_connect_timeout": kw.get("socket_connect_timeout", 2.0), **t.sentinel_kwargs}


def wait_replicas(client: redis.Redis, target: RedisTarget) -> int:
    """``WAIT`` for the URL's ``wait_replicas`` (no-op at 0); returns how many replicas acknowledged."""
    if target.wait_replicas <= 0:
        return 0
    return int(client.wait(target.wait_replicas, target.wait_timeout_ms))


async def async_wait_replicas(client: Any, target: RedisTarget) -> int:
    """:func:`wait_replicas` on a redis.asyncio client."""
    if target.wait_replicas <= 0:
        return 0
    return int(await client.wait(target.wait_replicas, target.wait_timeout_ms))
