"""Least-privilege Redis users for a HexGen deployment: one ACL user per role, and the ACL file that holds them.

Three roles, each with the commands and key patterns its code uses and nothing else (``-@all`` first, then
each command by name; keys by pattern, read-only ``%R~`` / write-only ``%W~`` where one direction suffices):

- ``hexgen-head`` — the head and ``hexgen status``: every ``hexgen:*`` key. It reads the requests stream,
  writes work items, dedupe reservations, refusals and dead letters, reads the registry for health, plans
  agents (``--auto-plan``), and is the one role that may ``FUNCTION LOAD`` the HexGen function library.
- ``hexgen-worker`` — worker ranks and agents: the work streams (read, claim, ack), result streams (post,
  resume from what was posted), the cancel stream (read only), dead letters and latency traces (write only),
  its registry keys (workers, heartbeats, pipelines, agents), assignments (read only), the epoch (read only),
  its metrics (``hexgen:metrics:*``: counters, gauges, their index sets), reader keys (read only: it cancels a
  request nobody reads any more).
  No access to ``hexgen:requests`` (the raw prompts), dedupe keys, the plan or the placement lock.
- ``hexgen-client`` — the async client (or redis-cli): ``XADD`` to ``hexgen:requests`` and ``hexgen:cancel``
  (write only: it cannot read other clients' requests), ``XREAD`` of result streams, ``GET hexgen:epoch``
  (read only), ``WAIT``, ``SET``/``DEL`` of its reader keys ``hexgen:reader:*`` (write only).

No role gets ``EVAL``/``EVALSHA``/``SCRIPT``: the atomic steps run as Redis functions of our own library
(:mod:`hexgen.wire.functions`, ``FCALL``), loaded by the head. Commands run inside a function are checked
against the caller's ACL too, so a function cannot do for a worker what the worker may not do itself. No role
gets ``FLUSHALL``/``FLUSHDB``, ``CONFIG``, ``ACL``, ``KEYS``, ``DEBUG``, ``SHUTDOWN``, ``MONITOR``,
``REPLICAOF`` or pub/sub; ``SCAN`` (head, and workers to count the ranks on their host) lists key names but
reads no values. The ``default`` user is
switched off, so every connection must authenticate. The file stores SHA-256 hashes of the passwords
(``#<hex>``), never the passwords; the URLs printed by ``hexgen redis-acl`` carry them.

What a compromised worker can still do: post forged tokens or errors to any result stream, read any result
stream and every work item (tokenized prompts), ack or claim work entries (dropping or stealing requests),
register fake workers or agents and delete others' registrations (pipelines then re-form), forge metrics,
and fill memory
(set ``maxmemory``). It cannot read raw requests, reserve ids, write the plan, load code, run its own Lua,
change ACLs or configuration, or flush the database. A compromised client can submit and cancel requests and
read results (any id: ids are uuid4 by default, so unguessable); nothing else.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from urllib.parse import quote

from hexgen.wire import figures as F
from hexgen.wire import keys as K
from hexgen.wire.prefix_summary import PREFIX_SUMMARY_PREFIX

_CONNECTION = ("ping", "select")
_TRANSACTION = ("multi", "exec", "discard", "watch", "unwatch")


@dataclass(frozen=True)
class Role:
    """One ACL user: its name, the commands it may run, its key patterns (ACL syntax), and why."""

    role: str
    user: str
    commands: tuple[str, ...]
    keys: tuple[str, ...]

    def rules(self, password_sha256: str) -> str:
        """The ACL file line of this user (``user <name> on #<sha256> ...``)."""
        cmds = " ".join(f"+{c}" for c in self.commands)
        return f"user {self.user} on #{password_sha256} resetchannels resetkeys -@all {cmds} {' '.join(self.keys)}"


HEAD = Role(
    "head",
    "hexgen-head",
    (
        *_CONNECTION,
        *_TRANSACTION,
        # requests (group heads), work streams (depth, groups), result/dead-letter/assignment streams
        "xreadgroup",
        "xack",
        "xdel",
        "xautoclaim",
        "xclaim",
        "xpending",
        "xgroup|create",
        "xgroup|delconsumer",
        "xinfo|groups",
        "xinfo|consumers",
        "xinfo|stream",
        "xadd",
        "xlen",
        "xrange",
        "xrevrange",
        "xread",
        # dedupe reservations, epoch, registry (status, health), plan and placement lock
        "set",
        "get",
        "del",
        "exists",
        "expire",
        "pexpire",
        "type",
        "scan",
        "hget",
        "hmget",
        "hgetall",
        "hset",
        # metrics (/metrics, the dashboard): error counters, the index sets of pipelines and stages
        "hincrby",
        "hincrbyfloat",
        "smembers",
        "sadd",
        "srem",
        "fcall",
        "function|load",
        "function|list",
        "wait",
    ),
    (f"~{K.KEY_NAMESPACE}*",),
)

WORKER = Role(
    "worker",
    "hexgen-worker",
    (
        *_CONNECTION,
        *_TRANSACTION,
        "xreadgroup",
        "xack",
        "xdel",
        "xclaim",
        "xautoclaim",
        "xpending",
        "xgroup|create",
        "xadd",
        "xrange",
        "xrevrange",
        "xread",
        "expire",
        "pexpire",
        "set",
        "get",
        "del",
        "exists",
        "hget",
        "hmget",
        "hgetall",
        "hset",
        "hsetnx",
        "hincrby",
        "hincrbyfloat",
        "sadd",
        "fcall",
        "scan",
    ),  # workers/host_threads.py lists the ranks registered on this host (key names only)
    (
        f"~{K.WORK_STREAM_PREFIX}*",
        f"~{K.RESULT_STREAM_PREFIX}*",
        f"%R~{K.CANCEL_STREAM}",
        f"%W~{K.DEADLETTER_STREAM}",
        f"%W~{K.TRACE_STREAM}",
        f"~{K.WORKER_KEY_PREFIX}*",
        f"~{K.HEARTBEAT_KEY_PREFIX}*",
        f"~{K.PIPELINE_KEY_PREFIX}*",
        f"~{K.AGENT_KEY_PREFIX}*",
        f"~{K.AGENT_HEARTBEAT_PREFIX}*",
        f"%R~{K.ASSIGN_STREAM_PREFIX}*",
        f"%R~{K.EPOCH_KEY}",
        f"~{F.METRICS_PREFIX}*",
        f"%R~{K.READER_KEY_PREFIX}*",  # EXISTS: is anyone still reading this request's results
        f"~{PREFIX_SUMMARY_PREFIX}*",  # the pipelines' prefix summaries and hand-over wake-up streams
    ),
)

CLIENT = Role(
    "client",
    "hexgen-client",
    (*_CONNECTION, "xadd", "xread", "get", "wait", "set", "del"),
    (
        f"%W~{K.REQUESTS_STREAM}",
        f"%W~{K.CANCEL_STREAM}",
        f"%R~{K.RESULT_STREAM_PREFIX}*",
        f"%R~{K.EPOCH_KEY}",
        f"%W~{K.READER_KEY_PREFIX}*",  # SET/DEL its reader keys (HexGenClient(reader_ttl_s=...))
    ),
)

ROLES: dict[str, Role] = {r.role: r for r in (HEAD, WORKER, CLIENT)}


def new_passwords() -> dict[str, str]:
    """A fresh random password per role (256 bits, URL-safe: no escaping needed in a Redis URL)."""
    return {role: secrets.token_urlsafe(32) for role in ROLES}


def acl_text(passwords: dict[str, str]) -> str:
    """The ACL file (``aclfile`` / ``ACL LOAD``): ``default`` off, one line per role, hashed passwords."""
    missing = sorted(set(ROLES) - set(passwords))
    if missing:
        raise ValueError(f"passwords: missing for roles {', '.join(missing)}")
    lines = ["user default off resetchannels resetkeys -@all"]
    for role, r in ROLES.items():
        lines.append(r.rules(hashlib.sha256(passwords[role].encode()).hexdigest()))
    return "\n".join(lines) + "\n"


def role_url(base_url: str, role: str, password: str) -> str:
    """``base_url`` with this role's user and password (any credentials in it are replaced).

    Works for ``redis://``, ``rediss://`` and ``redis+sentinel://`` URLs (several hosts); the path and query
    (db, service name, TLS options) are kept.
    """
    if role not in ROLES:
        raise ValueError(f"role: {role!r} is unknown; choose one of {', '.join(ROLES)}")
    scheme, sep, rest = base_url.partition("://")
    if not sep or not rest:
        raise ValueError(f"base url: {base_url!r} is not a URL (e.g. redis://host:6379/0)")
    netloc, slash, tail = rest.partition("/")
    hosts = netloc.rpartition("@")[2]
    user = quote(ROLES[role].user, safe="")
    return f"{scheme}://{user}:{quote(password, safe='')}@{hosts}{slash}{tail}"


def role_urls(base_url: str, passwords: dict[str, str]) -> dict[str, str]:
    """One URL per role."""
    return {role: role_url(base_url, role, passwords[role]) for role in ROLES}
