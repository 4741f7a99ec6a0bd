"""Least-privilege Redis users (hexgen redis-acl): the file, the URLs, and a real redis-server started with it
on which the head, a pipeline and the async client each serve under their own user while everything outside
a role's needs is refused with NOPERM."""
from __future__ import annotations

import json
import os
import socket
import stat

import pytest
import redis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError

from hexgen.cli.redis_acl import main as redis_acl_main
from hexgen.client import HexGenClient
from hexgen.wire import keys as K
from hexgen.wire.acl import ROLES, acl_text, role_url
from hexgen.wire.functions import LIBRARY_NAME, LibraryMissing, SyncFunction, load_library
from tests.redis_topology import RedisNode, binary_or_skip
from tests.reliability_harness import deploy
from tests.serving_harness import PipelineSpec

PASSWORDS = {"head": "head-pw", "worker": "worker-pw", "client": "client-pw"}


def test_acl_file_and_urls(tmp_path, capsys):
    text = acl_text(PASSWORDS)
    lines = text.splitlines()
    assert lines[0].startswith("user default off")
    assert [ln.split()[1] for ln in lines[1:]] == ["hexgen-head", "hexgen-worker", "hexgen-client"]
    for ln in lines:
        assert " -@all" in ln and "+@" not in ln and "allkeys" not in ln and "~*" not in ln
    for pw in PASSWORDS.values():
        assert pw not in text  # only hashes
    assert role_url("rediss://old:pw@r.example:6380/2?ssl_ca_certs=/ca.pem", "worker", "p w") == \
        "rediss://hexgen-worker:p%20w@r.example:6380/2?ssl_ca_certs=/ca.pem"
    assert role_url("redis+sentinel://s1:1,s2:2/svc/0", "client", "x") == \
        "redis+sentinel://hexgen-client:x@s1:1,s2:2/svc/0"
    out = tmp_path / "users.acl"
    assert redis_acl_main(["--out", str(out), "--json", "--redis-url", "redis://r.example:6379/0"]) == 0
    urls = json.loads(capsys.readouterr().out)
    assert sorted(urls) == sorted(ROLES)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    written = out.read_text()
    for role, url in urls.items():
        password = url.split("@")[0].rsplit(":", 1)[1]
        assert len(password) >= 40 and password not in written and url.endswith("@r.example:6379/0")


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory):
    """A real redis-server started with the generated ACL file; yields (node, urls by role)."""
    binary = binary_or_skip()
    path = str(tmp_path_factory.mktemp("acl") / "users.acl")
    with open(path, "w", encoding="utf-8") as f:
        f.write(acl_text(PASSWORDS) + "user test-admin on >admin-pw +@all ~* &*\n")  # the test's own hands
    node = RedisNode(binary, ("--save", "", "--appendonly", "no", "--aclfile", path)).start()
    urls = {role: node.url(f"{ROLES[role].user}:{pw}") for role, pw in PASSWORDS.items()}
    urls["admin"] = node.url("test-admin:admin-pw")
    yield node, urls
    node.stop()


def refused(r: redis.Redis, *cmd: object) -> bool:
    try:
        r.execute_command(*cmd)
    except NoPermissionError:
        return True
    except ResponseError as e:  # in a script/function: the inner command is refused
        return "no permissions" in str(e) or "can't run this command" in str(e)
    return False


def test_default_user_is_off(acl_redis):
    node, _ = acl_redis
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
        s.sendall(b"PING\r\nAUTH default x\r\nAUTH x\r\n")
        replies = b""
        while replies.count(b"\r\n") < 3:
            replies += s.recv(4096)
    assert [r.split(b" ")[0] for r in replies.splitlines()] == [b"-NOAUTH", b"-WRONGPASS", b"-WRONGPASS"]
    with pytest.raises(AuthenticationError):
        redis.Redis(port=node.port, username="hexgen-head", password="not-it", socket_timeout=5).ping()


def test_client_and_worker_are_refused_what_their_role_does_not_need(acl_redis):
    _, urls = acl_redis
    head = redis.Redis.from_url(urls["head"])
    load_library(head)  # as the head does at start-up
    work = K.work_stream("tiny")
    head.xgroup_create(work, K.PIPELINES_GROUP, id="0", mkstream=True)
    c = redis.Redis.from_url(urls["client"])
    assert c.xadd(K.REQUESTS_STREAM, {"prompt": "hi"}) and c.xadd(K.CANCEL_STREAM, {"id": "x"})
    assert c.xread({K.result_stream("x"): "0"}) == []
    for cmd in [("XRANGE", work, "-", "+"), ("XREAD", "STREAMS", work, "0"),
                ("XREADGROUP", "GROUP", K.PIPELINES_GROUP, "c", "STREAMS", work, ">"),
                ("XRANGE", K.REQUESTS_STREAM, "-", "+"),  # other clients' prompts
                ("HSET", K.worker_key("p0:0"), "pid", "1"), ("SET", K.heartbeat_key("p0:0"), "1"),
                ("HSET", K.pipeline_key("p0"), "drain", "1"), ("XADD", K.result_stream("x"), "*", "event", "done"),
                ("FLUSHALL",), ("FLUSHDB",), ("CONFIG", "GET", "*"), ("CONFIG", "SET", "appendonly", "no"),
                ("KEYS", "*"), ("SCAN", "0"), ("EVAL", "return 1", "0"), ("EVALSHA", "0" * 40, "0"),
                ("SCRIPT", "LOAD", "return 1"), ("FUNCTION", "LIST"), ("FUNCTION", "FLUSH"),
                ("FUNCTION", "LOAD", "#!lua name=x\nredis.register_function('f', function() return 1 end)"),
                ("FCALL", f"hexgen_append_{LIBRARY_NAME.split('_')[1]}", "1", work),
                ("ACL", "LIST"), ("SHUTDOWN", "NOSAVE"), ("MONITOR",)]:
        assert refused(c, *cmd), cmd
    w = redis.Redis.from_url(urls["worker"])
    for cmd in [("FLUSHALL",), ("FLUSHDB",), ("ACL", "SETUSER", "hexgen-client", "+@all"), ("ACL", "LIST"),
                ("ACL", "DELUSER", "hexgen-head"), ("CONFIG", "SET", "aclfile", "/tmp/x"), ("KEYS", "*"),
                ("EVAL", "return 1", "0"), ("SCRIPT", "LOAD", "return 1"), ("FUNCTION", "FLUSH"),
                ("FUNCTION", "DELETE", LIBRARY_NAME), ("XRANGE", K.REQUESTS_STREAM, "-", "+"),
                ("SET", K.dedupe_key("x"), "1"), ("HSET", K.PLAN_KEY, "generation", "9"),
                ("XADD", K.CANCEL_STREAM, "*", "id", "x"), ("SHUTDOWN", "NOSAVE"), ("REPLICAOF", "NO", "ONE")]:
        assert refused(w, *cmd), cmd
    # a function runs with the caller's rights: the worker cannot use the head's submit to write requests
    assert refused(w, "FCALL", f"hexgen_submit_{LIBRARY_NAME.split('_')[1]}", "3", K.dedupe_key("x"), work,
                   K.REQUESTS_STREAM, "1-0", "60", K.PIPELINES_GROUP, K.HEADS_GROUP, "9", "a", "b")
    for r in (head, c, w):
        r.close()


def test_worker_waits_for_the_head_to_load_the_library(acl_redis):
    _, urls = acl_redis
    head = redis.Redis.from_url(urls["head"])
    w = redis.Redis.from_url(urls["worker"])
    admin = redis.Redis.from_url(urls["admin"])
    load_library(head)
    admin.function_delete(LIBRARY_NAME)  # as in a new Redis before the head started
    admin.close()
    append = SyncFunction(w, "append")
    args = (K.work_stream("tiny"), K.result_stream("lib"))
    with pytest.raises(LibraryMissing):  # an outage to every retry loop
        append(args, [K.PIPELINES_GROUP, 60, 0, "", 1, "event", "x"])
    load_library(head)
    assert append(args, [K.PIPELINES_GROUP, 60, 0, "", 1, "event", "x"]) == [1]
    head.close()
    w.close()


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_head_workers_and_client_serve_under_their_own_users(acl_redis, tmp_path):
    node, urls = acl_redis
    dep = deploy(str(tmp_path), None, [PipelineSpec("p0", (1,), (4,))], url=urls["head"],
                 head_url=urls["head"], worker_url=urls["worker"])
    try:
        async with HexGenClient(urls["client"], block_ms=200, timeout_s=60) as client:
            res = await client.generate("hello world", max_new_tokens=6, ignore_eos=True)
            assert res.completion_tokens == 6 and res.finish_reason == "length"
            stream = client.stream("Once upon a time", max_new_tokens=400, ignore_eos=True)
            seen = 0
            async for _ev in stream:
                seen += 1
                if seen == 2:
                    await stream.cancel()
            assert stream.done.finish_reason == "cancelled"
        logs = dep.logs()
        assert "NOPERM" not in logs and "no permissions" not in logs, logs
    finally:
        dep.stop()
