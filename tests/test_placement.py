"""Automatic placement: device names, agents -> Cluster, Plan -> assignments, records, the planning loop (fakeredis)
and the agent's registry and role options."""
from __future__ import annotations

import fakeredis
import pytest

from hexgen.errors import ConfigError
from hexgen.head.placement import (
    PlacementLoop,
    format_placement,
    live_agents,
    placement_status,
    publish_plan,
    read_plan,
)
from hexgen.planner.cluster import Gpu
from hexgen.planner.devices import GiB, device_spec
from hexgen.planner.placement import (
    PlacementOptions,
    Placer,
    assign,
    cluster_from_agents,
    gpu_type_name,
    model_config,
)
from hexgen.planner.plans import Plan, PlannerError, ReplicaPlan, StagePlan
from hexgen.wire import keys as C
from hexgen.wire.placement import (
    AgentRecord,
    Assignment,
    PlanRecord,
    Role,
    agents_by_model,
    plan_summary,
)
from hexgen.wire.protocol import ProtocolError
from hexgen.wire.settings import LimitSettings, ModelSettings, Settings
from workers.agent_registry import AgentRegistry

pytestmark = pytest.mark.timeout(60)


def agent(aid: str, count: int = 1, kind: str = "CPU", memory: int = 8 * GiB, instance: str = "",
          devices: tuple[int, ...] = (), model: str = "tiny") -> AgentRecord:
    return AgentRecord(aid, aid, "host", kind, count, memory, devices or tuple(range(count)),
                       instance or f"inst-{aid}", 1, "v", model)


def stage(node: str, indices: tuple[int, ...], start: int, layers: int, kind: str = "CPU") -> StagePlan:
    dev = device_spec(kind)
    return StagePlan(tuple(Gpu(node, i, dev) for i in indices), layers, start, 1, 1)


def replica(*stages: StagePlan) -> ReplicaPlan:
    return ReplicaPlan(tuple(stages), 4, 1.0, 1.0, 0.01)


def plan(*replicas: ReplicaPlan) -> Plan:
    return Plan(tuple(replicas), (), float(len(replicas)), 0.0)


def settings(**limits) -> Settings:
    return Settings(model=ModelSettings(preset="tiny"),
                    limits=LimitSettings(heartbeat_ttl_s=2, heartbeat_interval_s=0.5, **limits))


@pytest.mark.parametrize("name,spec", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
    ("NVIDIA A100 80GB PCIe", "A100-80GB"), ("NVIDIA RTX A6000", "A6000"), ("NVIDIA GeForce RTX 4090", "RTX4090"),
    ("Tesla V100-SXM2-32GB", "V100"), ("Tesla T4", "T4"), ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"),
    ("h100", "H100")])
def test_gpu_type_name(name, spec):
    assert gpu_type_name(name) == spec


def test_gpu_type_name_unknown_asks_for_the_flag():
    with pytest.raises(ConfigError, match="--gpu-type"):
        gpu_type_name("Imaginary Accelerator 9000")


def test_records_round_trip():
    a = agent("a", 2, "H100", devices=(4, 5))
    assert AgentRecord.from_fields({k.encode(): v.encode() for k, v in a.to_fields().items()}) == a
    with pytest.raises(ProtocolError, match="device_type"):
        AgentRecord.from_fields({**a.to_fields(), "device_type": ""})
    with pytest.raises(ProtocolError, match="2 indices for 3 devices|count"):
        AgentRecord.from_fields({**a.to_fields(), "count": "3"})
    role = Role("auto-g1-r0", 1, (2, 1), (3, 3), (7,))
    asg = Assignment("a", "i", 3, (role,))
    back = Assignment.from_fields(asg.to_fields())
    assert back == asg and back.roles[0].tp == 1 and "stage 1" in asg.to_fields()["summary"]
    assert Assignment.from_fields(Assignment("a", "i", 4).to_fields()).roles == ()
    with pytest.raises(ConfigError, match="role devices"):
        Role("p", 0, (2, 1), (3, 3), (0,))
    with pytest.raises(ProtocolError, match="roles"):
        Assignment.from_fields({"generation": "1", "roles": '[{"pipeline": "p"}]'})
    rec = PlanRecord(2, {"a": "i"}, {"p": {"signature": "s"}}, "table", 1.5, 10.0, "head-1")
    assert PlanRecord.from_fields(rec.to_fields()) == rec


def test_cluster_from_agents_uses_reported_memory_and_default_links():
    c = cluster_from_agents([agent("b", 4, "A6000", memory=40 * GiB), agent("a")])
    assert [n.name for n in c.nodes] == ["a", "b"]
    assert c.nodes[1].device.name == "A6000" and c.nodes[1].device.memory_bytes == 40 * GiB
    assert c.nodes[1].count == 4 and c.nodes[0].device.name == "CPU"
    assert c.nodes[0].intra != c.nodes[1].intra  # host shared memory vs PCIe
    with pytest.raises(ConfigError, match="no live agent"):
        cluster_from_agents([])
    with pytest.raises(ConfigError, match="agent x device_type"):
        cluster_from_agents([agent("x", kind="NoSuchGPU")])


def test_assign_maps_stages_to_agents_and_physical_devices():
    agents = [agent("a", 2, "H100", devices=(2, 3)), agent("b", 1, "A6000"), agent("c")]
    p = plan(replica(stage("a", (0, 1), 0, 4, "H100"), stage("b", (0,), 4, 2, "A6000")))
    record, out = assign(p, agents, 5, leader="head-x", now=1.0)
    assert record.generation == 5 and record.agents == {"a": "inst-a", "b": "inst-b", "c": "inst-c"}
    assert list(record.pipelines) == ["auto-g5-r0"]
    by = {x.agent: x for x in out}
    assert by["a"].roles == (Role("auto-g5-r0", 0, (2, 1), (4, 2), (2, 3)),)  # cuda:2,3 for node indices 0,1
    assert by["b"].roles == (Role("auto-g5-r0", 1, (2, 1), (4, 2), (0,)),)
    assert by["c"].roles == () and by["c"].instance == "inst-c" and by["c"].generation == 5
    assert "stage 0 on a devices [2, 3]" in plan_summary(record)


def test_assign_keeps_the_ids_of_unchanged_pipelines():
    agents = [agent("a"), agent("b")]
    first, _ = assign(plan(replica(stage("a", (0,), 0, 6)), replica(stage("b", (0,), 0, 6))), agents, 1)
    assert sorted(first.pipelines) == ["auto-g1-r0", "auto-g1-r1"]
    second, out = assign(plan(replica(stage("b", (0,), 0, 6))), [agents[1]], 2, first)
    assert list(second.pipelines) == ["auto-g1-r1"] and out[0].roles[0].pipeline == "auto-g1-r1"
    third, _ = assign(plan(replica(stage("b", (0,), 0, 3), stage("a", (0,), 3, 3))), agents, 3, second)
    assert list(third.pipelines) == ["auto-g3-r0"]  # a new layout: a new pipeline


def test_assign_rejects_a_plan_of_another_cluster():
    with pytest.raises(ConfigError, match="not one live agent"):
        assign(plan(replica(stage("zz", (0,), 0, 6))), [agent("a")], 1)


def test_options_and_model():
    assert PlacementOptions().settle(0.5) == 1.0 and PlacementOptions(settle_s=3).settle(0.5) == 3
    assert PlacementOptions(network_gbps=100).inter().bandwidth == 100e9 / 8
    with pytest.raises(ConfigError, match="time_budget_s"):
        PlacementOptions(time_budget_s=0)
    with pytest.raises(ConfigError, match="prompt_len"):
        PlacementOptions(prompt_len=0)
    with pytest.raises(ConfigError, match="max_num_seqs"):
        PlacementOptions(max_num_seqs=0)
    assert model_config(settings()).num_layers == 6
    assert [a.id for a in agents_by_model([agent("a"), agent("b", model="other")], "tiny")] == ["a"]


def test_plan_batches_stay_within_the_agents_max_num_seqs():
    """The head plans for the batch the agents' workers will run (--plan-max-num-seqs), not the planner's 256."""
    agents = [agent("a"), agent("b")]
    small = Placer(settings(), PlacementOptions(max_num_seqs=3)).plan(agents)
    assert small.replicas and all(1 <= r.max_batch <= 3 for r in small.replicas)
    wide = Placer(settings(), PlacementOptions(max_num_seqs=200)).plan(agents)
    assert max(r.max_batch for r in wide.replicas) > 3


async def put_agent(r, a: AgentRecord, alive: bool = True) -> None:
    await r.hset(C.agent_key(a.id), mapping=a.to_fields())
    if alive:
        await r.set(C.agent_heartbeat_key(a.id), "1", ex=60)
    else:
        await r.delete(C.agent_heartbeat_key(a.id))


def one_replica_each(cluster):
    return plan(*(replica(stage(n.name, (0,), 0, 6)) for n in cluster.nodes))


async def last_assignment(r, aid: str) -> Assignment:
    rows = await r.xrevrange(C.assign_stream(aid), count=1)
    return Assignment.from_fields(rows[0][1])


async def test_loop_waits_for_settle_then_plans_and_replans_on_leave(fake):
    loop = PlacementLoop(settings(), Placer(settings(), PlacementOptions(settle_s=1.0), planner=one_replica_each), redis=fake, consumer="head-1")
    assert await loop.step(now=0.0) is None  # no agents, no plan
    await put_agent(fake, agent("a"))
    await put_agent(fake, agent("b"))
    assert await loop.step(now=1.0) is None  # just changed: settle first
    rec = await loop.step(now=2.5)
    assert rec is not None and rec.generation == 1 and set(rec.agents) == {"a", "b"}
    assert (await read_plan(fake)).pipelines == rec.pipelines
    a1 = await last_assignment(fake, "a")
    assert a1.generation == 1 and a1.roles[0].pipeline == "auto-g1-r0"
    assert await loop.step(now=5.0) is None  # nothing changed
    await put_agent(fake, agent("b"), alive=False)  # b's heartbeat expired
    assert await loop.step(now=6.0) is None
    rec2 = await loop.step(now=7.5)
    assert rec2.generation == 2 and set(rec2.agents) == {"a"}
    a2 = await last_assignment(fake, "a")
    assert a2.generation == 2 and a2.roles == a1.roles  # a's pipeline is unchanged: it keeps running
    assert not await fake.exists(C.agent_key("b"))  # the dead agent's record is forgotten
    assert [x.id for x in await live_agents(fake)] == ["a"]


async def test_loop_replans_when_an_agent_restarts(fake):
    loop = PlacementLoop(settings(), Placer(settings(), PlacementOptions(settle_s=0.5), planner=one_replica_each), redis=fake, consumer="h")
    await put_agent(fake, agent("a"))
    await loop.step(now=0.0)
    assert (await loop.step(now=1.0)).generation == 1
    await put_agent(fake, agent("a", instance="new"))
    await loop.step(now=2.0)
    rec = await loop.step(now=3.0)
    assert rec.generation == 2 and rec.agents == {"a": "new"}
    assert (await last_assignment(fake, "a")).instance == "new"


async def test_loop_records_the_error_and_keeps_serving_when_nothing_fits(fake):
    calls = []

    def failing(cluster):
        calls.append(cluster)
        raise PlannerError("no layout fits: the model needs 13 GiB, the cluster has 1")

    loop = PlacementLoop(settings(), Placer(settings(), PlacementOptions(settle_s=0.5), planner=failing), redis=fake, consumer="h")
    await put_agent(fake, agent("a"))
    await loop.step(now=0.0)
    assert await loop.step(now=1.0) is None
    assert "no layout fits" in (await fake.hget(C.PLAN_KEY, "error")).decode()
    assert await loop.step(now=2.0) is None and len(calls) == 1  # no retry until the agents change


async def test_only_the_leader_plans(fake):
    opts = PlacementOptions(settle_s=0.5)
    one = PlacementLoop(settings(), Placer(settings(), opts, planner=one_replica_each), redis=fake, consumer="h1")
    two = PlacementLoop(settings(), Placer(settings(), opts, planner=one_replica_each), redis=fake, consumer="h2")
    await put_agent(fake, agent("a"))
    assert await one.lead() and not await two.lead()
    assert await one.lead()  # renewed
    await two.step(now=0.0)
    assert await two.step(now=5.0) is None and await read_plan(fake) is None
    await one._release()
    assert await two.lead()


async def test_empty_agent_set_publishes_an_empty_plan(fake):
    await publish_plan(fake, PlanRecord(3, {"a": "x"}, {"auto-g3-r0": {"signature": "s"}}), [])
    loop = PlacementLoop(settings(), Placer(settings(), PlacementOptions(settle_s=0.5), planner=one_replica_each), redis=fake, consumer="h")
    await loop.step(now=0.0)
    rec = await loop.step(now=1.0)
    assert rec.generation == 4 and rec.pipelines == {} and rec.agents == {}


def test_agent_registry_filters_assignments_by_instance():
    r = fakeredis.FakeRedis()
    reg = AgentRegistry(r, agent("a"), heartbeat_ttl_s=5)
    assert reg.last_entry_id() == "0-0"
    reg.register()
    assert r.ttl(C.agent_heartbeat_key("a")) > 0 and reg.beat()
    r.xadd(C.assign_stream("a"), Assignment("a", "someone-else", 1).to_fields())
    mine = Assignment("a", "inst-a", 2, (Role("p", 0, (1,), (6,), (0,)),))
    r.xadd(C.assign_stream("a"), mine.to_fields())
    after, found = reg.next_assignment(r, "0-0", 10)
    assert found == mine and after != "0-0"
    assert reg.next_assignment(r, after, 10) == (after, None)
    r.hset(C.agent_key("a"), "instance", "newer")  # another process took the id
    assert not reg.beat()
    reg.deregister()  # leaves the newer instance's record alone
    assert r.exists(C.agent_key("a"))


def test_role_options_and_cpu_devices():
    from workers.agent import AgentOptions, detect_devices, role_options

    s = settings()
    kind, memory, devices = detect_devices(s, (), None, None)
    assert kind == "CPU" and memory > 0 and devices == (0,)
    assert detect_devices(s, (0, 1), "a6000", 2.0) == ("A6000", 2 * GiB, (0, 1))
    opts = AgentOptions(s, "a", "a", "CPU", GiB, (0,), drain_timeout_s=5.0)
    w = role_options(opts, Role("auto-g1-r0", 1, (2, 1), (4, 2), (0,)))
    assert w.pipeline_id == "auto-g1-r0" and w.stage == 1 and w.devices == () and w.drain_timeout_s == 5.0
    assert w.pipeline.hetero_config == (2, 1) and w.pipeline.pp_partition == (4, 2)
    with pytest.raises(ConfigError, match="--agent-id"):
        AgentOptions(s, "bad id", "a", "CPU", GiB, (0,))


async def test_placement_status_shows_agents_assignments_and_plan(fake):

    assert format_placement(await placement_status(fake)) == ""
    await put_agent(fake, agent("a"))
    await put_agent(fake, agent("b"), alive=False)
    record, out = assign(plan(replica(stage("a", (0,), 0, 6))), [agent("a")], 1, table="TABLE", leader="h")
    await publish_plan(fake, record, out)
    status = await placement_status(fake)
    assert [(a["id"], a["alive"], a["generation"]) for a in status["agents"]] == [("a", True, 1), ("b", False, None)]
    text = format_placement(status)
    assert "auto-g1-r0 stage 0" in text and "TABLE" in text and "generation 1, planned by h" in text


class FakeProc:
    def __init__(self, target=None, args=(), name="", daemon=False):
        self.args, self.name, self.alive, self.pid, self.exitcode = args, name, False, id(self), None

    def start(self):
        self.alive = True

    def is_alive(self):
        return self.alive

    def join(self, timeout=None):
        pass

    def kill(self):
        self.alive, self.exitcode = False, -9


def test_agent_reconcile_keeps_drains_and_restarts_roles(monkeypatch):
    import workers.agent as agent_mod

    opts = agent_mod.AgentOptions(settings(), "a", "a", "CPU", GiB, (0, 1), drain_timeout_s=1.0)
    ag = agent_mod.Agent(opts)
    ag.ctx = type("Ctx", (), {"Process": FakeProc})()
    killed = []

    def fake_kill(pid, sig):
        killed.append(pid)
        for p in started:
            if p.pid == pid:
                p.alive, p.exitcode = False, 0

    monkeypatch.setattr(agent_mod.os, "kill", fake_kill)
    keep, drop, new = (Role(f"p{i}", 0, (1,), (6,), (i,)) for i in range(3))
    ag.reconcile(Assignment("a", ag.record.instance, 1, (keep, drop)))
    started = list(ag.roles.values())
    assert len(started) == 2 and all(p.is_alive() for p in started)
    first_keep = ag.roles[keep]
    ag.reconcile(Assignment("a", ag.record.instance, 2, (keep, new)))
    started += [ag.roles[new]]
    assert ag.roles[keep] is first_keep and drop not in ag.roles and killed == [started[1].pid]
    ag.roles[keep].alive = False  # its pipeline was drained by another stage's agent
    ag.reconcile(Assignment("a", ag.record.instance, 3, (keep, new)))
    assert ag.roles[keep] is not first_keep and ag.roles[keep].is_alive()
    ag.reconcile(Assignment("a", ag.record.instance, 2, ()))  # an older generation is ignored
    assert len(ag.roles) == 2 and ag.generation == 3
    ag.client.close()
    ag.reader.close()
