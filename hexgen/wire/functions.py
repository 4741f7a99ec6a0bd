"""HexGen's Redis function library: the atomic steps (the head's submit, the pipelines' append) as Redis
functions called with ``FCALL``, instead of scripts sent with ``EVAL``/``EVALSHA``.

Why functions. A user allowed ``EVAL`` or ``SCRIPT LOAD`` can run any Lua it writes (a busy loop stalls the
server for everyone); a user allowed only ``FCALL`` can run only the functions loaded, with arguments of its
choosing, and every command a function runs is still checked against that user's ACL. The library is loaded
once, by the head (the only role with ``FUNCTION LOAD``, see :mod:`hexgen.wire.acl`); Redis keeps it in the
RDB/AOF and replicates it, so it survives restarts and failovers. The library and function names carry a
hash of the code (``hexgen_<hash>``, ``hexgen_append_<hash>``), so heads of two versions load two libraries
side by side instead of replacing each other's.

Callers: :class:`SyncFunction` (worker ranks) and :class:`AsyncFunction` (the head). When a function is
missing (a new or wiped Redis, or the head not started yet) the caller loads the library itself if its user
may; a worker under the ``hexgen-worker`` user may not, and gets :class:`LibraryMissing`, which every retry
loop treats like a Redis outage until the head has loaded it. Against a Redis without functions (before 7.0)
the same code runs through ``EVALSHA`` instead.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Any

import redis
from redis.exceptions import NoPermissionError, ResponseError

log = logging.getLogger(__name__)

# ---- the functions' bodies (Lua; KEYS and ARGV as for EVAL) ------------------------------------------------

# Result-stream append (workers/sink.py). KEYS[1] = work stream, KEYS[2..] = one result stream per event.
# ARGV = group, ttl, then per event: position, entry id to ack ("" = none), n field pairs, fields...
# Returns per event: 1 appended, 2 already there (a retry), 0 refused (another writer holds the request).
# The ack is a pcall: a work stream whose group vanished (a wiped Redis) must not abort the events' append.
# An acked entry is deleted too (XDEL): nothing reads it again, and the stream would keep every request.
APPEND = """
local unpack = unpack or table.unpack
local out, refused = {}, {}
local a = 3
for i = 2, #KEYS do
  local key = KEYS[i]
  local pos, entry, n = tonumber(ARGV[a]), ARGV[a + 1], tonumber(ARGV[a + 2])
  local fields = {}
  for j = 1, 2 * n do fields[j] = ARGV[a + 2 + j] end
  a = a + 3 + 2 * n
  local id = (pos + 1) .. '-0'
  local status = 0
  if not refused[key] then
    local here = redis.call('XRANGE', key, id, id)
    if #here > 0 then
      local same = #here[1][2] == #fields
      for j = 1, #fields do same = same and here[1][2][j] == fields[j] end
      if same then status = 2 end
    else
      local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
      local top_id = (#top > 0) and top[1][1] or nil
      if (pos == 0 and top_id == nil) or top_id == (pos .. '-0') then
        redis.call('XADD', key, id, unpack(fields))
        status = 1
      end
    end
  end
  if status == 0 then
    refused[key] = true
  else
    redis.call('EXPIRE', key, ARGV[2])
    if entry ~= '' then
      redis.pcall('XACK', KEYS[1], ARGV[1], entry)
      redis.call('XDEL', KEYS[1], entry)
    end
  end
  out[#out + 1] = status
end
return out
"""

# The head's submit (hexgen/head/submit.py). KEYS: dedupe key, work stream, requests stream.
# ARGV: entry id, dedupe TTL (s), pipelines group, heads group, max queue depth, then the work item's field
# pairs. Returns {status, owner entry id, depth}; status 1 queued, 0 duplicate (acked), 2 overloaded.
# Acked request entries are deleted (XDEL), as in the head's other paths.
SUBMIT = """
local unpack = unpack or table.unpack
local entry = ARGV[1]
redis.call('SET', KEYS[1], entry, 'NX', 'EX', ARGV[2])
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= entry then
  redis.call('XACK', KEYS[3], ARGV[4], entry)
  redis.call('XDEL', KEYS[3], entry)
  return {0, owner, 0}
end
local depth = 0
if redis.call('EXISTS', KEYS[2]) == 1 then
  local length = redis.call('XLEN', KEYS[2])
  depth = length
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == ARGV[3] then
      local pending = tonumber(info['pending']) or 0
      local lag = tonumber(info['lag'])
      if lag then depth = pending + lag else depth = pending + math.max(0, length - pending) end
    end
  end
end
if depth >= tonumber(ARGV[5]) then
  return {2, entry, depth}
end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 6))
redis.call('XACK', KEYS[3], ARGV[4], entry)
redis.call('XDEL', KEYS[3], entry)
return {1, entry, depth}
"""

BODIES = {"append": APPEND, "submit": SUBMIT}
VERSION = hashlib.sha1("\0".join(f"{k}\0{v}" for k, v in sorted(BODIES.items())).encode()).hexdigest()[:12]
LIBRARY_NAME = f"hexgen_{VERSION}"


def function_name(name: str) -> str:
    """The registered name of one function of this library version (``hexgen_<name>_<version>``)."""
    if name not in BODIES:
        raise ValueError(f"function: {name!r} is unknown; choose one of {', '.join(BODIES)}")
    return f"hexgen_{name}_{VERSION}"


def library_code() -> str:
    """The library's source as ``FUNCTION LOAD`` takes it."""
    parts = [f"#!lua name={LIBRARY_NAME}"]
    for name, body in BODIES.items():
        parts.append(f"redis.register_function('{function_name(name)}', function(KEYS, ARGV)\n{body}\nend)")
    return "\n".join(parts) + "\n"


class LibraryMissing(redis.ConnectionError):
    """The function library is not loaded in this Redis and this user may not load it (the head loads it).

    A ``ConnectionError`` on purpose: every retry loop treats it like an outage (backoff, try again) until
    the head, at start-up or when it notices a new empty Redis, has loaded the library.
    """


def _already_loaded(e: ResponseError) -> bool:
    return "already exists" in str(e)


def _no_functions(e: ResponseError) -> bool:
    """Redis before 7.0 (or a stand-in) knows neither FCALL nor FUNCTION."""
    msg = str(e).lower()
    return "unknown command" in msg and ("fcall" in msg or "function" in msg)


def load_library(client: redis.Redis) -> bool:
    """``FUNCTION LOAD`` this library version (no-op when present). False when Redis has no functions.

    Raises :class:`redis.exceptions.NoPermissionError` when the user may not load functions.
    """
    try:
        client.function_load(library_code())
    except NoPermissionError:
        raise
    except ResponseError as e:
        if _already_loaded(e):
            return True
        if _no_functions(e):
            return False
        raise
    log.info("loaded Redis function library %s", LIBRARY_NAME)
    return True


async def aload_library(client: Any) -> bool:
    """:func:`load_library` on a redis.asyncio client."""
    try:
        await client.function_load(library_code())
    except NoPermissionError:
        raise
    except ResponseError as e:
        if _already_loaded(e):
            return True
        if _no_functions(e):
            return False
        raise
    log.info("loaded Redis function library %s", LIBRARY_NAME)
    return True


def _missing(e: ResponseError) -> bool:
    return "function not found" in str(e).lower()


class SyncFunction:
    """One library function on a synchronous client: ``fn(keys, args)`` is one round trip."""

    def __init__(self, client: redis.Redis, name: str) -> None:
        self.client = client
        self.name = function_name(name)
        self.body = BODIES[name]
        self._script: Any = None  # set when Redis has no functions: EVALSHA the same body
        self._warned = False

    def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if self._script is not None:
            return self._script(keys=list(keys), args=list(args))
        try:
            return self.client.fcall(self.name, len(keys), *keys, *args)
        except ResponseError as e:
            if _no_functions(e):
                self._script = self.client.register_script(self.body)
                return self._script(keys=list(keys), args=list(args))
            if not _missing(e):
                raise
        self._load()
        return self.client.fcall(self.name, len(keys), *keys, *args)

    def _load(self) -> None:
        try:
            load_library(self.client)
        except NoPermissionError as e:
            if not self._warned:
                log.warning(
                    "Redis function %s is not loaded and this user may not load it: waiting for the "
                    "head to load library %s",
                    self.name,
                    LIBRARY_NAME,
                )
                self._warned = True
            raise LibraryMissing(f"Redis function library {LIBRARY_NAME} is not loaded (the head loads it)") from e


class AsyncFunction:
    """One library function on a redis.asyncio client (the head): loads the library when it is missing."""

    def __init__(self, client: Any, name: str) -> None:
        self.client = client
        self.name = function_name(name)
        self.body = BODIES[name]
        self._script: Any = None

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if self._script is not None:
            return await self._script(keys=list(keys), args=list(args))
        try:
            return await self.client.fcall(self.name, len(keys), *keys, *args)
        except ResponseError as e:
            if _no_functions(e):
                self._script = self.client.register_script(self.body)
                return await self._script(keys=list(keys), args=list(args))
            if not _missing(e):
                raise
        try:
            await aload_library(self.client)
        except NoPermissionError as e:
            raise LibraryMissing(
                f"Redis function library {LIBRARY_NAME} is not loaded and this user may not load it"
            ) from e
        return await self.client.fcall(self.name, len(keys), *keys, *args)
