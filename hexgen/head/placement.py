"""Automatic placement, the head's side: which head plans, when to re-plan, and the records in Redis.

:class:`PlacementLoop` (run by ``bin/head --auto-plan``) watches the agents and re-plans: one head at a time
holds ``hexgen:placement:leader`` (SET NX PX, renewed under WATCH); when the set of live agents (id and
instance) differs from the one the deployed plan was made for and has not changed for the settle period, it
asks its :class:`Placer` (:class:`hexgen.planner.placement.Placer`, handed in by the CLI, so the head never
imports the search) for a plan and publishes ``hexgen:plan`` with generation + 1 and every agent's assignment
in one MULTI. The functions below read and write those records (``redis.asyncio`` or fakeredis), and
:func:`placement_status` / :func:`format_placement` show them in ``hexgen status``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Protocol

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hexgen.errors import HexGenError
from hexgen.wire import keys as C
from hexgen.wire.placement import (
    AgentRecord,
    Assignment,
    PlanRecord,
    agent_instances,
    agents_by_model,
    plan_summary,
)
from hexgen.wire.protocol import ProtocolError
from hexgen.wire.settings import Settings
from hexgen.wire.text import as_text

log = logging.getLogger(__name__)


async def read_agents(r: Any) -> list[tuple[AgentRecord, bool]]:
    """Every registered agent (sorted by id) and whether its heartbeat is alive; malformed records skipped."""
    keys = sorted({as_text(k) async for k in r.scan_iter(match=C.AGENT_KEY_PATTERN, count=500)})
    if not keys:
        return []
    ids = [k[len(C.AGENT_KEY_PREFIX) :] for k in keys]
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
        lines.append(
            f"  {a['id']}  {a['count']} x {a['device_type']} ({int(a['memory']) / 2**30:.1f}GiB) on "
            f"{a['host']}  {'alive' if a['alive'] else 'dead'}  gen {a['generation'] or '-'}: "
            f"{a['assignment']}"
        )
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


class Placer(Protocol):
    """What plans for the loop (:class:`hexgen.planner.placement.Placer`): the search and the assignments."""

    options: Any  # PlacementOptions: settle(), time_budget_s, slo_latency_s, prompt_len, output_len

    def plan(self, agents: list[AgentRecord]) -> Any: ...

    def assignments(
        self,
        plan: Any,
        agents: list[AgentRecord],
        generation: int,
        deployed: PlanRecord | None,
        *,
        leader: str,
        now: float,
    ) -> tuple[PlanRecord, list[Assignment]]: ...


class PlacementLoop:
    """The planning side of one head: leader election, agent watching, re-planning (see the module doc)."""

    def __init__(self, settings: Settings, placer: Placer, *, redis: Any, consumer: str) -> None:
        self.settings = settings
        self.placer = placer
        self.options = options = placer.options
        self.redis = redis
        self.consumer = consumer
        self.interval_s = settings.limits.heartbeat_interval_s
        self.settle_s = options.settle(self.interval_s)
        # the lock outlives a search (the loop does not renew it while plan_cluster runs)
        self.lock_ms = int((settings.limits.heartbeat_ttl_s + options.time_budget_s) * 1000)
        self.leader = False
        self._seen: dict[str, str] | None = None  # live agents at the last look
        self._changed_at = 0.0
        self._failed: dict[str, str] | None = None  # agent set of the last failed attempt
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Step every heartbeat interval until ``stop()``; give up leadership on the way out."""
        log.info(
            "placement: auto-plan on (settle %.1fs, SLO %gs, workload %d+%d tokens)",
            self.settle_s,
            self.options.slo_latency_s,
            self.options.prompt_len,
            self.options.output_len,
        )
        try:
            while not self._stopping.is_set():
                try:
                    await self.step()
                except (RedisConnectionError, RedisTimeoutError, ResponseError) as e:
                    log.warning("placement: Redis error (%s); retrying", e)
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.interval_s)
                except TimeoutError:
                    pass
        finally:
            if self.leader:
                await asyncio.shield(self._release())

    async def lead(self) -> bool:
        """Take or renew the placement lock; True while this head is the one that plans."""
        r, key = self.redis, C.PLACEMENT_LEADER_KEY
        ok = bool(await r.set(key, self.consumer, nx=True, px=self.lock_ms))
        if not ok:
            async with r.pipeline(transaction=True) as p:
                try:
                    await p.watch(key)
                    owner = await p.get(key)
                    if owner is not None and as_text(owner) == self.consumer:
                        p.multi()
                        p.pexpire(key, self.lock_ms)
                        await p.execute()
                        ok = True
                except WatchError:
                    ok = False
        if ok != self.leader:
            log.info("placement: %s the planning head", "became" if ok else "is no longer")
            self._seen = None
        self.leader = ok
        return ok

    async def _release(self) -> None:
        try:
            if as_text(await self.redis.get(C.PLACEMENT_LEADER_KEY) or b"") == self.consumer:
                await self.redis.delete(C.PLACEMENT_LEADER_KEY)
        except RedisError as e:  # best effort on the way out; the lock expires anyway
            log.debug("placement: could not release the lock: %s", e)
        self.leader = False

    async def step(self, now: float | None = None) -> PlanRecord | None:
        """One look: returns the plan published by this step, or None."""
        now = time.monotonic() if now is None else now
        if not await self.lead():
            return None
        everyone = await read_agents(self.redis)
        mine = agents_by_model([a for a, _ in everyone], self.settings.model.name)
        live = [a for a, alive in everyone if alive and a in mine]
        current = agent_instances(live)
        if current != self._seen:
            if self._seen is not None:
                joined = sorted(set(current) - set(self._seen))
                left = sorted(set(self._seen) - set(current))
                log.info(
                    "placement: agents changed (joined %s, left %s); re-planning once stable for %.1fs",
                    joined or "-",
                    left or "-",
                    self.settle_s,
                )
            self._seen, self._changed_at = current, now
        deployed = await read_plan(self.redis)
        if (deployed is not None and deployed.agents == current) or current == self._failed:
            return None
        if deployed is None and not current:
            return None
        if now - self._changed_at < self.settle_s:
            return None
        await forget_agents(self.redis, [a.id for a, alive in everyone if not alive])
        return await self.replan(live, deployed)

    async def replan(self, agents: list[AgentRecord], deployed: PlanRecord | None) -> PlanRecord | None:
        """Plan for ``agents`` and publish; on failure log why, note it in the plan hash and keep serving."""
        generation = (deployed.generation if deployed else 0) + 1
        current = agent_instances(agents)
        try:
            plan = await asyncio.to_thread(self.placer.plan, agents) if agents else None
        except HexGenError as e:  # PlannerError (nothing fits) or ConfigError (a bad agent record)
            self._failed = current
            msg = f"no plan for agents {sorted(current)}: {e}"
            log.error(
                "placement: %s; keeping the deployed plan (generation %d)", msg, deployed.generation if deployed else 0
            )
            await record_plan_error(self.redis, msg)
            return None
        record, assignments = self.placer.assignments(
            plan, agents, generation, deployed, leader=self.consumer, now=time.time()
        )
        await publish_plan(self.redis, record, assignments)
        self._failed = None
        log.info("placement: published %s\n%s", plan_summary(record), record.table)
        return record
