"""Process groups of one pipeline: world, per-stage TP groups, and the CPU (gloo) side channels.

Every collective and point-to-point call of HexGen lives in this package. Tensors that carry activations
travel on the device group (NCCL on GPUs, gloo on CPUs); small metadata (step plans, sampled ids) travels
on gloo CPU groups so it never forces a device synchronisation.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import struct
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from hexgen.config import Layout, StageSpec
from hexgen.parallel.symm import DTYPES as SYMM_DTYPES
from hexgen.parallel.symm import OneShotAllReduce

log = logging.getLogger(__name__)

# Idle pipelines wait in recv for as long as no request comes; failures are detected by heartbeats.
_IDLE_TIMEOUT = timedelta(days=7)
_BCAST_HEAD = 4096  # bytes of broadcast_bytes' first message: a batch-1 decode plan is about 100


_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address
GLOO_IFNAME_ENV = "GLOO_SOCKET_IFNAME"  # the only knob torch's gloo backend reads for its interface


def local_address_towards(host: str) -> str | None:
    """This host's IPv4 address on the route to ``host`` (None when there is no route)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))  # UDP connect sends nothing; it only picks the route and source address
            return s.getsockname()[0]
    except OSError:
        return None


def interface_of(address: str) -> str | None:
    """Name of the local network interface whose IPv4 address is ``address`` (Linux), or None."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    for name in names:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                reply = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        if socket.inet_ntoa(reply[20:24]) == address:
            return name
    return None


def gloo_interface_for(init_method: str) -> str | None:
    """The interface gloo should use to reach the rendezvous host of ``init_method`` (``tcp://host:port``).

    Without ``GLOO_SOCKET_IFNAME`` gloo binds the address this machine's hostname resolves to and falls
    back to 127.0.0.1 when that address is not local: in containers and network namespaces (whose
    hostname is often 127.0.0.1 in /etc/hosts, or another machine's address) peers on other hosts would be
    told to connect to their own loopback. The interface that holds our address on the route to the
    rendezvous host is reachable by every peer that reaches the rendezvous. None when the rendezvous is on
    this host's loopback (gloo's default is then right) or the interface cannot be found.
    """
    host = urlsplit(init_method).hostname
    if not host:
        return None
    try:
        host = socket.gethostbyname(host)
    except OSError:
        return None
    if host.startswith("127."):
        return None
    addr = local_address_towards(host)
    if addr is None or addr.startswith("127."):
        return None
    return interface_of(addr)


@dataclass
class TPContext:
    """A stage's tensor-parallel group as seen by one rank; handed to the parallel layers."""

    rank: int  # rank inside the TP group
    size: int
    group: object | None = None  # device process group (None when size == 1)
    fast: OneShotAllReduce | None = None  # small all-reduces (decode steps), see enable_fast_all_reduce
    shares: tuple[int, ...] = ()  # the stage's per-rank tp-ratio shares (hexgen.shards); (): even shards

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` across the TP group; returns the sum (``x`` itself, summed in place, on the NCCL path)."""
        if self.size > 1:
            if self.fast is not None and self.fast.fits(x):
                return self.fast(x)
            dist.all_reduce(x, group=self.group)
        return x


class PipelineGroups:
    """The process groups one rank needs; constructed collectively by every rank of the pipeline."""

    def __init__(self, layout: Layout, rank: int, init_method: str, device: torch.device) -> None:
        self.layout = layout
        self.rank = rank
        self.device = device
        self.stage: StageSpec = layout.stage_of_rank(rank)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if GLOO_IFNAME_ENV not in os.environ:  # an operator's choice wins
            iface = gloo_interface_for(init_method)
            if iface is not None:
                os.environ[GLOO_IFNAME_ENV] = iface  # read by every gloo group this process creates
                log.info("rank %d: gloo uses interface %s (towards %s)", rank, iface, init_method)
        dist.init_process_group(
            backend, init_method=init_method, world_size=layout.world_size, rank=rank, timeout=_IDLE_TIMEOUT
        )
        self._device_world_is_cpu = backend == "gloo"
        self.cpu_world = (
            dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
        )
        tp_group = tp_cpu = None
        for spec in layout.stages():  # every rank must create every group, in the same order
            ranks = spec.ranks
            g = dist.new_group(ranks, timeout=_IDLE_TIMEOUT) if len(ranks) > 1 else None
            gc = (
                (g if backend == "gloo" else dist.new_group(ranks, backend="gloo", timeout=_IDLE_TIMEOUT))
                if len(ranks) > 1
                else None
            )
            if spec.index == self.stage.index:
                tp_group, tp_cpu = g, gc
        self.tp = TPContext(rank - self.stage.first_rank, self.stage.tp, tp_group, shares=self.stage.shares)
        self._tp_cpu = tp_cpu
        self._bcast_head = torch.zeros(_BCAST_HEAD, dtype=torch.uint8)  # broadcast_bytes' first message
        # Sends are asynchronous: a stage must never block on a send while its peer sends to it (stage 0
        # sending micro-batch k+1 while the last stage returns the ids of micro-batch k). Buffers stay
        # referenced here until their send completes.
        self._sends: list[tuple[object, tuple[torch.Tensor, ...]]] = []
        log.info(
            "rank %d: stage %d tp %d/%d%s on %s (%s)",
            rank,
            self.stage.index,
            self.tp.rank,
            self.tp.size,
            f" share {self.stage.shares[self.tp.rank]}/{sum(self.stage.shares)}" if self.stage.shares else "",
            device,
            backend,
        )

    # -- properties -------------------------------------------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return self.rank == self.stage.leader

    @property
    def next_leader(self) -> int:
        """The next stage's leader (there is none after the last stage)."""
        if self.stage.is_last:
            raise RuntimeError(f"stage {self.stage.index} is the last stage: no next leader")
        return self.layout.stages()[self.stage.index + 1].leader

    @property
    def prev_leader(self) -> int:
        """The previous stage's leader (there is none before the first stage)."""
        if self.stage.is_first:
            raise RuntimeError("stage 0 is the first stage: no previous leader")
        return self.layout.stages()[self.stage.index - 1].leader

    @property
    def first_leader(self) -> int:
        return 0

    @property
    def last_leader(self) -> int:
        return self.layout.stages()[-1].leader

    # -- metadata (CPU, gloo) ---------------------------------------------------------------------------
    def _isend(self, t: torch.Tensor, dst: int, group=None) -> None:
        self._sends = [(w, b) for w, b in self._sends if not w.is_completed()]
        self._sends.append((dist.isend(t, dst, group=group), (t,)))

    def wait_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()

    def send_bytes(self, payload: bytes, dst: int) -> None:
        """Send a byte string to ``dst`` (length first, then the bytes); returns without waiting."""
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.empty(0, dtype=torch.uint8)
        self._isend(torch.tensor([data.numel()], dtype=torch.int64), dst, self.cpu_world)
        if data.numel():
            self._isend(data, dst, self.cpu_world)

    def recv_bytes(self, src: int) -> bytes:
        n = torch.empty(1, dtype=torch.int64)
        dist.recv(n, src, group=self.cpu_world)
        data = torch.empty(int(n.item()), dtype=torch.uint8)
        if data.numel():
            dist.recv(data, src, group=self.cpu_world)
        return data.numpy().tobytes()

    def broadcast_bytes(self, payload: bytes | None) -> bytes:
        """Leader → every rank of this stage; returns the payload on every rank.

        One gloo broadcast of a fixed ``_BCAST_HEAD``-byte message (length + the payload's start) carries
        a decode step's plan whole; a longer payload sends its remainder in a second broadcast."""
        if self.tp.size == 1:
            return payload if payload is not None else b""
        src = self.stage.leader
        head = self._bcast_head
        if self.is_leader:
            n = len(payload)
            head[:8] = torch.tensor([n], dtype=torch.int64).view(torch.uint8)
            first = min(n, _BCAST_HEAD - 8)
            if first:
                head[8 : 8 + first] = torch.frombuffer(bytearray(payload[:first]), dtype=torch.uint8)
        dist.broadcast(head, src, group=self._tp_cpu)
        if self.is_leader:
            if n > first:
                dist.broadcast(torch.frombuffer(bytearray(payload[first:]), dtype=torch.uint8), src, group=self._tp_cpu)
            return payload
        n = int(head[:8].view(torch.int64).item())
        first = min(n, _BCAST_HEAD - 8)
        data = head[8 : 8 + first].numpy().tobytes()
        if n > first:
            rest = torch.empty(n - first, dtype=torch.uint8)
            dist.broadcast(rest, src, group=self._tp_cpu)
            data += rest.numpy().tobytes()
        return data

    # -- activations (device group) ---------------------------------------------------------------------
    def send_hidden(self, hidden: torch.Tensor, dst: int) -> None:
        if hidden.numel():
            self._isend(hidden.contiguous(), dst)

    def recv_hidden(self, shape: tuple[int, int], dtype: torch.dtype, src: int) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=self.device)
        if out.numel():
            dist.recv(out, src)
        return out

    def broadcast_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Leader's hidden states to every rank of this stage (``hidden`` pre-allocated on followers)."""
        if self.tp.size > 1 and hidden.numel():
            dist.broadcast(hidden, self.stage.leader, group=self.tp.group)
        return hidden

    def broadcast_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Leader's sampled token ids [n] (int64, on the device) to every rank of this stage, enqueued on the
        stream with no host sync (``ids`` pre-allocated on followers): asynchronous steps with TP > 1."""
        return self.broadcast_hidden(ids)

    def enable_fast_all_reduce(self, max_elems: int, dtype: torch.dtype) -> bool:
        """Route this stage's TP all-reduces of up to ``max_elems`` elements through the symmetric-memory
        one-shot kernel (checked against NCCL first); NCCL stays for larger ones. Collective over the TP
        group. False (NCCL only) without CUDA, for TP 1 or for fp16 (``KernelConfig.all_reduce`` nccl: the
        runner does not call this)."""
        if self.tp.size == 1 or self.device.type != "cuda" or dtype not in SYMM_DTYPES:
            return False
        try:
            fast = OneShotAllReduce(self.tp.group, max_elems, dtype, self.device)
            fast.check(self.tp.group, self.device)
        except (RuntimeError, ImportError, AttributeError) as e:  # every rank fails the same check
            log.warning("stage %d: symmetric-memory all-reduce unavailable (%s); using NCCL", self.stage.index, e)
            return False
        self.tp.fast = fast
        log.info("stage %d: one-shot symmetric-memory all-reduce up to %d elements", self.stage.index, max_elems)
        return True

    def world_min(self, value: int) -> int:
        """Minimum of an integer over every rank of the pipeline (e.g. KV blocks that fit everywhere)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_world)
        return int(t.item())

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_world)

    def close(self) -> None:
        self.wait_sends()
        if dist.is_initialized():
            dist.destroy_process_group()
