"""Deployment settings: TOML, env and flag precedence; every error names its key."""
from __future__ import annotations

import argparse

import pytest

from hexgen.errors import ConfigError
from hexgen.wire.settings import (LimitSettings, ModelSettings, PipelineSettings, RedisSettings, Settings,
                                     add_settings_args, load_redis_url, load_settings, redact_url,
                                     settings_from_args, settings_from_dict, sync_redis)

FULL = """
dtype = "bf16"
device = "cuda"

[redis]
url = "rediss://:s3cret@redis.example:6380/2"

[model]
name = "smol"
path = "/models/smol"
max_model_len = 2048

[[pipelines]]
id = "p0"
hetero_config = [2, 1]
pp_partition = [20, 10]
devices = ["cuda:0", "cuda:1", "cuda:2"]

[[pipelines]]
id = "p1"
hetero_config = [3]

[limits]
max_queue_depth = 8
max_new_tokens = 512
lease_s = 12.5
"""


@pytest.fixture
def toml_file(tmp_path):
    def write(text):
        p = tmp_path / "deploy.toml"
        p.write_text(text)
        return str(p)
    return write


def test_full_file(toml_file):
    s = load_settings(toml_file(FULL), env={})
    assert s.dtype == "bfloat16" and s.device == "cuda"
    assert s.redis.url == "rediss://:s3cret@redis.example:6380/2"
    assert s.model == ModelSettings(name="smol", path="/models/smol", tokenizer="/models/smol", max_model_len=2048)
    assert s.work_stream == "hexgen:work:smol"
    assert s.pipelines[0] == PipelineSettings("p0", (2, 1), (20, 10), ("cuda:0", "cuda:1", "cuda:2"))
    assert s.pipeline("p1").pp_partition == () and s.pipeline("p1").layout_text.endswith("auto")
    assert s.limits.max_queue_depth == 8 and s.limits.lease_s == 12.5
    assert s.limits.request_limits().max_new_tokens == 512
    assert s.limits.socket_timeout_s > s.limits.block_ms / 1000
    with pytest.raises(ConfigError, match="pipeline: 'p9' is not in the config; known: p0, p1"):
        s.pipeline("p9")


def test_password_never_in_repr(toml_file):
    s = load_settings(toml_file(FULL), env={})
    assert "s3cret" not in repr(s) and "s3cret" not in repr(s.redis)
    assert s.redis.display_url == "rediss://:***@redis.example:6380/2"
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_precedence_flags_over_env_over_file(toml_file):
    path = toml_file(FULL)
    env = {"HEXGEN_REDIS_URL": "redis://env-host:6379/0"}
    assert load_settings(path, env=env).redis.url == "redis://env-host:6379/0"
    s = load_settings(path, env=env, overrides={"redis.url": "redis://flag-host:1/0", "dtype": None})
    assert s.redis.url == "redis://flag-host:1/0" and s.dtype == "bfloat16"
    s = load_settings(path, env={}, overrides={"model.preset": "tiny", "limits.max_queue_depth": 3})
    assert s.model.preset == "tiny" and s.model.path == "" and s.model.name == "smol"
    assert s.limits.max_queue_depth == 3


def test_flags(toml_file):
    parser = argparse.ArgumentParser()
    add_settings_args(parser)
    ns = parser.parse_args(["--config", toml_file(FULL), "--model-path", "/m/other", "--dtype", "fp16",
                            "--redis-url", "redis://localhost:7/0"])
    s = settings_from_args(ns, env={"HEXGEN_REDIS_URL": "redis://env:1/0"})
    assert s.model.path == "/m/other" and s.model.tokenizer == "/m/other" and s.dtype == "float16"
    assert s.redis.url == "redis://localhost:7/0"
    ns = parser.parse_args(["--preset", "tiny"])
    s = settings_from_args(ns, env={})
    assert s.model.name == "tiny" and s.redis.url == "redis://localhost:6379/0" and s.pipelines == ()


def test_model_name_defaults_to_folder():
    assert ModelSettings(path="/x/SmolLM2-135M-Instruct/").name == "SmolLM2-135M-Instruct"


@pytest.mark.parametrize("text,match", [
    ("[model]\npath='/m'\n[limits]\nmax_tokens=3\n", "limits.max_tokens: unknown key; allowed: "),
    ("bogus = 1\n[model]\npath='/m'\n", "bogus: unknown key; allowed top-level keys"),
    ("[redis]\nurl='redis://h:1/0'\n", "model: missing"),
    ("[model]\n", r"model.path, model.preset: set exactly one"),
    ("[model]\npath='/m'\npreset='tiny'\n", r"model.path, model.preset: set exactly one"),
    ("[model]\npreset='llama-9000'\n", "model.preset: 'llama-9000' is unknown; choose one of"),
    ("[model]\npath='/m'\nname='a b'\n", "model.name: 'a b' is not allowed"),
    ("dtype='int4'\n[model]\npath='/m'\n", "dtype: 'int4' is not supported"),
    ("device='tpu'\n[model]\npath='/m'\n", "device: 'tpu' must be 'cpu' or 'cuda'"),
    ("[model]\npath='/m'\n[redis]\nurl='http://h'\n", "redis.url: scheme 'http' is not supported"),
    ("[model]\npath='/m'\n[redis]\nurl='redis://h:notaport/0'\n", "redis.url: h port 'notaport' .* must be 1-65535"),
    ("[model]\npath='/m'\n[redis]\nurl='redis://'\n", "redis.url: .* has no host"),
    ("[model]\npath='/m'\n[[pipelines]]\nid='p0'\nhetero_config=[2,1]\npp_partition=[3]\n",
     r"pipelines\['p0'\]: pp-partition: 1 stages given but hetero-config has 2"),
    ("[model]\npath='/m'\n[[pipelines]]\nid='p0'\nhetero_config=[0]\n",
     r"pipelines\['p0'\].hetero_config: \[0\] must be a non-empty list"),
    ("[model]\npath='/m'\n[[pipelines]]\nid='p0'\nhetero_config=[2]\ndevices=['cuda:0']\n",
     r"pipelines\['p0'\].devices: 1 devices given but the pipeline has 2 ranks"),
    ("[model]\npath='/m'\n[[pipelines]]\nhetero_config=[1]\n", r"pipelines\[0\]: .*id"),
    ("[model]\npath='/m'\n[[pipelines]]\nid='p0'\nhetero_config=[1]\n[[pipelines]]\nid='p0'\nhetero_config=[1]\n",
     "pipelines.id: 'p0' is used by more than one pipeline"),
    ("[model]\npath='/m'\n[limits]\nmax_queue_depth=0\n", "limits.max_queue_depth: 0 must be an integer ≥ 1"),
    ("[model]\npath='/m'\n[limits]\nlease_s=-1\n", "limits.lease_s: -1 must be a finite number > 0"),
    ("[model]\npath='/m'\n[limits]\nmax_new_tokens=10\n", "limits.default_max_new_tokens: 64 must be ≤"),
    ("[model]\npath='/m'\n[limits]\nheartbeat_ttl_s=2\n", "limits.heartbeat_interval_s: 2.0 must be <"),
    ("[model]\npath='/m'\n[limits]\nblock_ms=true\n", "limits.block_ms: True must be an integer"),
    ("model = 3\n", "model: must be a table"),
])
def test_errors_name_the_key(toml_file, text, match):
    with pytest.raises(ConfigError, match=match):
        load_settings(toml_file(text), env={})


def test_file_errors(tmp_path, toml_file):
    with pytest.raises(ConfigError, match="config: cannot read"):
        load_settings(str(tmp_path / "missing.toml"), env={})
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_settings(toml_file("[model\n"), env={})
    with pytest.raises(ConfigError, match="model: missing"):
        load_settings(None, env={})


def test_unix_socket_url_and_direct_construction():
    s = Settings(model=ModelSettings(preset="tiny"), redis=RedisSettings("unix:///tmp/redis.sock?db=1"))
    assert s.redis.url.startswith("unix://") and s.limits == LimitSettings()
    assert settings_from_dict({"model": {"preset": "tiny"}}).model.name == "tiny"


def test_load_redis_url(toml_file):
    path = toml_file('[redis]\nurl = "redis://file:1/0"\n')
    assert load_redis_url(path, None, env={}) == "redis://file:1/0"
    assert load_redis_url(path, None, env={"HEXGEN_REDIS_URL": "redis://env:1/0"}) == "redis://env:1/0"
    assert load_redis_url(path, "redis://flag:1/0", env={"HEXGEN_REDIS_URL": "redis://env:1/0"}) == \
        "redis://flag:1/0"
    assert load_redis_url(None, None, env={}) == "redis://localhost:6379/0"
    with pytest.raises(ConfigError, match="redis.url"):
        load_redis_url(None, "ftp://x", env={})


def test_sync_redis_against_real_server(redis_server):
    r = sync_redis(redis_server, socket_timeout=2)
    try:
        assert r.ping()
        assert r.connection_pool.connection_kwargs["socket_timeout"] == 2
    finally:
        r.close()


def test_redis_urls_with_password_reach_a_protected_server():
    """redis://:password@host works end to end (sync and async clients); a wrong one fails loudly."""
    import asyncio

    import redis

    from hexgen.wire.settings import async_redis
    from tests.redis_server import RedisServer, redis_server_binary

    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server is not installed")
    with RedisServer(binary, ("--requirepass", "s3cret")) as server:
        host_port = server.url.split("//")[1]
        url = load_settings(None, env={"HEXGEN_REDIS_URL": f"redis://:s3cret@{host_port}"},
                            overrides={"model.preset": "tiny"}).redis.url
        r = sync_redis(url)
        try:
            assert r.ping()
        finally:
            r.close()

        async def ping_async():
            a = async_redis(url)
            try:
                return await a.ping()
            finally:
                await a.aclose()
        assert asyncio.run(ping_async())
        bad = sync_redis(f"redis://:wrong@{host_port}")
        try:
            with pytest.raises(redis.exceptions.AuthenticationError):
                bad.ping()
        finally:
            bad.close()


def test_redis_table_options_fold_into_the_url(toml_file):
    path = toml_file('[model]\npath="/m"\n[redis]\nurl = "rediss://u:pw@r:6380/1"\nssl_ca_certs = "/ca b.pem"\n'
                     'ssl_certfile = "/c.pem"\nssl_keyfile = "/c.key"\nwait_replicas = 1\n')
    s = load_settings(path, env={})
    assert s.redis.url == ("rediss://u:pw@r:6380/1?ssl_ca_certs=/ca%20b.pem&ssl_certfile=/c.pem"
                           "&ssl_keyfile=/c.key&wait_replicas=1")
    assert "pw" not in repr(s.redis)
    # a flag's URL keeps the file's options
    assert load_redis_url(path, "rediss://other:1/0", env={}).startswith("rediss://other:1/0?ssl_ca_certs=")
    s = settings_from_dict({"model": {"path": "/m"}, "redis": {
        "url": "redis://hexgen-head:pw@ignored:1/2", "sentinels": ["s1:26379", "s2:26380"], "service": "main"}})
    assert s.redis.url == "redis+sentinel://hexgen-head:pw@s1:26379,s2:26380/main/2"


@pytest.mark.parametrize("table, match", [
    ({"url": "redis://h/0", "ssl_ca_certs": "/ca"}, "redis.url: ssl_ca_certs needs a TLS scheme"),
    ({"url": "rediss://h/0", "ssl_cert_reqs": "maybe"}, "ssl_cert_reqs 'maybe' must be one of"),
    ({"url": "rediss://h/0", "ssl_ca_certs": 3}, "redis.ssl_ca_certs: 3 must be a string"),
    ({"url": "redis://h/0", "sentinels": ["s1:1"]}, "redis.sentinels, redis.service: set both"),
    ({"url": "redis://h/0", "sentinels": "s1:1", "service": "m"}, "redis.sentinels: 's1:1' must be a list"),
    ({"url": "redis://h/0", "wait_replicas": -1}, "redis.wait_replicas: -1 must be an integer"),
    ({"url": "redis://h/0?wait_replicas=x"}, "redis.url: wait_replicas 'x' must be an integer"),
    ({"url": "redis://h/0", "tls": True}, "redis.tls: unknown key"),
])
def test_redis_table_errors_name_the_key(table, match):
    with pytest.raises(ConfigError, match=match):
        settings_from_dict({"model": {"path": "/m"}, "redis": table})


def test_kernels_table_and_trace_timing(tmp_path):
    from hexgen.config import KernelConfig

    path = tmp_path / "k.toml"
    path.write_text('trace_timing = true\n[model]\npreset = "tiny"\n[kernels]\ngemv = "cublas"\nfused = "off"\n')
    s = load_settings(str(path), env={})
    assert s.kernels == KernelConfig(gemv="cublas", fused=False) and s.trace_timing
    plain = tmp_path / "p.toml"
    plain.write_text('[model]\npreset = "tiny"\n')
    assert not load_settings(str(plain), env={}).trace_timing
    assert load_settings(str(plain), env={"HEXGEN_TRACE_TIMING": "1"}).trace_timing
    assert load_settings(str(plain), env={}).kernels == KernelConfig()
    path.write_text('[model]\npreset = "tiny"\n[kernels]\ngemv = "torch"\n')
    with pytest.raises(ConfigError, match="kernels.gemv: 'torch' is not allowed; choose one of triton"):
        load_settings(str(path), env={})
    path.write_text('[model]\npreset = "tiny"\n[kernels]\nflash = true\n')
    with pytest.raises(ConfigError, match="kernels: 'flash' is not a kernel setting"):
        load_settings(str(path), env={})
    path.write_text('trace_timing = "yes"\n[model]\npreset = "tiny"\n')
    with pytest.raises(ConfigError, match="trace_timing: 'yes' must be true or false"):
        load_settings(str(path), env={})


def test_worker_engine_takes_the_kernels_table_and_the_flags_override_it(tmp_path):
    from hexgen.config import KernelConfig
    from workers.options import WorkerOptions, build_plan

    path = tmp_path / "k.toml"
    path.write_text('[model]\npreset = "tiny"\n[[pipelines]]\nid = "p0"\nhetero_config = [1]\n'
                    '[kernels]\ngemv = "cublas"\n')
    s = load_settings(str(path), env={})
    _, _, engine = build_plan(WorkerOptions(s, "p0", 0, log_level="info"))
    assert engine.kernels == KernelConfig(gemv="cublas") and engine.log_level == "INFO"
    _, _, engine = build_plan(WorkerOptions(s, "p0", 0, engine_overrides={"kernels": KernelConfig(pdl=False)}))
    assert engine.kernels == KernelConfig(pdl=False)
