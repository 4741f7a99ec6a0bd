"""Placement agents in Redis: registration, heartbeat and assignments (agent side), live agents and the plan
(head side).

An agent (``bin/worker`` without ``--stage``) registers ``hexgen:agent:<id>`` (:class:`AgentRecord`) with a
fresh instance token, refreshes ``hexgen:agent-hb:<id>`` (TTL ``limits.heartbeat_ttl_s``) from a daemon
thread, and blocks with XREAD on ``hexgen:assign:<id>`` for entries addressed to its own instance. The
planning head publishes ``hexgen:plan`` and one assignment per live agent in one MULTI.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import redis

from hexgen.serving import constants as C
from hexgen.serving.agent_protocol import AgentRecord, Assignment, PlanRecord
from hexgen.serving.protocol import ProtocolError

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def _s(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


# ---- agent side (sync redis-py) ---------------------------------------------------------------------------

class AgentRegistry:
    """One agent's registry operations on a synchronous client."""

    def __init__(self, client: redis.Redis, record: AgentRecord, heartbeat_ttl_s: int) -> None:
        self.r = client
        self.record = record
        self.heartbeat_ttl_s = heartbeat_ttl_s

    def register(self) -> None:
        """Write the record (replacing an older instance's) and the first heartbeat."""
        aid = self.record.id
        with self.r.pipeline(transaction=True) as p:
            p.delete(C.agent_key(aid))
            p.hset(C.agent_key(aid), mapping=self.record.to_fields())
            p.set(C.agent_heartbeat_key(aid), f"{time.time():.3f}", ex=self.heartbeat_ttl_s)
            p.execute()
        log.info("registered agent %s (instance %s): %d x %s, %.1f GiB each", aid, self.record.instance,
                 self.record.count, self.record.device_type, self.record.memory / 2**30)

    def beat(self) -> bool:
        """Refresh the heartbeat and the record; False when another instance has taken this agent id."""
        aid = self.record.id
        current = self.r.hget(C.agent_key(aid), "instance")
        if current is not None and _s(current) != self.record.instance:
            return False
        with self.r.pipeline(transaction=False) as p:
            p.set(C.agent_heartbeat_key(aid), f"{time.time():.3f}", ex=self.heartbeat_ttl_s)
            p.hset(C.agent_key(aid), mapping=self.record.to_fields())
            p.execute()
        return True

    def deregister(self) -> None:
        """Remove the record and heartbeat unless a newer instance replaced them (the head re-plans at once)."""
        aid = self.record.id
        current = self.r.hget(C.agent_key(aid), "instance")
        if current is not None and _s(current) != self.record.instance:
            return
        self.r.delete(C.agent_key(aid), C.agent_heartbeat_key(aid))
        log.info("deregistered agent %s", aid)

    def last_entry_id(self) -> str:
        """Id of the newest entry of this agent's assignment stream ("0-0" if none): read after it."""
        rows = self.r.xrevrange(C.assign_stream(self.record.id), count=1)
        return _s(rows[0][0]) if rows else "0-0"

    def next_assignment(self, reader: redis.Redis, after: str, block_ms: int) -> tuple[str, Assignment | None]:
        """Block up to ``block_ms`` for assignments after entry ``after``; returns (last entry id read, the
        newest assignment addressed to this instance or None). ``reader`` is a connection of its own whose
        socket timeout exceeds the BLOCK."""
        res = reader.xread({C.assign_stream(self.record.id): after}, block=block_ms, count=C.ASSIGN_STREAM_MAXLEN)
        found = None
        for _stream, entries in res or []:
            for eid, fields in entries:
                after = _s(eid)
                try:
                    a = Assignment.from_fields(fields)
                except ProtocolError as e:
                    log.error("agent %s: ignoring malformed assignment %s: %s", self.record.id, after, e)
                    continue
                if a.instance == self.record.instance:
                    found = a
        return after, found


class AgentHeartbeat(threading.Thread):
    """Daemon thread: beat every ``interval_s``; call ``on_replaced`` once if another instance took the id."""

    def __init__(self, registry: AgentRegistry, interval_s: float, on_replaced: Callable[[], Any]) -> None:
        super().__init__(name=f"agent-heartbeat-{registry.record.id}", daemon=True)
        self.registry = registry
        self.interval_s = interval_s
        self.on_replaced = on_replaced
        self._halt = threading.Event()
        self._last_error = 0.0

    def stop(self, timeout_s: float = 5.0) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout_s)

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                ok = self.registry.beat()
            except REDIS_ERRORS as e:
                if time.monotonic() - self._last_error > 10:
                    log.warning("agent heartbeat: Redis unreachable (%s); retrying every %.1fs", e,
                                self.interval_s)
                    self._last_error = time.monotonic()
                continue
            if not ok:
                log.error("agent %s: another instance registered with this id; stopping",
                          self.registry.record.id)
                self.on_replaced()
                return


# ---- head side (redis.asyncio or fakeredis) ---------------------------------------------------------------

async def read_agents(r: Any) -> list[tuple[AgentRecord, bool]]:
    """Every registered agent (sorted by id) and whether its heartbeat is alive; malformed records skipped."""
    keys = sorted({_s(k) async for k in r.scan_iter(match=C.AGENT_KEY_PATTERN, count=500)})
    if not keys:
        return []
    ids = [k[len(C.AGENT_KEY_PREFIX):] for k in keys]
    async with r.pipeline(transaction=False) as p:
        for aid in ids:
            p.hgetall(C.agent_key(aid))
            p.exists(C.agent_heartbeat_key(aid))
        replies = await p.execute(raise_on_error=False)
    out = []
    for i, aid in enumerate(ids):
        fields, alive = replies[2 * i], replies[2 * i + 1]
        if isinstance(fields, Exception) or not fields:
            continue
        try:
            rec = AgentRecord.from_fields(fields)
        except ProtocolError as e:
            log.warning("skipping malformed agent record %s: %s", aid, e)
            continue
        out.append((rec, alive is True or (isinstance(alive, int) and alive > 0)))
    return out


async def live_agents(r: Any) -> list[AgentRecord]:
    """Agents with a live heartbeat, sorted by id."""
    return [rec for rec, alive in await read_agents(r) if alive]


async def forget_agents(r: Any, agent_ids: list[str]) -> None:
    """Delete the records of dead agents (an agent that was only cut off re-writes its record on its next beat)."""
    if agent_ids:
        await r.delete(*(C.agent_key(a) for a in agent_ids))


async def read_plan(r: Any) -> PlanRecord | None:
    """The deployed plan, or None before the first."""
    fields = await r.hgetall(C.PLAN_KEY)
    if not fields:
        return None
    try:
        return PlanRecord.from_fields(fields)
    except ProtocolError as e:
        log.warning("ignoring malformed %s: %s", C.PLAN_KEY, e)
        return None


async def publish_plan(r: Any, plan: PlanRecord, assignments: list[Assignment]) -> None:
    """Write the plan and every agent's assignment in one MULTI."""
    async with r.pipeline(transaction=True) as p:
        p.delete(C.PLAN_KEY)
        p.hset(C.PLAN_KEY, mapping=plan.to_fields())
        for a in assignments:
            p.xadd(C.assign_stream(a.agent), a.to_fields(), maxlen=C.ASSIGN_STREAM_MAXLEN, approximate=True)
        await p.execute()


async def record_plan_error(r: Any, error: str) -> None:
    """Note why the last attempt to plan failed (the deployed plan stays as it is)."""
    await r.hset(C.PLAN_KEY, mapping={"error": error, "error_at": f"{time.time():.3f}"})


# ---- status -------------------------------------------------------------------------------------------------

async def placement_status(r: Any) -> dict[str, Any]:
    """Agents (with liveness and their newest assignment) and the deployed plan, for ``hexgen status``."""
    agents = []
    for rec, alive in await read_agents(r):
        rows = await r.xrevrange(C.assign_stream(rec.id), count=1)
        summary, generation = "-", None
        if rows:
            try:
                a = Assignment.from_fields(rows[0][1])
            except ProtocolError:
                a = None
            if a is not None and a.instance == rec.instance:
                summary, generation = a.to_fields()["summary"], a.generation
        agents.append({**rec.to_fields(), "alive": alive, "assignment": summary, "generation": generation})
    plan = await read_plan(r)
    return {"agents": agents, "plan": None if plan is None else plan.to_fields()}


def format_placement(status: dict[str, Any]) -> str:
    """AGENTS and PLAN sections (empty string when no agent registered and no plan exists)."""
    if not status["agents"] and status["plan"] is None:
        return ""
    lines = ["AGENTS"]
    for a in status["agents"] or []:
        lines.append(f"  {a['id']}  {a['count']} x {a['device_type']} ({int(a['memory']) / 2**30:.1f}GiB) on "
                     f"{a['host']}  {'alive' if a['alive'] else 'dead'}  gen {a['generation'] or '-'}: "
                     f"{a['assignment']}")
    if not status["agents"]:
        lines.append("  (none)")
    plan = status["plan"]
    lines += ["", "PLAN"]
    if plan is None:
        lines.append("  (none)")
    else:
        lines.append(f"  generation {plan['generation']}, planned by {plan['leader'] or '-'}")
        lines += ["  " + x for x in plan["table"].splitlines()]
        if plan.get("error"):
            lines.append(f"  last attempt failed: {plan['error']}")
    return "\n".join(lines)
