"""Every Redis stream, group and key name HexGen uses, and the serving defaults.

The names are the public wire interface (README, "Serving through Redis"); redis-cli users and other
processes rely on them.
Declarative only: no Redis calls and no msgpack here.

Cancellation from redis-cli::

    redis-cli XADD hexgen:cancel '*' id <request id>

Every pipeline's stage-0 leader reads ``hexgen:cancel`` with a plain XREAD (no group: every pipeline must
see every cancel) starting at ``$`` when it starts; the pipeline that holds the request finishes it with
``event done finish_reason cancelled``. The stream is trimmed to about ``CANCEL_STREAM_MAXLEN`` entries.
"""

from __future__ import annotations

# ---- streams and groups ----------------------------------------------------------------------------------
REQUESTS_STREAM = "hexgen:requests"  # clients XADD raw requests here (flat string fields)
HEADS_GROUP = "heads"  # consumer group of the heads on REQUESTS_STREAM
WORK_STREAM_PREFIX = "hexgen:work:"  # + model name: validated, tokenized work items (msgpack)
PIPELINES_GROUP = "pipelines"  # consumer group of the pipelines on each work stream; one consumer per pipeline
RESULT_STREAM_PREFIX = "hexgen:result:"  # + request id: token / done / error events
CANCEL_STREAM = "hexgen:cancel"  # XADD hexgen:cancel '*' id <request id>; read with plain XREAD
CANCEL_ID_FIELD = "id"
DEADLETTER_STREAM = "hexgen:deadletter"  # entries that kept failing, with the reason
TRACE_STREAM = "hexgen:trace"  # first-token latency stamps, only with HEXGEN_TRACE_TIMING=1 (hexgen.wire.trace)
TRACE_STREAM_MAXLEN = 10000

# ---- keys ------------------------------------------------------------------------------------------------
WORKER_KEY_PREFIX = "hexgen:worker:"  # + worker id: hash (WORKER_FIELDS)
HEARTBEAT_KEY_PREFIX = "hexgen:hb:"  # + worker id: SET value EX HEARTBEAT_TTL_S every HEARTBEAT_INTERVAL_S;
# value: time.time() of the beat as a decimal string (status shows its age)
PIPELINE_KEY_PREFIX = "hexgen:pipeline:"  # + pipeline id: hash (PIPELINE_FIELDS)
KEY_NAMESPACE = "hexgen:"  # every key and stream below starts with it (the head's ACL key pattern)
EPOCH_KEY = "hexgen:epoch"  # random token the head sets (NX) in a Redis that lacks it: a changed or missing
# epoch tells clients and the head that Redis lost its data (a new, empty server)
DEDUPE_KEY_PREFIX = "hexgen:dedupe:"  # + request id: SET NX EX by the head; value = request entry id
WORKER_KEY_PATTERN = WORKER_KEY_PREFIX + "*"  # readers list workers with SCAN MATCH (no index set)
PIPELINE_KEY_PATTERN = PIPELINE_KEY_PREFIX + "*"

# Automatic placement (bin/worker without --stage = an agent; bin/head --auto-plan assigns stages).
AGENT_KEY_PREFIX = "hexgen:agent:"  # + agent id: hash of plain strings (AgentRecord)
AGENT_KEY_PATTERN = AGENT_KEY_PREFIX + "*"
AGENT_HEARTBEAT_PREFIX = "hexgen:agent-hb:"  # + agent id: SET time EX heartbeat_ttl_s
ASSIGN_STREAM_PREFIX = "hexgen:assign:"  # + agent id: stream of assignments (flat string fields)
ASSIGN_STREAM_MAXLEN = 16
PLAN_KEY = "hexgen:plan"  # hash: the deployed plan (generation, agents, pipelines, table)
PLACEMENT_LEADER_KEY = "hexgen:placement:leader"  # SET <head consumer> NX PX: the one head that plans
AUTO_PIPELINE_PREFIX = "auto-"  # + g<plan generation>-r<replica>: ids of planned pipelines

# Registry record fields (hash fields, values are plain strings so redis-cli HGETALL stays readable).
WORKER_FIELDS = ("pipeline", "stage", "tp_rank", "host", "device", "memory", "pid", "version", "model")
PIPELINE_FIELDS = ("state", "layout", "rendezvous")
PIPELINE_STATES = ("forming", "ready", "degraded", "stopped")

# ---- consumer names --------------------------------------------------------------------------------------
HEAD_CONSUMER_PREFIX = "head-"  # + host-pid
PIPELINE_CONSUMER_PREFIX = "pipeline-"  # + pipeline id

# ---- defaults (seconds unless named otherwise) -----------------------------------------------------------
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
DEFAULT_MODEL = "smollm2-135m-instruct"
HEARTBEAT_INTERVAL_S = 2.0  # how often a worker refreshes its heartbeat key
HEARTBEAT_TTL_S = 10  # heartbeat key TTL: a worker is dead after this long without a refresh
RESULT_TTL_S = 3600  # result streams expire this long after done/error (EXPIRE)
DEDUPE_TTL_S = 86400  # how long a request id stays reserved against duplicates
LEASE_S = 30.0  # pending work older than this (ms idle = LEASE_S*1000) may be XAUTOCLAIMed
MAX_DELIVERIES = 3  # deliveries after which an entry goes to the dead-letter stream
BLOCK_MS = 5000  # XREAD/XREADGROUP BLOCK; the socket timeout must exceed it
SOCKET_TIMEOUT_MARGIN_S = 5.0  # socket timeout = BLOCK_MS/1000 + this margin
MAX_QUEUE_DEPTH = 1024  # head refuses with `overloaded` when work stream queued+pending exceeds this
MAX_NEW_TOKENS_CAP = 4096  # largest max_new_tokens a request may ask for
DEFAULT_MAX_NEW_TOKENS = 64  # when the request omits max_new_tokens
REQUEST_DEADLINE_S = 600.0  # a request not finished this long after the head queued it ends with an error
MAX_REQUEST_DEADLINE_S = 3600.0  # the longest deadline_s a request may ask for (≤ RESULT_TTL_S)
CANCEL_STREAM_MAXLEN = 10000  # approximate MAXLEN of CANCEL_STREAM
RESULT_STREAM_MAXLEN = 100000  # approximate MAXLEN of one result stream
DEADLETTER_MAXLEN = 10000

# ---- payload caps (bytes) --------------------------------------------------------------------------------
MAX_FIELD_BYTES = 1 << 20  # any single request field (prompt, messages)
MAX_SMALL_FIELD_BYTES = 256  # numeric and short fields (max_new_tokens, temperature, model, ...)
MAX_STOP_BYTES = 4096  # `stop` (string or JSON list)
MAX_STOP_STRINGS = 16
MAX_MESSAGES = 1024
MAX_REQUEST_BYTES = 2 << 20  # sum over all fields of one request entry
MAX_ID_LENGTH = 128
ID_ALLOWED_CHARS = "A-Z a-z 0-9 _ - . : (1-128 characters)"  # as told in error messages
ID_PATTERN = r"[A-Za-z0-9_.:\-]{1,128}"


def work_stream(model: str) -> str:
    """Work stream of one model: ``hexgen:work:<model>``."""
    return f"{WORK_STREAM_PREFIX}{model}"


READER_KEY_PREFIX = "hexgen:reader:"


def reader_key(request_id: str) -> str:
    """Set (with a TTL) by a client while it reads the request's result stream; a pipeline cancels a request
    whose reader key has expired (docs/reliability.md: orphaned streams)."""
    return f"{READER_KEY_PREFIX}{request_id}"


def result_stream(request_id: str) -> str:
    """Result stream of one request: ``hexgen:result:<id>``."""
    return f"{RESULT_STREAM_PREFIX}{request_id}"


def worker_key(worker_id: str) -> str:
    """Registry hash of one worker rank: ``hexgen:worker:<id>``."""
    return f"{WORKER_KEY_PREFIX}{worker_id}"


def heartbeat_key(worker_id: str) -> str:
    """Heartbeat key of one worker rank (string with a TTL): ``hexgen:hb:<id>``."""
    return f"{HEARTBEAT_KEY_PREFIX}{worker_id}"


def pipeline_key(pipeline_id: str) -> str:
    """Registry hash of one pipeline: ``hexgen:pipeline:<pid>``."""
    return f"{PIPELINE_KEY_PREFIX}{pipeline_id}"


def agent_key(agent_id: str) -> str:
    """Registry hash of one placement agent: ``hexgen:agent:<id>``."""
    return f"{AGENT_KEY_PREFIX}{agent_id}"


def agent_heartbeat_key(agent_id: str) -> str:
    """Heartbeat key of one placement agent (string with a TTL): ``hexgen:agent-hb:<id>``."""
    return f"{AGENT_HEARTBEAT_PREFIX}{agent_id}"


def assign_stream(agent_id: str) -> str:
    """Assignment stream of one placement agent: ``hexgen:assign:<id>``."""
    return f"{ASSIGN_STREAM_PREFIX}{agent_id}"


def dedupe_key(request_id: str) -> str:
    """Dedupe reservation of one request id: ``hexgen:dedupe:<id>``."""
    return f"{DEDUPE_KEY_PREFIX}{request_id}"


def socket_timeout_for(block_ms: int) -> float:
    """Socket timeout for a connection that blocks ``block_ms``: always longer than the BLOCK."""
    return block_ms / 1000.0 + SOCKET_TIMEOUT_MARGIN_S
