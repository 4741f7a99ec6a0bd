"""Worker registration, heartbeats and pipeline formation through Redis.

Every TP rank of every stage registers ``hexgen:worker:<pipeline>:<rank>`` (a hash of plain strings, see
:class:`~hexgen.wire.records.WorkerRecord`) with a fresh random ``instance`` token, and refreshes
``hexgen:hb:<pipeline>:<rank>`` (value: time of the beat, with a TTL) from a daemon thread.

Formation, one **generation** at a time:

1. Global rank 0 (stage 0, TP rank 0) waits until all Σtp ranks of its pipeline are registered with a live
   heartbeat and the same layout and model, then picks a free port and publishes, in one transaction,
   ``hexgen:pipeline:<pid>``: ``generation`` (incremented), ``rendezvous`` (``tcp://host:port``),
   ``members`` (the instance token of each rank, in rank order) and ``state forming``.
2. Every other rank waits until ``members`` lists its own instance token at its rank, then uses that
   generation's rendezvous address. A rank that restarted registers a new token, so it never joins an older
   generation's address; nobody edits addresses by hand.
3. While a generation runs, each rank's watchdog (:meth:`Registry.check_peers`) compares the live registry
   with the generation's members: a missing heartbeat, a changed instance token (the peer restarted) or a
   newer generation means the peer group is broken and the rank should exit so the pipeline re-forms.
4. A rank that could not refresh its heartbeat for longer than its TTL (its host cut off from Redis) has
   dropped out as far as its peers can tell: they exit and re-form without it. So before it writes a
   heartbeat again it checks its generation (:meth:`Registry.check_peers` with ``after_lapse``): if the
   pipeline re-formed or a peer restarted meanwhile, it exits without beating, and never revives a record
   its peers already gave up on. If nothing changed (Redis itself was away, for everyone), it carries on.

The rendezvous host is ``127.0.0.1`` when every rank runs on the leader's host, else the leader's address on
the route to Redis, unless one is configured (``advertise_host``). "The leader's host" means the same
hostname *and* the same address towards Redis (each rank registers that as ``addr``): network namespaces
and containers often share a hostname without sharing a loopback.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from hexgen.errors import HexGenError
from hexgen.procs import free_port
from hexgen.wire import keys as C
from hexgen.wire.connection import REDIS_ERRORS
from hexgen.wire.records import PipelineRecord, WorkerRecord
from hexgen.wire.redis_url import RedisUrlError, parse_redis_url
from hexgen.wire.text import as_text

log = logging.getLogger(__name__)

STATE_FORMING, STATE_READY, STATE_DEGRADED, STATE_STOPPED = C.PIPELINE_STATES
STATE_DRAINING = "draining"  # extra state: the pipeline takes no new work and finishes what it holds


class RegistryError(HexGenError):
    """Pipeline formation failed: mismatched ranks, or no rendezvous before the deadline."""


def worker_id(pipeline_id: str, rank: int) -> str:
    """Registry id of one rank: ``<pipeline>:<global rank>``."""
    return f"{pipeline_id}:{rank}"


def routable_address(redis_url: str) -> str:
    """This host's IPv4 address on the route towards the Redis server (what peers on other hosts can reach);
    for a ``redis+sentinel://`` URL, towards its first sentinel; a unix socket: the hostname's address."""
    try:
        hosts = parse_redis_url(redis_url).hosts
    except RedisUrlError:
        hosts = ()
    target, port = hosts[0] if hosts else ("127.0.0.1", 6379)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((target, port))  # UDP connect sends nothing; it only picks a route
            addr = s.getsockname()[0]
    except OSError:
        addr = "127.0.0.1"
    if addr.startswith("127."):
        try:
            addr = socket.gethostbyname(socket.gethostname())
        except OSError:
            pass
    return addr


@dataclass(frozen=True)
class Generation:
    """One formation of a pipeline: its number, rendezvous address and the instance token of each rank."""

    number: int
    rendezvous: str
    members: tuple[str, ...]


class Registry:
    """Registry operations of one pipeline, on a synchronous redis-py client (thread-safe, pooled)."""

    def __init__(
        self,
        client: redis.Redis,
        pipeline_id: str,
        *,
        world_size: int,
        layout: str,
        model: str,
        heartbeat_ttl_s: int = C.HEARTBEAT_TTL_S,
    ) -> None:
        self.r = client
        self.pipeline_id = pipeline_id
        self.world_size = world_size
        self.layout = layout
        self.model = model
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.key = C.pipeline_key(pipeline_id)

    # ---- one rank ----------------------------------------------------------------------------------------

    def new_record(
        self, rank: int, stage: int, tp_rank: int, *, device: str, memory: int, version: str, address: str = ""
    ) -> WorkerRecord:
        """A fresh registration record for ``rank`` with a new random instance token; ``address``: this
        host's address on the route to Redis (:func:`routable_address`)."""
        return WorkerRecord(
            pipeline=self.pipeline_id,
            stage=stage,
            tp_rank=tp_rank,
            host=socket.gethostname(),
            device=device,
            memory=memory,
            pid=os.getpid(),
            version=version,
            model=self.model,
            extra={
                "rank": str(rank),
                "instance": uuid.uuid4().hex[:16],
                "layout": self.layout,
                "world_size": str(self.world_size),
                "started": f"{time.time():.3f}",
                "addr": address,
            },
        )

    def register(self, rank: int, record: WorkerRecord) -> None:
        """Write the record (replacing an older instance's) and the first heartbeat."""
        wid = worker_id(self.pipeline_id, rank)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(C.worker_key(wid))
        pipe.hset(C.worker_key(wid), mapping=record.to_fields())
        pipe.set(C.heartbeat_key(wid), f"{time.time():.3f}", ex=self.heartbeat_ttl_s)
        pipe.execute()
        log.info("registered worker %s (instance %s)", wid, record.extra["instance"])

    def beat(self, rank: int, record: WorkerRecord) -> None:
        """Refresh the heartbeat; rewrite the record too in case Redis lost it (restart without AOF)."""
        wid = worker_id(self.pipeline_id, rank)
        pipe = self.r.pipeline(transaction=False)
        pipe.set(C.heartbeat_key(wid), f"{time.time():.3f}", ex=self.heartbeat_ttl_s)
        pipe.hset(C.worker_key(wid), mapping=record.to_fields())
        pipe.execute()

    def deregister(self, rank: int, instance: str) -> None:
        """Remove this rank's record and heartbeat, unless a newer instance already replaced them."""
        wid = worker_id(self.pipeline_id, rank)
        current = self.r.hget(C.worker_key(wid), "instance")
        if current is not None and as_text(current) != instance:
            return
        self.r.delete(C.worker_key(wid), C.heartbeat_key(wid))
        log.info("deregistered worker %s", wid)

    # ---- the pipeline ------------------------------------------------------------------------------------

    def ranks(self) -> list[tuple[WorkerRecord | None, bool]]:
        """(record or None, heartbeat alive) of every rank of the pipeline, in rank order."""
        pipe = self.r.pipeline(transaction=False)
        for rank in range(self.world_size):
            wid = worker_id(self.pipeline_id, rank)
            pipe.hgetall(C.worker_key(wid))
            pipe.exists(C.heartbeat_key(wid))
        res = pipe.execute()
        out = []
        for rank in range(self.world_size):
            fields, alive = res[2 * rank], res[2 * rank + 1]
            out.append((WorkerRecord.from_fields(fields) if fields else None, bool(alive)))
        return out

    def record(self) -> PipelineRecord | None:
        fields = self.r.hgetall(self.key)
        return PipelineRecord.from_fields(fields) if fields else None

    def generation(self) -> Generation | None:
        """The latest published generation, or None before the first formation."""
        rec = self.record()
        if rec is None or not rec.rendezvous or "generation" not in rec.extra:
            return None
        members = tuple(rec.extra.get("members", "").split(","))
        return Generation(int(rec.extra["generation"]), rec.rendezvous, members)

    def _mismatch(self, rank: int, rec: WorkerRecord) -> str | None:
        if rec.extra.get("layout") != self.layout or rec.model != self.model:
            return (
                f"rank {rank} ({rec.host} pid {rec.pid}) registered layout {rec.extra.get('layout')!r} "
                f"model {rec.model!r}, but this rank has layout {self.layout!r} model {self.model!r}; "
                "start every stage of a pipeline with the same config"
            )
        return None

    def publish(self, address: str, members: list[str]) -> Generation:
        """Leader: publish a new generation (state forming) and return it."""
        pipe = self.r.pipeline(transaction=True)
        pipe.hincrby(self.key, "generation", 1)
        pipe.hset(
            self.key,
            mapping={
                "state": STATE_FORMING,
                "layout": self.layout,
                "rendezvous": address,
                "members": ",".join(members),
                "model": self.model,
                "world_size": str(self.world_size),
                "drain": "0",
                "formed_at": f"{time.time():.3f}",
            },
        )
        number = int(pipe.execute()[0])
        log.info("pipeline %s generation %d: rendezvous %s", self.pipeline_id, number, address)
        return Generation(number, address, tuple(members))

    def form(
        self,
        instance: str,
        *,
        advertise_host: str | None,
        redis_url: str,
        timeout_s: float = 0.0,
        stop: threading.Event | None = None,
        interval_s: float = 0.2,
    ) -> Generation:
        """Leader (global rank 0): wait for every rank, then publish a new generation.

        ``timeout_s`` 0 waits forever (logging the missing ranks now and then). Raises RegistryError on a
        rank whose layout or model differs, or on timeout; returns early with RegistryError when ``stop``
        is set.
        """
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
        last_log = 0.0
        while True:
            ranks = self._read(deadline, stop, "form the pipeline", self.ranks)
            missing = [i for i, (rec, alive) in enumerate(ranks) if rec is None or not alive]
            for i, (rec, _) in enumerate(ranks):
                if rec is not None and (problem := self._mismatch(i, rec)):
                    raise RegistryError(f"pipeline {self.pipeline_id}: {problem}")
            if not missing and ranks[0][0] is not None and ranks[0][0].extra.get("instance") == instance:
                members = [rec.extra.get("instance", "") for rec, _ in ranks if rec is not None]
                places = {(rec.host, rec.extra.get("addr", "")) for rec, _ in ranks if rec is not None}
                one_host = len(places) == 1 and ranks[0][0].host == socket.gethostname()
                host = advertise_host or ("127.0.0.1" if one_host else routable_address(redis_url))
                bind = "0.0.0.0" if host not in ("127.0.0.1", "localhost") else host
                return self.publish(f"tcp://{host}:{free_port(bind)}", members)
            if time.monotonic() - last_log > 10:
                log.info("pipeline %s: waiting for ranks %s to register", self.pipeline_id, missing)
                last_log = time.monotonic()
            time.sleep(interval_s)

    def join(
        self,
        rank: int,
        instance: str,
        *,
        timeout_s: float = 0.0,
        stop: threading.Event | None = None,
        interval_s: float = 0.2,
    ) -> Generation:
        """Non-leader: wait for a generation whose members list this rank's own instance token."""
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
        last_log = 0.0
        while True:
            gen = self._read(deadline, stop, "join a rendezvous", self.generation)
            if gen is not None and len(gen.members) > rank and gen.members[rank] == instance:
                log.info("pipeline %s: joining generation %d at %s", self.pipeline_id, gen.number, gen.rendezvous)
                return gen
            if time.monotonic() - last_log > 10:
                log.info(
                    "pipeline %s rank %d: waiting for the leader (global rank 0) to publish a rendezvous",
                    self.pipeline_id,
                    rank,
                )
                last_log = time.monotonic()
            time.sleep(interval_s)

    def _read(self, deadline: float | None, stop: threading.Event | None, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` retried through Redis outages; RegistryError on ``stop`` or past ``deadline``."""
        while True:
            if stop is not None and stop.is_set():
                raise RegistryError(f"pipeline {self.pipeline_id}: stopped while waiting to {what}")
            if deadline is not None and time.monotonic() > deadline:
                raise RegistryError(
                    f"pipeline {self.pipeline_id}: no {what} before the deadline; is every "
                    "stage's worker running with this pipeline id and config?"
                )
            try:
                return fn()
            except REDIS_ERRORS as e:
                log.warning(
                    "pipeline %s: Redis unreachable while waiting to %s (%s); retrying", self.pipeline_id, what, e
                )
                time.sleep(1.0)

    def restore(self, gen: Generation) -> None:
        """Leader: write the running generation back when Redis lost the pipeline's record (a new, empty
        server); the peers' own heartbeats rewrite their registrations."""
        if not self.r.hsetnx(self.key, "generation", gen.number):
            return
        self.r.hset(
            self.key,
            mapping={
                "state": STATE_READY,
                "layout": self.layout,
                "rendezvous": gen.rendezvous,
                "members": ",".join(gen.members),
                "model": self.model,
                "world_size": str(self.world_size),
                "drain": "0",
                "formed_at": f"{time.time():.3f}",
            },
        )
        log.warning("pipeline %s: Redis had lost its record; restored generation %d", self.pipeline_id, gen.number)

    def check_peers(self, rank: int, gen: Generation, after_lapse: bool = False) -> str | None:
        """Why this rank's peer group is broken (a peer gone, restarted or re-formed), or None when healthy.

        Peers are not checked while the pipeline drains: ranks leave one by one as they finish.
        ``after_lapse`` (this rank's own heartbeat lapsed; module doc, point 4): only a newer generation or a
        peer registered under another instance count; missing heartbeats and records do not, since every
        heartbeat lapses when Redis itself was away.
        """
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(self.key, ["generation", "state"])
        for peer in range(self.world_size):
            wid = worker_id(self.pipeline_id, peer)
            pipe.exists(C.heartbeat_key(wid))
            pipe.hget(C.worker_key(wid), "instance")
        res = pipe.execute()
        number, state = (as_text(v) if v is not None else None for v in res[0])
        if number is None and rank == 0:
            self.restore(gen)
        if state in (STATE_DRAINING, STATE_STOPPED):
            return None
        if number is not None and int(number) != gen.number:
            return f"pipeline re-formed as generation {number} (this rank is in generation {gen.number})"
        return self._peer_problem(rank, gen, res[1:], after_lapse)

    def _peer_problem(self, rank: int, gen: Generation, res: list[Any], after_lapse: bool) -> str | None:
        """``res``: (heartbeat exists, instance) of every rank, flattened, as :meth:`check_peers` read them."""
        for peer in range(self.world_size):
            if peer == rank:
                continue
            alive, inst = res[2 * peer], res[1 + 2 * peer]
            if after_lapse:
                if inst is not None and as_text(inst) != gen.members[peer]:
                    return f"peer rank {peer} restarted (instance changed) while this rank was cut off"
                continue
            if not alive:
                return f"peer rank {peer} lost its heartbeat"
            if inst is None or as_text(inst) != gen.members[peer]:
                return f"peer rank {peer} restarted (instance changed)"
        return None

    def set_state(self, state: str, gen: Generation | None = None) -> None:
        """Set the pipeline's state; with ``gen``, only if that generation is still the current one."""
        set_pipeline_state(self.r, self.pipeline_id, state, gen.number if gen is not None else None)

    def request_drain(self) -> None:
        """Ask the whole pipeline to drain (any stage may ask; the stage-0 leader's source acts on it)."""
        request_drain(self.r, self.pipeline_id)

    def drain_requested(self) -> bool:
        return as_text(self.r.hget(self.key, "drain") or "") == "1"


def request_drain(client: redis.Redis, pipeline_id: str) -> None:
    """Set the pipeline's drain flag: its stage-0 source takes no more work, and its ranks exit once idle."""
    client.hset(C.pipeline_key(pipeline_id), mapping={"drain": "1", "state": STATE_DRAINING})


def set_pipeline_state(client: redis.Redis, pipeline_id: str, state: str, generation: int | None = None) -> bool:
    """Set ``hexgen:pipeline:<pid>`` state; with ``generation``, only while it is the current one (atomic)."""
    key = C.pipeline_key(pipeline_id)
    with client.pipeline(transaction=True) as pipe:
        try:
            pipe.watch(key)
            current = pipe.hget(key, "generation")
            if generation is not None and (current is None or int(current) != generation):
                return False
            pipe.multi()
            pipe.hset(key, "state", state)
            pipe.execute()
            return True
        except redis.WatchError:
            return False


class Heartbeat(threading.Thread):
    """Daemon thread: refreshes one rank's heartbeat every ``interval_s`` and runs ``on_tick`` after it.

    Redis errors are logged (rate-limited) and retried on the next tick; they never stop the thread.
    ``on_tick`` returning a string means "peer group broken": the thread calls ``on_broken`` with it after
    ``strikes`` consecutive such answers (one miss can be a heartbeat racing its TTL after a Redis hiccup).
    Once no beat succeeded for longer than the heartbeat TTL, ``rejoin`` (when watching) runs before the next
    beat, and a string from it calls ``on_broken`` at once, without beating (module doc, point 4).
    """

    def __init__(
        self, registry: Registry, rank: int, record: WorkerRecord, interval_s: float, *, strikes: int = 2
    ) -> None:
        super().__init__(name=f"heartbeat-{rank}", daemon=True)
        self.registry = registry
        self.rank = rank
        self.record = record
        self.interval_s = interval_s
        self.strikes = strikes
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._check: Callable[[], str | None] | None = None
        self._on_broken: Callable[[str], Any] | None = None
        self._rejoin: Callable[[], str | None] | None = None
        self._bad = 0
        self._last_error = 0.0
        self._last_beat = time.monotonic()

    def watch(
        self,
        check: Callable[[], str | None],
        on_broken: Callable[[str], Any],
        rejoin: Callable[[], str | None] | None = None,
    ) -> None:
        """Start checking peers with ``check`` after each beat (and ``rejoin`` after a lapse)."""
        with self._lock:
            self._check, self._on_broken, self._rejoin, self._bad = check, on_broken, rejoin, 0

    def unwatch(self) -> None:
        with self._lock:
            self._check = self._on_broken = self._rejoin = None

    @property
    def lapsed(self) -> bool:
        """No beat succeeded for longer than the heartbeat TTL: peers count this rank as gone."""
        return time.monotonic() - self._last_beat > self.registry.heartbeat_ttl_s

    def stop(self, timeout_s: float = 5.0) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout_s)

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            try:
                with self._lock:
                    check, on_broken, rejoin = self._check, self._on_broken, self._rejoin
                if self.lapsed and rejoin is not None and on_broken is not None:
                    problem = rejoin()
                    if problem is not None and not self._halt.is_set():
                        on_broken(problem)
                        continue
                self.registry.beat(self.rank, self.record)
                self._last_beat = time.monotonic()
                problem = check() if check is not None else None
            except REDIS_ERRORS as e:
                self._bad = 0  # a Redis outage is not a dead peer
                if time.monotonic() - self._last_error > 10:
                    log.warning(
                        "heartbeat: Redis unreachable (%s); retrying every %.1fs%s",
                        e,
                        self.interval_s,
                        "; the heartbeat has lapsed, so the generation is checked before the next beat"
                        if self.lapsed
                        else "",
                    )
                    self._last_error = time.monotonic()
                continue
            if problem is None:
                self._bad = 0
                continue
            self._bad += 1
            if self._bad >= self.strikes and on_broken is not None and not self._halt.is_set():
                on_broken(problem)
