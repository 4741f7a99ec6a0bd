"""Typed codecs of the automatic-placement records (kept apart from protocol.py, which holds the request path).

- Agent records (``hexgen:agent:<id>``): a hash of plain strings, like the worker registry
  (:class:`AgentRecord`): which node, which device type, how many devices and how much memory each has.
- Assignments (stream ``hexgen:assign:<id>``): flat string fields (:class:`Assignment`); ``roles`` is a JSON
  list so ``redis-cli XREVRANGE hexgen:assign:<id> + - COUNT 1`` stays readable.
- The plan (``hexgen:plan``): a hash of plain strings and JSON (:class:`PlanRecord`).

Field names and values may arrive as ``bytes`` or ``str``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hexgen.errors import ConfigError
from hexgen.wire.protocol import Fields, ProtocolError, str_fields


def _int(f: dict[str, str], name: str, kind: str, default: int | None = None) -> int:
    raw = f.get(name)
    if raw is None:
        if default is not None:
            return default
        raise ProtocolError(f"{kind}: field {name!r} is missing (fields: {sorted(f)})")
    try:
        return int(raw)
    except ValueError as e:
        raise ProtocolError(f"{kind}: field {name!r} = {raw!r} is not an integer") from e


def _json(f: dict[str, str], name: str, kind: str, default: Any) -> Any:
    raw = f.get(name)
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except ValueError as e:
        raise ProtocolError(f"{kind}: field {name!r} is not valid JSON: {raw[:60]!r}") from e


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


@dataclass(frozen=True)
class AgentRecord:
    """One placement agent (``bin/worker`` without ``--stage``): the devices it offers on its node."""

    id: str
    node: str  # the planner's node name (one Node per agent)
    host: str  # hostname of the process
    device_type: str  # a DeviceSpec name ("H100", "CPU", ...)
    count: int  # devices offered
    memory: int  # bytes of memory per device
    devices: tuple[int, ...]  # physical device index of each offered device (cuda:<i>)
    instance: str  # random token of this process; a restart makes a new one
    pid: int = 0
    version: str = ""
    model: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ConfigError(f"agent {self.id} count: {self.count!r} must be an integer ≥ 1")
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ConfigError(f"agent {self.id} memory: {self.memory!r} must be a number of bytes ≥ 1")
        object.__setattr__(self, "devices", tuple(self.devices))
        if len(self.devices) != self.count:
            raise ConfigError(f"agent {self.id} devices: {len(self.devices)} indices for {self.count} devices")

    def to_fields(self) -> dict[str, str]:
        return {
            "id": self.id,
            "node": self.node,
            "host": self.host,
            "device_type": self.device_type,
            "count": str(self.count),
            "memory": str(self.memory),
            "devices": ",".join(map(str, self.devices)),
            "instance": self.instance,
            "pid": str(self.pid),
            "version": self.version,
            "model": self.model,
        }

    @classmethod
    def from_fields(cls, fields: Fields) -> AgentRecord:
        f = str_fields(fields)
        kind = "agent record"
        for name in ("id", "node", "device_type", "instance"):
            if not f.get(name):
                raise ProtocolError(f"{kind}: field {name!r} is missing (fields: {sorted(f)})")
        try:
            return cls(
                id=f["id"],
                node=f["node"],
                host=f.get("host", ""),
                device_type=f["device_type"],
                count=_int(f, "count", kind),
                memory=_int(f, "memory", kind),
                devices=_ints(f.get("devices", "")),
                instance=f["instance"],
                pid=_int(f, "pid", kind, 0),
                version=f.get("version", ""),
                model=f.get("model", ""),
            )
        except (ConfigError, ValueError) as e:
            raise ProtocolError(f"{kind}: {e}") from e


@dataclass(frozen=True)
class Role:
    """One stage of one planned pipeline that an agent runs on some of its devices."""

    pipeline: str
    stage: int
    hetero_config: tuple[int, ...]
    pp_partition: tuple[int, ...]
    devices: tuple[int, ...]  # physical device index per TP rank of the stage

    def __post_init__(self) -> None:
        for name in ("hetero_config", "pp_partition", "devices"):
            object.__setattr__(self, name, tuple(int(x) for x in getattr(self, name)))
        if not 0 <= self.stage < len(self.hetero_config):
            raise ConfigError(f"role stage: {self.stage} is not a stage of {list(self.hetero_config)}")
        if len(self.pp_partition) != len(self.hetero_config):
            raise ConfigError(
                f"role pp_partition: {list(self.pp_partition)} needs one entry per stage of {list(self.hetero_config)}"
            )
        if len(self.devices) != self.hetero_config[self.stage]:
            raise ConfigError(
                f"role devices: {len(self.devices)} devices for stage {self.stage} with TP "
                f"{self.hetero_config[self.stage]}"
            )

    @property
    def tp(self) -> int:
        return self.hetero_config[self.stage]

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "stage": self.stage,
            "hetero_config": list(self.hetero_config),
            "pp_partition": list(self.pp_partition),
            "devices": list(self.devices),
        }

    def describe(self) -> str:
        return (
            f"{self.pipeline} stage {self.stage} (tp {self.tp}, {self.pp_partition[self.stage]} layers) on "
            f"devices {','.join(map(str, self.devices))}"
        )


@dataclass(frozen=True)
class Assignment:
    """What one agent instance runs under plan ``generation``; no roles means: idle."""

    agent: str
    instance: str
    generation: int
    roles: tuple[Role, ...] = ()

    def to_fields(self) -> dict[str, str]:
        summary = "; ".join(r.describe() for r in self.roles) or "idle (not in the plan)"
        return {
            "agent": self.agent,
            "instance": self.instance,
            "generation": str(self.generation),
            "roles": json.dumps([r.to_dict() for r in self.roles]),
            "summary": summary,
        }

    @classmethod
    def from_fields(cls, fields: Fields) -> Assignment:
        f = str_fields(fields)
        kind = "assignment"
        roles = _json(f, "roles", kind, [])
        try:
            parsed = tuple(
                Role(str(r["pipeline"]), int(r["stage"]), r["hetero_config"], r["pp_partition"], r["devices"])
                for r in roles
            )
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ProtocolError(f"{kind}: bad roles {roles!r}: {e}") from e
        return cls(
            agent=f.get("agent", ""),
            instance=f.get("instance", ""),
            generation=_int(f, "generation", kind),
            roles=parsed,
        )


@dataclass(frozen=True)
class PlanRecord:
    """The deployed plan in ``hexgen:plan``: its generation, the agents it was made for and its pipelines.

    ``pipelines`` maps pipeline id -> {"signature", "hetero_config", "pp_partition", "stages": [agent ids]};
    ``agents`` maps agent id -> instance token. ``error`` is set when the last attempt to plan failed.
    """

    generation: int
    agents: dict[str, str] = field(default_factory=dict)
    pipelines: dict[str, dict] = field(default_factory=dict)
    table: str = ""
    rate: float = 0.0
    created_at: float = 0.0
    leader: str = ""
    error: str = ""

    def to_fields(self) -> dict[str, str]:
        return {
            "generation": str(self.generation),
            "agents": json.dumps(self.agents, sort_keys=True),
            "pipelines": json.dumps(self.pipelines, sort_keys=True),
            "table": self.table,
            "rate": f"{self.rate:.6g}",
            "created_at": f"{self.created_at:.3f}",
            "leader": self.leader,
            "error": self.error,
        }

    @classmethod
    def from_fields(cls, fields: Fields) -> PlanRecord:
        f = str_fields(fields)
        kind = "plan record"
        try:
            rate, created = float(f.get("rate", "0") or 0), float(f.get("created_at", "0") or 0)
        except ValueError as e:
            raise ProtocolError(f"{kind}: rate/created_at: {e}") from e
        return cls(
            generation=_int(f, "generation", kind, 0),
            agents=_json(f, "agents", kind, {}),
            pipelines=_json(f, "pipelines", kind, {}),
            table=f.get("table", ""),
            rate=rate,
            created_at=created,
            leader=f.get("leader", ""),
            error=f.get("error", ""),
        )


def agent_instances(agents: Sequence[AgentRecord]) -> dict[str, str]:
    """agent id -> instance token: what a plan was made for (a restarted agent counts as a change)."""
    return {a.id: a.instance for a in agents}


def agents_by_model(agents: Mapping[str, AgentRecord] | Sequence[AgentRecord], model: str) -> list[AgentRecord]:
    """The agents registered for ``model`` (others serve another deployment sharing this Redis)."""
    seq = agents.values() if isinstance(agents, Mapping) else agents
    return [a for a in seq if not a.model or a.model == model]


def plan_summary(record: PlanRecord) -> str:
    """One line per pipeline: id, layout and which agent runs each stage."""
    lines = [
        f"plan generation {record.generation}: {len(record.pipelines)} pipeline(s) on "
        f"{len(record.agents)} agent(s), predicted {record.rate:.3g} requests/s"
    ]
    for pid, p in sorted(record.pipelines.items()):
        stages = ", ".join(f"stage {i} on {st['agent']} devices {st['devices']}" for i, st in enumerate(p["stages"]))
        lines.append(f"  {pid}: hetero-config {p['hetero_config']} pp-partition {p['pp_partition']}: {stages}")
    return "\n".join(lines)
