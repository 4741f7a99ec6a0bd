"""``hexgen status``: registry and queue snapshot, text and JSON output."""
from __future__ import annotations

import json
import time

import fakeredis
import pytest

from hexgen.cli.status import main as status_main
from hexgen.head.status import collect_status, format_status
from hexgen.wire import figures as F
from hexgen.wire import keys as C


async def seed(r):
    for wid, stage, beat in (("p0:0", 0, True), ("p0:1", 1, False)):
        await r.hset(C.worker_key(wid), mapping={"pipeline": "p0", "stage": stage, "tp_rank": 0, "host": "h",
                                                 "device": f"cuda:{stage}", "memory": 80 * 2**30, "pid": 1,
                                                 "version": "0.1.0", "model": "tiny"})
        if beat:
            await r.set(C.heartbeat_key(wid), f"{time.time() - 2:.3f}", ex=10)
    await r.hset(C.pipeline_key("p0"), mapping={"state": "ready", "layout": "hetero-config 1 1"})
    await r.xgroup_create(C.REQUESTS_STREAM, C.HEADS_GROUP, id="0", mkstream=True)
    await r.xadd(C.REQUESTS_STREAM, {"prompt": "x"})
    work = C.work_stream("tiny")
    await r.xgroup_create(work, C.PIPELINES_GROUP, id="0", mkstream=True)
    for i in range(3):
        await r.xadd(work, {"id": str(i)})
    await r.xreadgroup(C.PIPELINES_GROUP, "pipeline-p0", {work: ">"}, count=2)
    await r.hset(F.pipeline_figures_key("p0"), mapping={"prefix_cache_queries": 400, "prefix_cache_hits": 300})


async def test_collect_status():
    r = fakeredis.FakeAsyncRedis()
    try:
        await seed(r)
        await r.hset(C.worker_key("junk"), mapping={"stage": "x"})  # malformed records are skipped
        report = await collect_status(r)
    finally:
        await r.aclose()
    assert [(w.id, w.alive) for w in report.workers] == [("p0:0", True), ("p0:1", False)]
    assert 1.5 < report.workers[0].heartbeat_age_s < 10 and report.workers[1].heartbeat_age_s is None
    [p] = report.pipelines
    assert (p.id, p.state, p.workers, p.alive_workers, p.load) == ("p0", "ready", 2, 1, 2)
    assert p.prefix_hit_rate == pytest.approx(0.75)
    req, work = report.queues
    assert (req.stream, req.length, req.pending, req.lag) == ("hexgen:requests", 1, 0, 1)
    assert (work.stream, work.length, work.pending, work.lag, work.depth) == ("hexgen:work:tiny", 3, 2, 1, 3)
    text = format_status(report)
    for needle in ("PIPELINES", "p0", "1/2 alive", "p0:1", "dead", "80.0GiB", "hexgen:work:tiny", "75.0%"):
        assert needle in text


def test_cli_json_and_text_on_real_redis(redis_server, capsys):
    import asyncio

    from hexgen.wire.settings import async_redis

    async def go():
        r = async_redis(redis_server)
        try:
            await seed(r)
        finally:
            await r.aclose()
    asyncio.run(go())
    assert status_main(["--json", "--redis-url", redis_server]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [w["id"] for w in data["workers"]] == ["p0:0", "p0:1"]
    assert data["pipelines"][0]["load"] == 2 and data["queues"][1]["pending"] == 2
    assert status_main(["--redis-url", redis_server]) == 0
    assert "WORKERS" in capsys.readouterr().out


def test_cli_reports_unreachable_redis(capsys):
    from hexgen.procs import free_port

    port = free_port()  # nothing listens here once the probe socket is closed
    assert status_main(["--redis-url", f"redis://:pw@127.0.0.1:{port}/0"]) == 1
    err = capsys.readouterr().err
    assert "cannot reach Redis at redis://:***@127.0.0.1" in err and "pw" not in err.replace("***", "")
    assert status_main(["--redis-url", "http://x"]) == 2


@pytest.mark.parametrize("argv", [["--help"]])
def test_cli_help(argv):
    with pytest.raises(SystemExit) as e:
        status_main(argv)
    assert e.value.code == 0
