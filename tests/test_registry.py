"""Worker registration, heartbeats, pipeline formation and the peer watchdog (fakeredis)."""
from __future__ import annotations

import threading
import time

import fakeredis
import pytest

from hexgen.wire import keys as C
from tests.waiting import wait_until
from workers.registry import (STATE_DRAINING, STATE_FORMING, Heartbeat, Registry, RegistryError,
                                     worker_id)

pytestmark = pytest.mark.timeout(30)
LAYOUT = "hetero-config 1 2 / pp-partition 4 2"


@pytest.fixture
def make_registry(server):
    clients = []

    def make(world_size: int = 3, layout: str = LAYOUT, model: str = "tiny", ttl: int = 2) -> Registry:
        c = fakeredis.FakeRedis(server=server)
        clients.append(c)
        return Registry(c, "p0", world_size=world_size, layout=layout, model=model, heartbeat_ttl_s=ttl)

    yield make
    for c in clients:
        c.close()


def register(reg: Registry, rank: int, stage: int = 0, tp_rank: int = 0):
    rec = reg.new_record(rank, stage, tp_rank, device="cpu", memory=123, version="0.1.0")
    reg.register(rank, rec)
    return rec


def test_register_writes_record_and_heartbeat(make_registry):
    reg = make_registry()
    rec = register(reg, 1, stage=1, tp_rank=0)
    r = reg.r
    fields = {k.decode(): v.decode() for k, v in r.hgetall(C.worker_key("p0:1")).items()}
    for name in C.WORKER_FIELDS:
        assert name in fields, name
    assert fields["pipeline"] == "p0" and fields["stage"] == "1" and fields["rank"] == "1"
    assert fields["instance"] == rec.extra["instance"] and fields["layout"] == LAYOUT
    assert 0 < r.ttl(C.heartbeat_key("p0:1")) <= 2
    assert float(r.get(C.heartbeat_key("p0:1"))) == pytest.approx(time.time(), abs=5)


def test_deregister_leaves_a_newer_instance_alone(make_registry):
    reg = make_registry()
    old = register(reg, 0)
    new = register(reg, 0)
    assert old.extra["instance"] != new.extra["instance"]
    reg.deregister(0, old.extra["instance"])
    assert reg.r.exists(C.worker_key("p0:0"))
    reg.deregister(0, new.extra["instance"])
    assert not reg.r.exists(C.worker_key("p0:0"), C.heartbeat_key("p0:0"))


def test_pipeline_forms_when_all_ranks_registered_in_any_order(make_registry):
    regs = [make_registry() for _ in range(3)]
    recs: dict[int, object] = {}
    recs[2] = register(regs[2], 2, stage=1, tp_rank=1)  # a later stage starts first
    results: dict[int, object] = {}

    def join(rank: int) -> None:
        results[rank] = regs[rank].join(rank, recs[rank].extra["instance"], timeout_s=10, interval_s=0.02)

    t2 = threading.Thread(target=join, args=(2,))
    t2.start()
    recs[0] = register(regs[0], 0)
    leader = threading.Thread(target=lambda: results.__setitem__(0, regs[0].form(
        recs[0].extra["instance"], advertise_host=None, redis_url="redis://localhost:6379/0", timeout_s=10,
        interval_s=0.02)))
    leader.start()
    time.sleep(0.2)  # the test is that nothing forms meanwhile
    assert 0 not in results, "formed before every rank registered"
    recs[1] = register(regs[1], 1, stage=1, tp_rank=0)
    join(1)
    leader.join(10)
    t2.join(10)
    gens = [results[i] for i in range(3)]
    assert gens[0] == gens[1] == gens[2]
    gen = gens[0]
    assert gen.number == 1
    assert gen.rendezvous.startswith("tcp://127.0.0.1:")
    assert gen.members == tuple(recs[i].extra["instance"] for i in range(3))
    rec = regs[0].record()
    assert rec.state == STATE_FORMING and rec.layout == LAYOUT and rec.rendezvous == gen.rendezvous


def test_a_restarted_rank_waits_for_a_new_generation(make_registry):
    regs = [make_registry(world_size=2) for _ in range(2)]
    r0 = register(regs[0], 0)
    register(regs[1], 1, stage=1)
    gen1 = regs[0].form(r0.extra["instance"], advertise_host="10.0.0.5", redis_url="", timeout_s=5,
                        interval_s=0.01)
    assert gen1.rendezvous.startswith("tcp://10.0.0.5:")
    r1b = register(regs[1], 1, stage=1)  # rank 1 restarted: new instance token
    with pytest.raises(RegistryError, match="deadline"):
        regs[1].join(1, r1b.extra["instance"], timeout_s=0.3, interval_s=0.02)
    assert regs[0].check_peers(0, gen1) == "peer rank 1 restarted (instance changed)"
    r0b = register(regs[0], 0)
    gen2 = regs[0].form(r0b.extra["instance"], advertise_host=None, redis_url="", timeout_s=5, interval_s=0.01)
    assert gen2.number == 2 and gen2.rendezvous != gen1.rendezvous
    assert regs[1].join(1, r1b.extra["instance"], timeout_s=5, interval_s=0.01) == gen2
    assert regs[1].check_peers(1, gen1).startswith("pipeline re-formed as generation 2")


def test_form_rejects_a_rank_with_another_layout(make_registry):
    leader = make_registry(world_size=2)
    other = make_registry(world_size=2, layout="hetero-config 2 / pp-partition 6")
    rec = register(leader, 0)
    register(other, 1, stage=1)
    with pytest.raises(RegistryError, match="rank 1 .* registered layout 'hetero-config 2"):
        leader.form(rec.extra["instance"], advertise_host=None, redis_url="", timeout_s=5, interval_s=0.01)


def test_form_times_out_naming_the_problem(make_registry):
    reg = make_registry(world_size=2)
    rec = register(reg, 0)
    with pytest.raises(RegistryError, match="deadline"):
        reg.form(rec.extra["instance"], advertise_host=None, redis_url="", timeout_s=0.2, interval_s=0.02)
    stop = threading.Event()
    stop.set()
    with pytest.raises(RegistryError, match="stopped"):
        reg.form(rec.extra["instance"], advertise_host=None, redis_url="", stop=stop)


def test_check_peers_sees_a_dead_peer_but_not_while_draining(make_registry):
    reg = make_registry(world_size=2)
    r0, r1 = register(reg, 0), register(reg, 1, stage=1)
    gen = reg.form(r0.extra["instance"], advertise_host=None, redis_url="", timeout_s=5, interval_s=0.01)
    assert reg.check_peers(0, gen) is None
    reg.r.delete(C.heartbeat_key(worker_id("p0", 1)))
    assert reg.check_peers(0, gen) == "peer rank 1 lost its heartbeat"
    assert reg.check_peers(1, gen) is None  # its own heartbeat is not a peer's
    assert not reg.drain_requested()
    reg.request_drain()
    assert reg.drain_requested() and reg.record().state == STATE_DRAINING
    assert reg.check_peers(0, gen) is None
    reg.deregister(1, r1.extra["instance"])


def test_heartbeat_refreshes_and_watchdog_fires_after_strikes(make_registry, server):
    reg = make_registry(world_size=2, ttl=1)
    r0, r1 = register(reg, 0), register(reg, 1, stage=1)
    gen = reg.form(r0.extra["instance"], advertise_host=None, redis_url="", timeout_s=5, interval_s=0.01)
    hb0 = Heartbeat(reg, 0, r0, 0.05)
    hb1 = Heartbeat(reg, 1, r1, 0.05)
    broken = []
    hb0.watch(lambda: reg.check_peers(0, gen), broken.append)
    hb0.start()
    hb1.start()
    time.sleep(1.3)  # the test is that time passes: longer than the TTL, only the refreshes keep the keys
    assert reg.r.exists(C.heartbeat_key("p0:0"), C.heartbeat_key("p0:1")) == 2
    assert broken == []
    server.connected = False  # a Redis outage is neither fatal nor a dead peer
    time.sleep(0.3)  # an outage of several heartbeat intervals
    server.connected = True
    assert hb0.is_alive() and broken == []
    hb1.stop()
    reg.r.delete(C.heartbeat_key("p0:1"))  # as if rank 1 was killed and its TTL ran out
    wait_until(lambda: broken, timeout=5, what="the watchdog fired")
    assert broken[0] == "peer rank 1 lost its heartbeat"
    hb0.stop()
    assert not hb0.is_alive()
