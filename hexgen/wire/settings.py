"""Deployment settings: a frozen dataclass tree loaded from TOML, then the environment, then flags.

Precedence, highest first: command-line flags, the environment (``HEXGEN_REDIS_URL`` for the Redis URL,
``HEXGEN_API_KEY`` for the HTTP API key, ``HEXGEN_TRACE_TIMING=1`` for ``trace_timing``), the TOML file, the
defaults here. Unknown keys are a ConfigError naming the key (a typo must not silently fall back to a
default). Example file::

    dtype = "bf16"                 # fp32 | fp16 | bf16
    device = "cuda"                # cpu | cuda
    # trace_timing = true          # latency stamps along the serving path (hexgen.wire.trace)

    [redis]
    url = "rediss://:secret@redis.example:6380/0"   # redis://, rediss:// (TLS), unix://, redis+sentinel://
    # ssl_ca_certs = "ca.pem"      # TLS options (or in the URL's query): ssl_certfile, ssl_keyfile, ...
    # sentinels = ["s1:26379", "s2:26379", "s3:26379"]; service = "mymaster"   # instead of one host
    # wait_replicas = 1            # WAIT for a replica after each accepted request (docs/reliability.md)

    [model]
    name = "smollm2-135m-instruct" # used in stream names: hexgen:work:<name>
    path = ".models/smollm2-135m-instruct"          # Hugging Face directory; or preset = "tiny"
    # tokenizer = "..."            # defaults to path
    # max_model_len = 2048         # defaults to the model's max_position_embeddings

    [[pipelines]]
    id = "p0"
    hetero_config = [2, 1]
    pp_partition = [20, 10]        # optional: layers in proportion to TP
    # tp_ratio = [[2, 1], [1]]     # optional: per-rank shares of each stage (uneven TP shards)
    devices = ["cuda:0", "cuda:1", "cuda:2"]        # optional: one per rank

    [limits]
    max_queue_depth = 1024
    max_new_tokens = 4096

    [http]                         # the head's OpenAI-compatible HTTP front (docs/http-api.md)
    port = 8000                    # 0 (default): off
    host = "127.0.0.1"
    api_key = "..."                # /v1/* needs "Authorization: Bearer <key>"; or HEXGEN_API_KEY

    [kernels]                      # optional: the workers' kernel choices (hexgen.config.KernelConfig)
    gemv = "cublas"                # bin/worker --kernel NAME=VALUE overrides the whole table
"""

from __future__ import annotations

import argparse
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

import redis
import redis.asyncio

from hexgen import shards
from hexgen.config import PRESETS, KernelConfig, Layout, check_kv_cache_dtype, normalize_dtype
from hexgen.errors import ConfigError
from hexgen.quantization import check_quantization
from hexgen.wire import keys as C
from hexgen.wire.redis_url import RedisUrlError, async_client, parse_redis_url, redact_url, sync_client, with_options
from hexgen.wire.settings_tables import EngineSettings, HttpSettings, LimitSettings, check_int

REDIS_URL_ENV = "HEXGEN_REDIS_URL"
TRACE_TIMING_ENV = "HEXGEN_TRACE_TIMING"
API_KEY_ENV = "HEXGEN_API_KEY"
_NAME_RE = re.compile(C.ID_PATTERN)


_TLS_KEYS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname")


@dataclass(frozen=True)
class RedisSettings:
    """Where Redis is, and how to reach it (:mod:`hexgen.wire.redis_url`: schemes, query options).

    The other fields are the same options written as ``[redis]`` keys; they are folded into ``url`` (its
    query; ``sentinels`` + ``service`` make a ``redis+sentinel://`` URL), so every process is handed one
    URL. ``url`` is kept out of repr because it may hold a password; see ``display_url``.
    """

    url: str = field(default=C.DEFAULT_REDIS_URL, repr=False)
    ssl_ca_certs: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    ssl_cert_reqs: str = ""
    ssl_check_hostname: bool | None = None
    sentinels: tuple[str, ...] = ()  # host:port of each sentinel
    service: str = ""  # the sentinels' name of the master
    wait_replicas: int = 0
    wait_timeout_ms: int = 0  # 0: the default (1000)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str):
            raise ConfigError(f"redis.url: {self.url!r} must be a string")
        self._check_types()
        url = self._sentinel_url() if self.sentinels else self.url
        options: dict[str, Any] = {k: getattr(self, k) for k in _TLS_KEYS if getattr(self, k) not in ("", None)}
        options.update({k: getattr(self, k) for k in ("wait_replicas", "wait_timeout_ms") if getattr(self, k)})
        try:
            url = with_options(url, **options) if options else url
            parse_redis_url(url)
        except RedisUrlError as e:
            raise ConfigError(f"redis.url: {str(e).removeprefix('redis url: ')}") from e
        object.__setattr__(self, "url", url)

    def _check_types(self) -> None:
        if isinstance(self.sentinels, str) or not all(isinstance(h, str) and h for h in self.sentinels):
            raise ConfigError(f'redis.sentinels: {self.sentinels!r} must be a list of "host:port" strings')
        object.__setattr__(self, "sentinels", tuple(self.sentinels))
        if bool(self.sentinels) != bool(self.service):
            raise ConfigError(
                "redis.sentinels, redis.service: set both (the sentinels' addresses and the "
                "name of the master they monitor) or neither"
            )
        for key in ("wait_replicas", "wait_timeout_ms"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"redis.{key}: {value!r} must be an integer ≥ 0")
        for key in _TLS_KEYS:
            value = getattr(self, key)
            if key == "ssl_check_hostname":
                if value is not None and not isinstance(value, bool):
                    raise ConfigError(f"redis.{key}: {value!r} must be true or false")
            elif not isinstance(value, str):
                raise ConfigError(f"redis.{key}: {value!r} must be a string")

    def _sentinel_url(self) -> str:
        """``url``'s credentials, db and options with the sentinels' addresses and the service."""
        try:
            t = parse_redis_url(self.url)
        except RedisUrlError as e:
            raise ConfigError(f"redis.url: {str(e).removeprefix('redis url: ')}") from e
        scheme = "rediss+sentinel" if t.tls else "redis+sentinel"
        auth = self.url.partition("://")[2].partition("/")[0].rpartition("@")[0]
        query = self.url.partition("?")[2]
        return (
            f"{scheme}://{auth + '@' if auth else ''}{','.join(self.sentinels)}/{self.service}/"
            f"{t.kwargs.get('db', 0)}" + (f"?{query}" if query else "")
        )

    @property
    def display_url(self) -> str:
        return redact_url(self.url)

    def __repr__(self) -> str:
        return f"RedisSettings(url={self.display_url!r})"


@dataclass(frozen=True)
class ModelSettings:
    """The served model: its name (stream names use it) and its weights (``path``) or a ``preset`` shape."""

    name: str = ""
    path: str = ""
    preset: str = ""
    tokenizer: str = ""  # defaults to path
    max_model_len: int = 0  # 0: the model's max_position_embeddings

    def __post_init__(self) -> None:
        if self.path == "default":  # the embedded default model's cache folder (bin/hexgen fetch-model fills it)
            from hexgen.wire.model_cache import default_model_dir

            object.__setattr__(self, "path", default_model_dir())
        elif self.path:
            object.__setattr__(self, "path", os.path.expandvars(os.path.expanduser(self.path)))
        if bool(self.path) == bool(self.preset):
            raise ConfigError(
                "model.path, model.preset: set exactly one (path: a Hugging Face model directory; "
                f"preset: one of {', '.join(sorted(PRESETS))})"
            )
        if self.preset and self.preset not in PRESETS:
            raise ConfigError(f"model.preset: {self.preset!r} is unknown; choose one of {', '.join(sorted(PRESETS))}")
        if not self.name:
            base = self.preset or os.path.basename(os.path.normpath(self.path))
            object.__setattr__(self, "name", base)
        if not _NAME_RE.fullmatch(self.name):
            raise ConfigError(f"model.name: {self.name!r} is not allowed; use {C.ID_ALLOWED_CHARS}")
        if not self.tokenizer and self.path:
            object.__setattr__(self, "tokenizer", self.path)
        check_int("model.max_model_len", self.max_model_len, 0)


@dataclass(frozen=True)
class PipelineSettings:
    """One pipeline: TP degree per stage, layers per stage (empty: proportional to TP), devices per rank, and
    each stage's per-rank shares (tp_ratio, ``hexgen.shards``; empty: even shards)."""

    id: str
    hetero_config: tuple[int, ...]
    pp_partition: tuple[int, ...] = ()
    devices: tuple[str, ...] = ()
    tp_ratio: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self) -> None:
        key = f"pipelines[{self.id!r}]"
        if not isinstance(self.id, str) or not _NAME_RE.fullmatch(self.id):
            raise ConfigError(f"pipelines.id: {self.id!r} is not allowed; use {C.ID_ALLOWED_CHARS}")
        for name in ("hetero_config", "pp_partition", "devices", "tp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}.{name}: {value!r} must be a list")
            object.__setattr__(self, name, tuple(value))
        if self.pp_partition:
            try:
                object.__setattr__(
                    self, "tp_ratio", Layout(self.hetero_config, self.pp_partition, self.tp_ratio).tp_ratio
                )
            except ConfigError as e:
                raise ConfigError(f"{key}: {e}") from e
        elif not self.hetero_config or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in self.hetero_config
        ):
            raise ConfigError(
                f"{key}.hetero_config: {list(self.hetero_config)!r} must be a non-empty list of TP degrees ≥ 1"
            )
        else:
            try:
                object.__setattr__(self, "tp_ratio", shards.normalize_ratios(self.tp_ratio, self.hetero_config))
            except ConfigError as e:
                raise ConfigError(f"{key}: {e}") from e
        world = sum(self.hetero_config)
        if self.devices and len(self.devices) != world:
            raise ConfigError(
                f"{key}.devices: {len(self.devices)} devices given but the pipeline has "
                f"{world} ranks (sum of hetero_config); give one device per rank or none"
            )

    @property
    def layout_text(self) -> str:
        part = " ".join(map(str, self.pp_partition)) or "auto"
        text = f"hetero-config {' '.join(map(str, self.hetero_config))} / pp-partition {part}"
        if self.tp_ratio:
            text += f" / tp-ratio {shards.describe_ratios(self.tp_ratio, self.hetero_config)}"
        return text


@dataclass(frozen=True)
class Settings:
    """One deployment: Redis, the model, its pipelines and the serving limits."""

    model: ModelSettings
    redis: RedisSettings = field(default_factory=RedisSettings)
    dtype: str = "float32"
    device: str = "cpu"
    pipelines: tuple[PipelineSettings, ...] = ()
    limits: LimitSettings = field(default_factory=LimitSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    kernels: KernelConfig = KernelConfig()  # the workers' kernel choices ([kernels]; --kernel overrides)
    trace_timing: bool = False  # latency stamps along the serving path (hexgen.wire.trace; $HEXGEN_TRACE_TIMING=1)
    kv_cache_dtype: str = "auto"  # the workers' KV cache: auto (the model dtype) or fp8 (EngineConfig)
    quantization: str = "auto"  # the workers' weights: auto (the checkpoint's format) or fp8 (EngineConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if not isinstance(self.trace_timing, bool):
            raise ConfigError(f"trace_timing: {self.trace_timing!r} must be true or false")
        if self.device not in ("cpu", "cuda"):
            raise ConfigError(f"device: {self.device!r} must be 'cpu' or 'cuda'")
        check_kv_cache_dtype(self.kv_cache_dtype)
        check_quantization(self.quantization)
        object.__setattr__(self, "pipelines", tuple(self.pipelines))
        ids = [p.id for p in self.pipelines]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ConfigError(f"pipelines.id: {dup[0]!r} is used by more than one pipeline; ids must be unique")

    @property
    def work_stream(self) -> str:
        return C.work_stream(self.model.name)

    def pipeline(self, pipeline_id: str) -> PipelineSettings:
        for p in self.pipelines:
            if p.id == pipeline_id:
                return p
        raise ConfigError(
            f"pipeline: {pipeline_id!r} is not in the config; known: "
            f"{', '.join(p.id for p in self.pipelines) or '(none)'}"
        )


_SECTIONS: dict[str, type] = {
    "redis": RedisSettings,
    "model": ModelSettings,
    "limits": LimitSettings,
    "http": HttpSettings,
    "engine": EngineSettings,
}
_TOP_KEYS = (
    "redis",
    "model",
    "limits",
    "http",
    "engine",
    "pipelines",
    "dtype",
    "device",
    "kv_cache_dtype",
    "quantization",
    "kernels",
    "trace_timing",
)


def _build(cls: type, key: str, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{key}: must be a table ([{key}])")
    names = {f.name for f in fields(cls)}
    for k in table:
        if k not in names:
            raise ConfigError(f"{key}.{k}: unknown key; allowed: {', '.join(sorted(names))}")
    try:
        return cls(**table)
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{key}: {e}") from e


def settings_from_dict(data: Mapping[str, Any]) -> Settings:
    """Build Settings from a parsed TOML document (unknown keys are errors)."""
    for k in data:
        if k not in _TOP_KEYS:
            raise ConfigError(f"{k}: unknown key; allowed top-level keys: {', '.join(_TOP_KEYS)}")
    if "model" not in data:
        raise ConfigError("model: missing; set [model] path (or preset) in the config file or pass --model-path")
    kw: dict[str, Any] = {name: _build(cls, name, data[name]) for name, cls in _SECTIONS.items() if name in data}
    pipes = data.get("pipelines", [])
    if not isinstance(pipes, list):
        raise ConfigError("pipelines: must be an array of tables ([[pipelines]])")
    kw["pipelines"] = tuple(_build(PipelineSettings, f"pipelines[{i}]", p) for i, p in enumerate(pipes))
    if "kernels" in data:
        if not isinstance(data["kernels"], dict):
            raise ConfigError("kernels: must be a table ([kernels])")
        kw["kernels"] = KernelConfig.from_dict(data["kernels"])
    for k in ("dtype", "device", "kv_cache_dtype", "quantization", "trace_timing"):
        if k in data:
            kw[k] = data[k]
    return Settings(**kw)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """The settings the environment sets, as dotted keys."""
    merged: dict[str, Any] = {}
    if env.get(REDIS_URL_ENV):
        merged["redis.url"] = env[REDIS_URL_ENV]
    if env.get(TRACE_TIMING_ENV) == "1":
        merged["trace_timing"] = True
    if env.get(API_KEY_ENV):
        merged["http.api_key"] = env[API_KEY_ENV]
    return merged


def load_settings(
    path: str | None = None, *, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Load a deployment: TOML file (optional), then the environment (``HEXGEN_REDIS_URL``, ``HEXGEN_API_KEY``,
    ``HEXGEN_TRACE_TIMING``), then ``overrides``.

    ``overrides`` uses dotted keys (``"redis.url"``, ``"model.path"``, ``"limits.max_queue_depth"``,
    ``"dtype"``); None values are ignored so argparse defaults can be passed straight through.
    """
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"config: cannot read {path!r}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {path!r} is not valid TOML: {e}") from e
    env = os.environ if env is None else env
    merged = _env_overrides(env)
    merged.update({k: v for k, v in (overrides or {}).items() if v is not None})
    model_keys = {"model.path", "model.preset"} & set(merged)
    if model_keys and isinstance(data.get("model"), dict):  # a flag's model source replaces the file's
        data["model"] = {k: v for k, v in data["model"].items() if k not in ("path", "preset", "tokenizer")}
    for dotted, value in merged.items():
        section, _, key = dotted.rpartition(".")
        if section:
            if section not in _SECTIONS:
                raise ConfigError(f"{dotted}: unknown setting")
            data.setdefault(section, {})[key] = value
        else:
            data[key] = value
    return settings_from_dict(data)


def load_redis_url(path: str | None = None, flag: str | None = None, env: Mapping[str, str] | None = None) -> str:
    """Just the Redis URL (for tools like ``hexgen status`` that need no model): flag, env, file, default;
    the file's other ``[redis]`` options (TLS, sentinels, wait) apply to whichever URL wins."""
    env = os.environ if env is None else env
    url = flag or env.get(REDIS_URL_ENV)
    table: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                found = tomllib.load(f).get("redis", {})
        except OSError as e:
            raise ConfigError(f"config: cannot read {path!r}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config: {path!r} is not valid TOML: {e}") from e
        table = dict(found) if isinstance(found, dict) else {}
    if url:
        table["url"] = url
    table.setdefault("url", C.DEFAULT_REDIS_URL)
    return _build(RedisSettings, "redis", table).url


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    """The flags every HexGen process shares: --config, --redis-url, --model, --model-path, --preset, --dtype."""
    g = parser.add_argument_group("deployment")
    g.add_argument("--config", help="deployment TOML file")
    g.add_argument("--redis-url", help=f"Redis URL (overrides ${REDIS_URL_ENV} and the file)")
    g.add_argument("--model", dest="model_name", help="model name (used in stream names)")
    g.add_argument("--model-path", help="Hugging Face model directory")
    g.add_argument("--preset", help=f"model shape preset with random weights: {', '.join(sorted(PRESETS))}")
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model path)")
    g.add_argument("--dtype", help="fp32, fp16 or bf16")


def settings_from_args(
    ns: argparse.Namespace, env: Mapping[str, str] | None = None, extra: Mapping[str, Any] | None = None
) -> Settings:
    """Settings from parsed :func:`add_settings_args` flags (and a program's own dotted ``extra`` overrides)."""
    return load_settings(
        ns.config,
        env=env,
        overrides={
            "redis.url": ns.redis_url,
            "model.name": ns.model_name,
            "model.path": ns.model_path,
            "model.preset": ns.preset,
            "model.tokenizer": ns.tokenizer,
            "dtype": ns.dtype,
            **(extra or {}),
        },
    )


def with_redis_url(settings: Settings, url: str) -> Settings:
    """A copy of ``settings`` pointing at another Redis (tests)."""
    return replace(settings, redis=RedisSettings(url))


def sync_redis(url: str, *, socket_timeout: float | None = None, **kwargs: Any) -> redis.Redis:
    """A redis-py client (sync) for ``url`` (any scheme of :mod:`hexgen.wire.redis_url`, Sentinel
    included); give blocking readers ``socket_timeout`` > their BLOCK."""
    return sync_client(url, socket_timeout=socket_timeout, **kwargs)


def async_redis(url: str, *, socket_timeout: float | None = None, **kwargs: Any) -> redis.asyncio.Redis:
    """A redis.asyncio client for ``url``; give blocking readers ``socket_timeout`` > their BLOCK."""
    return async_client(url, socket_timeout=socket_timeout, **kwargs)
