"""The ``[http]`` settings table, ``HEXGEN_API_KEY`` and bin/head's HTTP flags."""
from __future__ import annotations

import pytest

from hexgen.cli.head import build_parser, http_settings_overrides
from hexgen.errors import ConfigError
from hexgen.wire.settings import API_KEY_ENV, HttpSettings, load_settings


def write(tmp_path, text: str) -> str:
    p = tmp_path / "deploy.toml"
    p.write_text('[model]\npreset = "tiny"\n' + text)
    return str(p)


def test_defaults_are_off_and_local():
    s = load_settings(None, overrides={"model.preset": "tiny"}, env={})
    assert s.http == HttpSettings() and not s.http.enabled
    assert (s.http.host, s.http.port, s.http.api_key) == ("127.0.0.1", 0, "")


def test_table_env_and_flags_in_order(tmp_path):
    cfg = write(tmp_path, '[http]\nhost = "0.0.0.0"\nport = 8000\napi_key = "from-file"\n')
    s = load_settings(cfg, env={})
    assert (s.http.host, s.http.port, s.http.api_key, s.http.enabled) == ("0.0.0.0", 8000, "from-file", True)
    assert load_settings(cfg, env={API_KEY_ENV: "from-env"}).http.api_key == "from-env"
    args = build_parser().parse_args(["--config", cfg, "--http-port", "9000", "--http-host", "::1",
                                      "--api-key", "from-flag"])
    s = load_settings(cfg, env={API_KEY_ENV: "from-env"}, overrides=http_settings_overrides(args))
    assert (s.http.host, s.http.port, s.http.api_key) == ("::1", 9000, "from-flag")
    none = build_parser().parse_args(["--config", cfg])
    assert load_settings(cfg, env={}, overrides=http_settings_overrides(none)).http.port == 8000


def test_the_key_stays_out_of_repr(tmp_path):
    s = load_settings(write(tmp_path, '[http]\nport = 8000\napi_key = "sk-secret"\n'), env={})
    assert "sk-secret" not in repr(s) and "sk-secret" not in repr(s.http)


@pytest.mark.parametrize("table,match", [
    ("port = 70000", r"http\.port: 70000 must be an integer in \[0, 65535\]"),
    ("port = -1", r"http\.port"), ('port = "80"', r"http\.port"), ("port = true", r"http\.port"),
    ('host = ""', r"http\.host"), ('api_key = "a b"', r"http\.api_key: must not contain whitespace"),
    ("api_key = 5", r"http\.api_key"), ("prot = 8000", r"http\.prot: unknown key"),
])
def test_bad_values_name_the_key(tmp_path, table, match):
    with pytest.raises(ConfigError, match=match):
        load_settings(write(tmp_path, f"[http]\n{table}\n"), env={})


def test_a_busy_port_fails_at_start():
    from hexgen.head.http.app import HttpFront

    s = load_settings(None, overrides={"model.preset": "tiny"}, env={})
    first = HttpFront(s, "127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match=rf"http\.host, http\.port: cannot listen on 127\.0\.0\.1:{first.port}"):
            HttpFront(s, "127.0.0.1", first.port)
    finally:
        first.sock.close()
