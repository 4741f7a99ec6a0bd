"""Redis URLs: every scheme and option checked up front with an error naming it; secrets never printed."""
from __future__ import annotations

import re

import pytest

from hexgen.wire.redis_url import RedisUrlError, parse_redis_url, redact_url, sync_client, with_options


def test_plain_tls_unix_and_sentinel_urls():
    t = parse_redis_url("redis://localhost:6379/3")
    assert (t.scheme, t.hosts, t.kwargs, t.wait_replicas) == ("redis", (("localhost", 6379),), {"db": 3}, 0)
    t = parse_redis_url("rediss://hexgen-head:p%40ss@r.example/0?ssl_ca_certs=/ca.pem&ssl_cert_reqs=required"
                        "&ssl_certfile=/c.pem&ssl_keyfile=/c.key&ssl_check_hostname=false")
    assert t.tls and t.hosts == (("r.example", 6379),)
    assert t.kwargs == {"username": "hexgen-head", "password": "p@ss", "ssl_ca_certs": "/ca.pem",
                        "ssl_cert_reqs": "required", "ssl_certfile": "/c.pem", "ssl_keyfile": "/c.key",
                        "ssl_check_hostname": False, "db": 0, "ssl": True}
    t = parse_redis_url("unix:///run/redis.sock")
    assert t.kwargs == {"unix_socket_path": "/run/redis.sock"}
    t = parse_redis_url("redis+sentinel://:pw@s1:26380,s2,[::1]:26381/cache/2?sentinel_password=sp"
                        "&wait_replicas=1&wait_timeout_ms=250")
    assert t.sentinel and t.service == "cache" and t.hosts == (("s1", 26380), ("s2", 26379), ("::1", 26381))
    assert t.kwargs == {"password": "pw", "db": 2} and t.sentinel_kwargs == {"password": "sp"}
    assert (t.wait_replicas, t.wait_timeout_ms) == (1, 250)


@pytest.mark.parametrize("url, message", [
    ("http://h/0", "scheme 'http' is not supported"),
    ("localhost:6379", "not a URL"),
    ("redis://h:0/0", "port '0'"),
    ("redis:///0", "has no host"),
    ("redis://h/x", "database 'x'"),
    ("redis://a:1,b:2/0", "use redis+sentinel://"),
    ("redis://h/0?ssl_ca_certs=/ca", "ssl_ca_certs needs a TLS scheme"),
    ("rediss://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs 'maybe' must be one of required, optional, none"),
    ("rediss://h/0?ssl_certfile=/c", "ssl_certfile and ssl_keyfile go together"),
    ("redis://h/0?sokcet_timeout=1", "query option 'sokcet_timeout' is unknown"),
    ("redis://h/0?wait_replicas=-1", "wait_replicas '-1' must be an integer"),
    ("redis://h/0?wait_timeout_ms=0", "wait_timeout_ms must be ≥ 1"),
    ("redis://h/0?sentinel_password=x", "only for redis+sentinel"),
    ("redis+sentinel://s1:26379", "names no service"),
    ("redis+sentinel://s1/a/b/c", "must be /<service>[/db]"),
])
def test_bad_urls_name_the_problem(url, message):
    with pytest.raises(RedisUrlError, match=re.escape(message)):
        parse_redis_url(url)


def test_secrets_redacted():
    url = "redis+sentinel://u:secret1@s1,s2/m/0?sentinel_password=secret2&wait_replicas=1"
    shown = redact_url(url)
    assert "secret" not in shown and shown.startswith("redis+sentinel://u:***@s1,s2/m/0?")
    assert "ssl_password=***" in redact_url("rediss://h/0?ssl_password=secret3")
    with pytest.raises(RedisUrlError) as e:
        parse_redis_url("redis://u:secret4@h:99999/0")
    assert "secret4" not in str(e.value)


def test_with_options_keeps_credentials_and_quotes_paths():
    url = with_options("rediss://u:p@h:1/0?ssl_cert_reqs=none", ssl_ca_certs="/a b/ca.pem", wait_replicas=None)
    assert url == "rediss://u:p@h:1/0?ssl_cert_reqs=none&ssl_ca_certs=/a%20b/ca.pem"
    assert parse_redis_url(url).kwargs["ssl_ca_certs"] == "/a b/ca.pem"


def test_sync_client_against_real_server(redis_server):
    r = sync_client(redis_server, socket_timeout=2)
    try:
        assert r.ping()
    finally:
        r.close()


def test_rank_address_on_the_route_to_a_sentinel_or_socket():
    from workers.registry import routable_address

    for url in ("redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/m/0", "unix:///run/redis.sock",
                "rediss://u:p@127.0.0.1:6380/0?ssl_cert_reqs=none"):
        addr = routable_address(url)
        assert addr.count(".") == 3, (url, addr)
