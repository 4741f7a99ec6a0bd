"""Automatic placement: registered agents -> a Cluster -> ``plan_cluster`` -> one assignment per agent.

Pure functions (tested without Redis):

- :func:`gpu_type_name` maps a CUDA device name (``torch.cuda.get_device_name``) to a built-in spec name;
- :func:`cluster_from_agents` makes one :class:`~hexgen.planner.cluster.Node` per agent (named by the agent
  id, its device spec with the memory the agent reported, the default intra-node link of that device);
- :func:`assign` turns a :class:`~hexgen.planner.search.Plan` into the plan record and per-agent assignments.
  A replica whose stages are exactly those of a pipeline of the previous plan (same agents, devices, TP
  degrees and layers) keeps that pipeline's id, so its agents keep running it through a re-plan; every other
  replica gets a new id ``auto-g<generation>-r<replica>``.

:class:`Placer` is what the head's placement loop (:mod:`hexgen.head.placement`, ``bin/head --auto-plan``)
is handed: the search and the assignments, behind two calls, so the head itself never imports the search.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from hexgen.config import ModelConfig, preset
from hexgen.errors import ConfigError
from hexgen.planner.cluster import DEFAULT_INTER, Cluster, Link, Node, default_intra
from hexgen.planner.devices import device_spec
from hexgen.quantization import weight_format
from hexgen.wire import keys as C
from hexgen.wire.placement import (
    AgentRecord,
    Assignment,
    PlanRecord,
    Role,
    agent_instances,
)
from hexgen.wire.settings import Settings

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
    raise ConfigError(
        f"--gpu-type: cannot tell which device {cuda_name!r} is; pass --gpu-type with a known "
        "name (H100, A100-80GB, A6000, ...; see hexgen/planner/devices.py)"
    )


def model_config(settings: Settings) -> ModelConfig:
    """The served model's shape: its preset, or config.json under ``model.path``; its weight format after the
    deployment's ``quantization``."""
    cfg = preset(settings.model.preset) if settings.model.preset else ModelConfig.from_dir(settings.model.path)
    return replace(cfg, quantization=weight_format(cfg.quantization, settings.quantization))


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
    return "|".join(
        f"{s.gpus[0].node}:{','.join(str(g.index) for g in s.gpus)}:{s.layer_start}+{s.layers}" for s in replica.stages
    )


def assign(
    plan: Any,
    agents: Sequence[AgentRecord],
    generation: int,
    previous: PlanRecord | None = None,
    *,
    table: str = "",
    leader: str = "",
    now: float = 0.0,
) -> tuple[PlanRecord, list[Assignment]]:
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
                raise ConfigError(
                    f"plan: stage {s} of replica {r} uses node {st.gpus[0].node!r}, which is not "
                    "one live agent; plan the cluster made from these agents"
                )
            devices = tuple(agent.devices[g.index] for g in st.gpus)
            roles[agent.id].append(Role(pid, s, rep.hetero_config, rep.pp_partition, devices))
            stages.append({"agent": agent.id, "devices": list(devices)})
        pipelines[pid] = {
            "signature": sig,
            "hetero_config": list(rep.hetero_config),
            "pp_partition": list(rep.pp_partition),
            "stages": stages,
            "rate": rep.rate,
        }
    record = PlanRecord(generation, agent_instances(agents), pipelines, table, float(plan.rate), now, leader)
    out = [Assignment(a.id, a.instance, generation, tuple(roles[a.id])) for a in sorted(agents, key=lambda a: a.id)]
    return record, out


def idle_assignments(agents: Sequence[AgentRecord], generation: int) -> list[Assignment]:
    """An empty assignment for every agent (nothing fits, or the plan is empty)."""
    return [Assignment(a.id, a.instance, generation) for a in agents]


class Placer:
    """Plans registered agents into pipelines for the head's placement loop.

    ``planner`` (tests) replaces ``plan_cluster``: it gets the Cluster and returns a Plan.
    """

    def __init__(self, settings: Settings, options: PlacementOptions, planner: Any | None = None) -> None:
        self.settings = settings
        self.options = options
        self.planner = planner

    def plan(self, agents: list[AgentRecord]) -> Any:
        """A Plan for these agents (raises PlannerError when nothing fits, ConfigError for a bad record)."""
        cluster = cluster_from_agents(agents, self.options.inter())
        if self.planner is not None:
            return self.planner(cluster)
        from hexgen.planner.costmodel import CostModel
        from hexgen.planner.search import Slo, Workload, plan_cluster

        cost = CostModel(model_config(self.settings), dtype_bytes(self.settings))
        workload = Workload(self.options.prompt_len, self.options.output_len, self.options.max_num_seqs)
        return plan_cluster(
            cluster,
            cost,
            workload,
            Slo(self.options.slo_latency_s),
            time_budget_s=self.options.time_budget_s,
            seed=self.options.seed,
        )

    def assignments(
        self,
        plan: Any,
        agents: list[AgentRecord],
        generation: int,
        deployed: PlanRecord | None,
        *,
        leader: str,
        now: float,
    ) -> tuple[PlanRecord, list[Assignment]]:
        """The plan record and one assignment per agent (``plan`` None: an empty plan)."""
        if plan is None:
            return PlanRecord(generation, agent_instances(agents), {}, "", 0.0, now, leader), []
        return assign(plan, agents, generation, deployed, table=self._table(plan), leader=leader, now=now)

    @staticmethod
    def _table(plan: Any) -> str:
        try:
            from hexgen.planner.report import plan_table
        except ImportError:
            return ""
        return plan_table(plan, compare=False)
