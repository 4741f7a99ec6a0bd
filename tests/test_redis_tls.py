"""TLS end to end: a TLS-only redis-server (``--port 0 --tls-port``) with a test CA; head, a pipeline and the
async client serve over it, with client certificates required and not; the TLS options come from the URL
query or from ``[redis]``, and no secret reaches a log."""
from __future__ import annotations

import pytest
import redis

from hexgen.client import HexGenClient
from tests.redis_topology import RedisNode, binary_or_skip
from tests.reliability_harness import deploy
from tests.serving_harness import PipelineSpec
from tests.tls_certs import CertError, make_certs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]
PASSWORD = "tls-test-secret-4c1f"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    try:
        return make_certs(str(tmp_path_factory.mktemp("certs")))
    except CertError as e:
        pytest.skip(f"cannot make test certificates: {e}")


def tls_server(certs, require_client_certs: bool) -> RedisNode:
    return RedisNode(binary_or_skip(), (
        "--save", "", "--appendonly", "no", "--requirepass", PASSWORD,
        "--tls-cert-file", certs.server_cert, "--tls-key-file", certs.server_key,
        "--tls-ca-cert-file", certs.ca, "--tls-auth-clients", "yes" if require_client_certs else "no"),
        tls=True).start()


@pytest.mark.parametrize("require_client_certs, options_in", [(True, "url"), (False, "table")])
async def test_serving_over_tls_only(certs, tmp_path, require_client_certs, options_in):
    node = tls_server(certs, require_client_certs)
    try:
        plain = redis.Redis(port=node.port, password=PASSWORD, socket_timeout=3, socket_connect_timeout=3)
        with pytest.raises((redis.ConnectionError, redis.TimeoutError)):  # no plain-text port, no downgrade
            plain.ping()
        plain.close()
        if require_client_certs:  # a TLS client without a certificate is turned away
            no_cert = redis.Redis.from_url(node.url(f":{PASSWORD}", certs.query(client_cert=False)),
                                           socket_timeout=3)
            with pytest.raises((redis.ConnectionError, redis.TimeoutError)):
                no_cert.ping()
            no_cert.close()
        url = node.url(f":{PASSWORD}", certs.query(client_cert=require_client_certs))
        options = {}
        if options_in == "table":  # the same options from the config file's [redis] table
            options = {"ssl_ca_certs": certs.ca, "ssl_cert_reqs": "required"}
            config_url = node.url(f":{PASSWORD}")
        else:
            config_url = url
        dep = deploy(str(tmp_path), None, [PipelineSpec("p0", (1,), (4,))], url=url, config_url=config_url,
                     redis_options=options)
        try:
            async with HexGenClient(url, block_ms=200, timeout_s=60) as client:
                res = await client.generate("hello world", max_new_tokens=6, ignore_eos=True)
            assert res.completion_tokens == 6
            logs = dep.logs()
            assert "rediss://:***@127.0.0.1" in logs and PASSWORD not in logs, logs
        finally:
            dep.stop()
    finally:
        node.stop()
