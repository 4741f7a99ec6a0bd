"""The placement agent: ``bin/worker`` without ``--stage``. It offers this host's devices to the planning head
and runs whatever stages it is assigned.

1. Registers ``hexgen:agent:<id>`` (node, device type, count, memory per device, device indices, a fresh
   instance token) and heartbeats ``hexgen:agent-hb:<id>`` from a daemon thread
   (:mod:`workers.agent_registry`).
2. A listener thread blocks with XREAD on ``hexgen:assign:<id>`` and hands every assignment addressed to this
   instance to the main thread.
3. The main thread reconciles: each assigned role (one stage of one planned pipeline) runs as a child process
   running the ordinary :class:`workers.supervisor.Worker` with a Settings whose only pipeline is the assigned one.
   Roles no longer assigned are drained first (SIGTERM to their child: the Worker sets the pipeline's drain
   flag, in-flight requests finish), then new roles start. Roles kept by a re-plan keep running. An agent
   left out of the plan idles.
4. SIGTERM/SIGINT drains every role, deregisters (the head re-plans at once) and exits 0; a second signal kills
   the roles. A role child whose agent died (SIGKILL) drains itself.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import re
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

from hexgen import __version__
from hexgen.errors import ConfigError
from hexgen.logutil import setup_logging
from hexgen.wire import keys as C
from hexgen.wire.connection import REDIS_ERRORS
from hexgen.wire.placement import AgentRecord, Assignment, Role
from hexgen.wire.settings import PipelineSettings, Settings, sync_redis
from workers.agent_registry import AgentHeartbeat, AgentRegistry

log = logging.getLogger(__name__)

EXIT_OK, EXIT_CONFIG = 0, 2
CPU_DEVICE = "CPU"


@dataclass(frozen=True)
class AgentOptions:
    """One agent: what it offers (node, device type, memory, devices) and how its roles' workers run."""

    settings: Settings
    agent_id: str
    node: str
    device_type: str  # a DeviceSpec name
    memory: int  # bytes per device
    devices: tuple[int, ...]  # physical device indices offered
    advertise_host: str | None = None
    drain_timeout_s: float = 120.0
    restart: bool = True
    max_restarts: int = 10
    engine_overrides: dict = field(default_factory=dict, compare=False, hash=False)
    io_overrides: dict = field(default_factory=dict, compare=False, hash=False)
    log_level: str | None = None

    def __post_init__(self) -> None:
        for name in ("agent_id", "node"):
            if not re.fullmatch(C.ID_PATTERN, getattr(self, name) or ""):
                raise ConfigError(
                    f"--{name.replace('_', '-')}: {getattr(self, name)!r} is not allowed; use {C.ID_ALLOWED_CHARS}"
                )
        if not self.devices:
            raise ConfigError("--devices: the agent offers no device")
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ConfigError(f"--memory-gib: {self.memory!r} bytes per device must be ≥ 1")


def detect_devices(
    settings: Settings, devices: tuple[int, ...], gpu_type: str | None, memory_gib: float | None
) -> tuple[str, int, tuple[int, ...]]:
    """(device type, memory bytes per device, device indices) this host offers.

    CPU deployments offer ``len(devices)`` (default 1) "CPU" devices with the host's memory each (or
    ``memory_gib``); CUDA ones the given (default: all visible) GPUs, which must be of one type.
    """
    from hexgen.planner.devices import device_spec
    from hexgen.planner.placement import gpu_type_name

    override = int(memory_gib * 2**30) if memory_gib else 0
    if settings.device != "cuda":
        memory = override or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return device_spec(gpu_type).name if gpu_type else CPU_DEVICE, memory, devices or (0,)
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("device: the config says cuda but no CUDA device is visible")
    devices = devices or tuple(range(torch.cuda.device_count()))
    names = {torch.cuda.get_device_name(d) for d in devices}
    if len(names) > 1 and not gpu_type:
        raise ConfigError(
            f"--devices: {sorted(names)} are of different types; start one agent per type with --devices and --node"
        )
    kind = device_spec(gpu_type).name if gpu_type else gpu_type_name(names.pop())
    memory = override or min(int(torch.cuda.get_device_properties(d).total_memory) for d in devices)
    return kind, memory, devices


def role_options(opts: AgentOptions, role: Role):
    """WorkerOptions of one assigned role: the agent's settings with the role's pipeline as the only one."""
    from workers.options import WorkerOptions

    pipe = PipelineSettings(role.pipeline, role.hetero_config, role.pp_partition)
    settings = replace(opts.settings, pipelines=(pipe,))
    return WorkerOptions(
        settings=settings,
        pipeline_id=role.pipeline,
        stage=role.stage,
        devices=role.devices if settings.device == "cuda" else (),
        advertise_host=opts.advertise_host,
        drain_timeout_s=opts.drain_timeout_s,
        restart=opts.restart,
        max_restarts=opts.max_restarts,
        engine_overrides=dict(opts.engine_overrides),
        io_overrides=dict(opts.io_overrides),
        log_level=opts.log_level,
    )


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    log.warning("the agent (pid %d) is gone; draining this role", parent)
    os.kill(os.getpid(), signal.SIGTERM)


def role_main(wopts, parent: int) -> None:
    """Entry point of one role's child process: run the stage's Worker until it drains."""
    from workers.supervisor import Worker

    setup_logging("parent", wopts.stage, wopts.log_level)
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    try:
        worker = Worker(wopts)
    except ConfigError as e:
        log.error("cannot run %s stage %d: %s", wopts.pipeline_id, wopts.stage, e)
        sys.exit(EXIT_CONFIG)
    sys.exit(worker.run())


class Agent:
    """One agent process (see the module doc). ``run()`` returns the exit status."""

    def __init__(self, opts: AgentOptions) -> None:
        self.opts = opts
        s = opts.settings
        self.record = AgentRecord(
            id=opts.agent_id,
            node=opts.node,
            host=socket.gethostname(),
            device_type=opts.device_type,
            count=len(opts.devices),
            memory=opts.memory,
            devices=opts.devices,
            instance=uuid.uuid4().hex[:16],
            pid=os.getpid(),
            version=__version__,
            model=s.model.name,
        )
        self.client = sync_redis(s.redis.url, socket_timeout=10.0, socket_connect_timeout=5.0)
        self.reader = sync_redis(s.redis.url, socket_timeout=s.limits.socket_timeout_s, socket_connect_timeout=5.0)
        self.registry = AgentRegistry(self.client, self.record, s.limits.heartbeat_ttl_s)
        self.heartbeat = AgentHeartbeat(self.registry, s.limits.heartbeat_interval_s, self._on_replaced)
        self.ctx = mp.get_context("spawn")
        self.roles: dict[Role, mp.process.BaseProcess] = {}
        self.reported: set[int] = set()  # pids of role children whose exit was logged
        self.assignments: queue.Queue[Assignment] = queue.Queue()
        self.signals = 0
        self.replaced = False
        self.generation = 0

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1

    def _on_replaced(self) -> None:
        self.replaced = True

    @property
    def stopping(self) -> bool:
        return self.signals > 0 or self.replaced

    def register(self) -> str | None:
        """Register (retrying while Redis is down); the assignment stream id to read after, None if stopped."""
        while not self.stopping:
            try:
                after = self.registry.last_entry_id()
                self.registry.register()
                self.heartbeat.start()
                return after
            except REDIS_ERRORS as e:
                log.warning(
                    "cannot register agent (Redis %s unreachable: %s); retrying",
                    self.opts.settings.redis.display_url,
                    e,
                )
                time.sleep(2.0)
        return None

    def listen(self, after: str) -> None:
        """Listener thread: XREAD BLOCK the assignment stream; queue each assignment for this instance."""
        block = self.opts.settings.limits.block_ms
        while not self.stopping:
            try:
                after, found = self.registry.next_assignment(self.reader, after, block)
            except REDIS_ERRORS as e:
                log.warning("agent: cannot read assignments (%s); retrying", e)
                time.sleep(1.0)
                continue
            if found is not None:
                self.assignments.put(found)

    def reconcile(self, a: Assignment) -> None:
        """Drain roles the assignment drops, then start the roles it adds (or whose child has exited)."""
        if a.generation < self.generation:
            return
        self.generation = a.generation
        wanted = set(a.roles)
        log.info("plan generation %d: %s", a.generation, "; ".join(r.describe() for r in a.roles) or "idle")
        dropped = [r for r in self.roles if r not in wanted]
        self.stop_roles(dropped)
        if self.stopping:  # a signal arrived while the dropped roles drained
            return
        for role in a.roles:
            proc = self.roles.get(role)
            if proc is not None and proc.is_alive():
                continue
            wopts = role_options(self.opts, role)
            proc = self.ctx.Process(
                target=role_main,
                args=(wopts, os.getpid()),
                name=f"hexgen-{role.pipeline}-stage{role.stage}",
                daemon=False,
            )
            proc.start()
            self.roles[role] = proc
            log.info("started %s (pid %d)", role.describe(), proc.pid)

    def stop_roles(self, roles: list[Role]) -> None:
        """SIGTERM the roles' workers (they drain their pipelines) and wait; a second signal kills them."""
        procs = [self.roles.pop(r) for r in roles]
        for r, p in zip(roles, procs):
            if p.is_alive() and p.pid is not None:
                log.info("draining %s", r.describe())
                os.kill(p.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.opts.drain_timeout_s + 15
        for p in procs:
            while p.is_alive() and time.monotonic() < deadline and self.signals < 2:
                p.join(0.2)
            if p.is_alive():
                log.warning("killing role pid %d", p.pid)
                p.kill()
            p.join()

    def run(self) -> int:
        """Register, then follow assignments until a signal; drain, deregister."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            after = self.register()
            if after is None:
                return EXIT_OK
            threading.Thread(target=self.listen, args=(after,), name="assignments", daemon=True).start()
            log.info(
                "agent %s: waiting for an assignment from the planning head (bin/head --auto-plan)", self.record.id
            )
            while not self.stopping:
                try:
                    a = self.assignments.get(timeout=0.2)
                except queue.Empty:
                    self._reap()
                    continue
                while not self.assignments.empty():  # only the newest one matters
                    a = self.assignments.get_nowait()
                self.reconcile(a)
            log.info("agent %s: stopping; draining %d role(s)", self.record.id, len(self.roles))
            self.stop_roles(list(self.roles))
            return EXIT_CONFIG if self.replaced else EXIT_OK
        finally:
            if self.roles:
                self.stop_roles(list(self.roles))
            self.heartbeat.stop(timeout_s=1.0)
            try:
                self.registry.deregister()
            except REDIS_ERRORS as e:
                log.warning("could not deregister the agent: %s", e)
            self.client.close()
            for s, handler in old.items():
                signal.signal(s, handler)

    def _reap(self) -> None:
        for role, p in self.roles.items():
            if p.exitcode is not None and p.pid is not None and p.pid not in self.reported:
                self.reported.add(p.pid)
                (log.info if p.exitcode == 0 else log.warning)(
                    "%s exited with status %d; waiting for the next assignment", role.describe(), p.exitcode
                )
