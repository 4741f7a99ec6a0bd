"""Automatic placement: registered agents -> a Cluster -> ``plan_cluster`` -> one assignment per agent.

Pure functions (tested without Redis):

- :func:`gpu_type_name` maps a CUDA device name (``torch.cuda.get_device_name``) to a built-in spec name;
- :func:`cluster_from_agents` makes one :class:`~hexgen.planner.cluster.Node` per agent (named by the agent
  id, its device spec with the memory the agent reported, the default intra-node link of that device);
- :func:`assign` turns a :class:`~hexgen.planner.search.Plan` into the plan record and per-agent assignments.
  A replica whose stages are exactly those of a pipeline of the previous plan (same agents, devices, TP
  degrees and layers) keeps that pipeline's id, so its agents keep running it through a re-plan; every other
  replica gets a new id ``auto-g<generation>-r<replica>``.

:class:`PlacementLoop` (run by ``bin/head --auto-plan``) watches the agents and re-plans: one head at a time
holds ``hexgen:placement:leader`` (SET NX PX, renewed under WATCH); when the set of live agents (id and
instance) differs from the one the deployed plan was made for and has not changed for the settle period, it
plans again and publishes ``hexgen:plan`` with generation + 1 and every agent's assignment in one MULTI.
"""
from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hexgen.config import ModelConfig, preset
from hexgen.errors import ConfigError, HexGenError
from hexgen.planner.cluster import DEFAULT_INTER, Cluster, Link, Node, default_intra
from hexgen.planner.devices import device_spec
from hexgen.serving import constants as C
from hexgen.serving.agent_protocol import AgentRecord, Assignment, PlanRecord, Role
from hexgen.serving.agents import forget_agents, publish_plan, read_agents, read_plan, record_plan_error
from hexgen.serving.settings import Settings

log = logging.getLogger(__name__)

CPU_DEVICE = "CPU"
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class PlacementOptions:
    """What ``bin/head --auto-plan`` plans for, and how patiently it re-plans.

    ``settle_s`` 0 means twice the heartbeat interval: the set of live agents must stay unchanged that long
    before a re-plan. ``network_gbps`` 0 means the planner's default network between nodes.
    """

    slo_latency_s: float = 30.0
    prompt_len: int = 512
    output_len: int = 128
    settle_s: float = 0.0
    time_budget_s: float = 10.0
    seed: int = 0
    network_gbps: float = 0.0
    max_num_seqs: int = 64  # requests in flight per pipeline the agents' workers run (their --max-num-seqs)

    def __post_init__(self) -> None:
        for name in ("slo_latency_s", "settle_s", "network_gbps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ConfigError(f"placement {name}: {v!r} must be a finite number ≥ 0")
        for name in ("prompt_len", "output_len", "max_num_seqs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"placement {name}: {v!r} must be an integer ≥ 1")
        t = self.time_budget_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < math.inf:
            raise ConfigError(f"placement time_budget_s: {t!r} must be a finite number > 0")

    def settle(self, heartbeat_interval_s: float) -> float:
        """Seconds the live agent set must stay unchanged before a re-plan."""
        return self.settle_s or 2.0 * heartbeat_interval_s

    def inter(self) -> Link:
        """The link between nodes."""
        return Link(self.network_gbps * 1e9 / 8, DEFAULT_INTER.latency) if self.network_gbps else DEFAULT_INTER


def gpu_type_name(cuda_name: str) -> str:
    """Built-in spec name of a CUDA device name ("NVIDIA H100 80GB HBM3" -> "H100"); ConfigError if unknown."""
    try:
        return device_spec(cuda_name).name
    except ConfigError:
        pass
    words = re.findall(r"[a-z0-9]+", cuda_name.lower())
    for w in words:
        if w == "a100":  # A100 names carry the memory size: "NVIDIA A100-SXM4-40GB"
            return "A100-40GB" if "40gb" in words else "A100-80GB"
        try:
            return device_spec(w).name
        except ConfigError:
            continue
    raise ConfigError(f"--gpu-type: cannot tell which device {cuda_name!r} is; pass --gpu-type with a known "
                      "name (H100, A100-80GB, A6000, ...; see hexgen/planner/devices.py)")


def model_config(settings: Settings) -> ModelConfig:
    """The served model's shape: its preset, or config.json under ``model.path``."""
    if settings.model.preset:
        return preset(settings.model.preset)
    return ModelConfig.from_dir(settings.model.path)


def dtype_bytes(settings: Settings) -> int:
    """Bytes per weight/activation element of the deployment's dtype."""
    return _DTYPE_BYTES.get(settings.dtype, 2)


def cluster_from_agents(agents: Sequence[AgentRecord], inter: Link = DEFAULT_INTER) -> Cluster:
    """One node per agent (named by the agent id, sorted), its device spec with the reported memory."""
    if not agents:
        raise ConfigError("agents: no live agent is registered; start bin/worker without --stage")
    nodes = []
    for a in sorted(agents, key=lambda a: a.id):
        try:
            dev = device_spec(a.device_type)
        except ConfigError as e:
            raise ConfigError(f"agent {a.id} device_type: {e}") from e
        dev = replace(dev, memory_bytes=a.memory)
        nodes.append(Node(a.id, dev, a.count, default_intra(dev)))
    return Cluster(tuple(nodes), inter)


def signature(replica: Any) -> str:
    """Identity of a planned pipeline: each stage's node, device indices and layer range."""
    return "|".join(f"{s.gpus[0].node}:{','.join(str(g.index) for g in s.gpus)}:{s.layer_start}+{s.layers}"
                    for s in replica.stages)


def agent_instances(agents: Sequence[AgentRecord]) -> dict[str, str]:
    """agent id -> instance token: what a plan was made for (a restarted agent counts as a change)."""
    return {a.id: a.instance for a in agents}


def assign(plan: Any, agents: Sequence[AgentRecord], generation: int, previous: PlanRecord | None = None,
           *, table: str = "", leader: str = "", now: float = 0.0) -> tuple[PlanRecord, list[Assignment]]:
    """The plan record and one assignment per agent (agents outside the plan get an empty one: idle).

    ``plan`` is a :class:`~hexgen.planner.search.Plan` of a cluster made by :func:`cluster_from_agents`
    from the same ``agents``.
    """
    by_id = {a.id: a for a in agents}
    reuse = {v.get("signature"): pid for pid, v in (previous.pipelines if previous else {}).items()}
    roles: dict[str, list[Role]] = {a.id: [] for a in agents}
    pipelines: dict[str, dict] = {}
    for r, rep in enumerate(plan.replicas):
        sig = signature(rep)
        pid = reuse.get(sig) or f"{C.AUTO_PIPELINE_PREFIX}g{generation}-r{r}"
        stages = []
        for s, st in enumerate(rep.stages):
            agent = by_id.get(st.gpus[0].node)
            if agent is None or any(g.node != agent.id for g in st.gpus):
                raise ConfigError(f"plan: stage {s} of replica {r} uses node {st.gpus[0].node!r}, which is not "
                                  "one live agent; plan the cluster made from these agents")
            devices = tuple(agent.devices[g.index] for g in st.gpus)
            roles[agent.id].append(Role(pid, s, rep.hetero_config, rep.pp_partition, devices))
            stages.append({"agent": agent.id, "devices": list(devices)})
        pipelines[pid] = {"signature": sig, "hetero_config": list(rep.hetero_config),
                          "pp_partition": list(rep.pp_partition), "stages": stages, "rate": rep.rate}
    record = PlanRecord(generation, agent_instances(agents), pipelines, table, float(plan.rate), now, leader)
    out = [Assignment(a.id, a.instance, generation, tuple(roles[a.id])) for a in sorted(agents, key=lambda a: a.id)]
    return record, out


def idle_assignments(agents: Sequence[AgentRecord], generation: int) -> list[Assignment]:
    """An empty assignment for every agent (nothing fits, or the plan is empty)."""
    return [Assignment(a.id, a.instance, generation) for a in agents]


def plan_summary(record: PlanRecord) -> str:
    """One line per pipeline: id, layout and which agent runs each stage."""
    lines = [f"plan generation {record.generation}: {len(record.pipelines)} pipeline(s) on "
             f"{len(record.agents)} agent(s), predicted {record.rate:.3g} requests/s"]
    for pid, p in sorted(record.pipelines.items()):
        stages = ", ".join(f"stage {i} on {st['agent']} devices {st['devices']}" for i, st in enumerate(p["stages"]))
        lines.append(f"  {pid}: hetero-config {p['hetero_config']} pp-partition {p['pp_partition']}: {stages}")
    return "\n".join(lines)


def agents_by_model(agents: Mapping[str, AgentRecord] | Sequence[AgentRecord], model: str) -> list[AgentRecord]:
    """The agents registered for ``model`` (others serve another deployment sharing this Redis)."""
    seq = agents.values() if isinstance(agents, Mapping) else agents
    return [a for a in seq if not a.model or a.model == model]


def _s(v: Any) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


class PlacementLoop:
    """The planning side of one head: leader election, agent watching, re-planning (see the module doc).

    ``planner`` (tests) replaces ``plan_cluster``: it gets the Cluster and returns a Plan.
    """

    def __init__(self, settings: Settings, options: PlacementOptions, *, redis: Any, consumer: str,
                 planner: Any | None = None) -> None:
        self.settings = settings
        self.options = options
        self.redis = redis
        self.consumer = consumer
        self.planner = planner
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
        log.info("placement: auto-plan on (settle %.1fs, SLO %gs, workload %d+%d tokens)", self.settle_s,
                 self.options.slo_latency_s, self.options.prompt_len, self.options.output_len)
        try:
            while not self._stopping.is_set():
                try:
                    await self.step()
                except (RedisConnectionError, RedisTimeoutError, ResponseError) as e:
                    log.warning("placement: Redis error (%s); retrying", e)
                try:
                    await asyncio.wait_for(self._stopping.wait(), self.interval_s)
                except asyncio.TimeoutError:
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
                    if owner is not None and _s(owner) == self.consumer:
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
            if _s(await self.redis.get(C.PLACEMENT_LEADER_KEY) or b"") == self.consumer:
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
                log.info("placement: agents changed (joined %s, left %s); re-planning once stable for %.1fs",
                         joined or "-", left or "-", self.settle_s)
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
            plan = await asyncio.to_thread(self._plan, agents) if agents else None
        except HexGenError as e:  # PlannerError (nothing fits) or ConfigError (a bad agent record)
            self._failed = current
            msg = f"no plan for agents {sorted(current)}: {e}"
            log.error("placement: %s; keeping the deployed plan (generation %d)", msg,
                      deployed.generation if deployed else 0)
            await record_plan_error(self.redis, msg)
            return None
        if plan is None:
            record, assignments = PlanRecord(generation, {}, {}, "", 0.0, time.time(), self.consumer), []
        else:
            record, assignments = assign(plan, agents, generation, deployed, table=self._table(plan),
                                         leader=self.consumer, now=time.time())
        await publish_plan(self.redis, record, assignments)
        self._failed = None
        log.info("placement: published %s\n%s", plan_summary(record), record.table)
        return record

    def _plan(self, agents: list[AgentRecord]) -> Any:
        cluster = cluster_from_agents(agents, self.options.inter())
        if self.planner is not None:
            return self.planner(cluster)
        from hexgen.planner.costmodel import CostModel
        from hexgen.planner.search import Slo, Workload, plan_cluster

        cost = CostModel(model_config(self.settings), dtype_bytes(self.settings))
        workload = Workload(self.options.prompt_len, self.options.output_len, self.options.max_num_seqs)
        return plan_cluster(cluster, cost, workload, Slo(self.options.slo_latency_s),
                            time_budget_s=self.options.time_budget_s, seed=self.options.seed)

    @staticmethod
    def _table(plan: Any) -> str:
        try:
            from hexgen.planner.report import plan_table
        except ImportError:
            return ""
        return plan_table(plan, compare=False)
