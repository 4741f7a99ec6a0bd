"""One replica of the discrete-event simulator: HexGen's stage-0 scheduler and its pipeline of stage servers.

The scheduler mirrors hexgen/engine/scheduler.py: each micro-batch takes decodes and (chunked) prefills of idle
sequences under a token budget, at most ceil(sequences / P) of them, with KV blocks allocated as chunks advance
and the youngest idle sequence preempted (and later recomputed) when the cache is full. The leader mirrors
hexgen/engine/pipeline.py FirstLeader: it computes stage 0 itself, keeps up to P micro-batches in flight, and a
sequence is schedulable again only once its micro-batch's sampled ids are back at stage 0.

Stages are FIFO servers with busy-until times. Micro-batches enter every stage in launch order, so when a
micro-batch is launched its start and end on every stage follow from the stages' busy-until times; the event
heap then only needs the leader's own events (stage 0 free, a result back at stage 0, an arrival).

One simplification: a result that reaches stage 0 while the leader computes is applied as soon as the leader is
free (the real loop reads it when it has nothing else to launch or P micro-batches are in flight).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

# Event priorities at equal times: results first (they free sequences), then arrivals, then the leader's turn.
RESULT, ARRIVAL, LEADER_FREE = 0, 1, 2

Push = Callable[[float, int, int, object], None]  # (time, priority, replica index, payload)


@dataclass
class StageModel:
    """Costs of one pipeline stage: ``time(tokens, context)`` for one micro-batch, and ``hop(tokens)`` to send
    its hidden states to the next stage (unused on the last stage)."""

    time: Callable[[int, int], float]
    hop: Callable[[int], float]


class SimSeq:
    """One request's state inside the simulator."""

    __slots__ = ("rid", "prompt", "target", "arrival", "num_tokens", "num_computed", "blocks", "in_flight",
                 "generated", "running", "first_token", "done_at", "rejected", "replica")

    def __init__(self, rid: int, prompt: int, output: int, arrival: float) -> None:
        self.rid, self.prompt, self.target, self.arrival = rid, prompt, output, arrival
        self.num_tokens = prompt  # prompt + generated so far
        self.num_computed = 0  # tokens whose K/V are cached
        self.blocks = 0
        self.in_flight = 0  # tokens of the chunk now in the pipeline
        self.generated = 0
        self.running = False
        self.first_token: float | None = None
        self.done_at: float | None = None
        self.rejected = False
        self.replica = -1


class MicroBatch:
    __slots__ = ("items", "tokens", "emit_at")

    def __init__(self, items: list[tuple[SimSeq, int]], tokens: int) -> None:
        self.items, self.tokens = items, tokens
        self.emit_at = 0.0  # the last stage finishes (tokens reach the output sink)


class ReplicaSim:
    """A replica: continuous-batching scheduler at stage 0 plus its stages as FIFO servers."""

    def __init__(self, index: int, stages: list[StageModel], return_latency: float, *, num_blocks: int,
                 block_size: int, max_num_seqs: int, max_batched_tokens: int, max_len: int,
                 max_in_flight: int) -> None:
        self.index = index
        self.stages = stages
        self.return_latency = return_latency
        self.free_blocks = num_blocks
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.max_len = min(max_len, num_blocks * block_size)
        self.max_in_flight = max_in_flight
        self.waiting: deque[SimSeq] = deque()
        self.running: list[SimSeq] = []
        self.in_flight: deque[MicroBatch] = deque()
        self.busy = [0.0] * len(stages)  # busy-until of each stage
        self.pending: list[MicroBatch] = []  # results back while the leader computes stage 0
        self.preemptions = 0
        self.steps = 0
        self.peak_running = 0
        self.stage_busy_s = [0.0] * len(stages)

    # -- admission ------------------------------------------------------------------------------------
    @property
    def free_capacity(self) -> int:
        """Requests the leader would still pull from the work stream (max_num_seqs less running and queued)."""
        return max(0, self.max_num_seqs - len(self.running) - len(self.waiting))

    @property
    def polling(self) -> bool:
        """The leader is idle, polling its source: a new request starts a step at once."""
        return not self.in_flight

    def add(self, seq: SimSeq) -> bool:
        """Queue ``seq``; False (and the request rejected) when its prompt leaves no room in the context."""
        seq.replica = self.index
        room = self.max_len - seq.prompt
        if room < 1 or seq.target < 1:
            seq.rejected = True
            return False
        seq.target = min(seq.target, room)
        self.waiting.append(seq)
        return True

    # -- scheduling -----------------------------------------------------------------------------------
    def _ensure_blocks(self, seq: SimSeq, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - seq.blocks
        if need <= 0:
            return True
        if need > self.free_blocks:
            return False
        self.free_blocks -= need
        seq.blocks += need
        return True

    def _preempt_one(self, keep: SimSeq) -> bool:
        for i in range(len(self.running) - 1, -1, -1):
            victim = self.running[i]
            if victim is not keep and not victim.in_flight:
                del self.running[i]
                victim.running = False
                self.free_blocks += victim.blocks
                victim.blocks, victim.num_computed = 0, 0
                self.waiting.appendleft(victim)
                self.preemptions += 1
                return True
        return False

    def _schedule(self) -> MicroBatch | None:
        budget = self.max_batched_tokens
        share = -(-(len(self.running) + len(self.waiting)) // self.max_in_flight)
        items: list[tuple[SimSeq, int]] = []
        for seq in list(self.running):
            if len(items) >= share:
                break
            if seq.in_flight or budget <= 0 or not seq.running:
                continue
            chunk = min(seq.num_tokens - seq.num_computed, budget)
            while not self._ensure_blocks(seq, seq.num_computed + chunk):
                if not self._preempt_one(keep=seq):
                    break
            else:
                items.append((seq, chunk))
                seq.in_flight = chunk
                budget -= chunk
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and len(items) < share:
            seq = self.waiting[0]
            chunk = min(seq.num_tokens - seq.num_computed, budget)
            if not self._ensure_blocks(seq, seq.num_computed + chunk):
                break
            self.waiting.popleft()
            self.running.append(seq)
            seq.running = True
            items.append((seq, chunk))
            seq.in_flight = chunk
            budget -= chunk
        if not items:
            return None
        if len(self.running) > self.peak_running:
            self.peak_running = len(self.running)
        return MicroBatch(items, self.max_batched_tokens - budget)

    def _launch(self, mb: MicroBatch, now: float, push: Push) -> None:
        tokens = mb.tokens
        context = sum(seq.num_computed + chunk for seq, chunk in mb.items)
        t = now
        last = len(self.stages) - 1
        for i, stage in enumerate(self.stages):
            start = t if t > self.busy[i] else self.busy[i]
            took = stage.time(tokens, context)
            self.busy[i] = start + took
            self.stage_busy_s[i] += took
            t = self.busy[i]
            if i < last:
                t += stage.hop(tokens)
        mb.emit_at = t
        self.in_flight.append(mb)
        self.steps += 1
        push(self.busy[0], LEADER_FREE, self.index, None)
        push(t + self.return_latency, RESULT, self.index, mb)

    def kick(self, now: float, push: Push) -> None:
        """The leader's turn at ``now``: launch a micro-batch if stage 0 is free, fewer than P are in flight,
        and some sequence is ready."""
        if now < self.busy[0] or len(self.in_flight) >= self.max_in_flight:
            return
        mb = self._schedule()
        if mb is not None:
            self._launch(mb, now, push)

    # -- results --------------------------------------------------------------------------------------
    def on_result(self, now: float, mb: MicroBatch, push: Push) -> list[SimSeq]:
        """A micro-batch's sampled ids are back at stage 0; returns the sequences that finished."""
        self.pending.append(mb)
        if now < self.busy[0]:
            return []
        return self.on_leader_free(now, push)

    def on_leader_free(self, now: float, push: Push) -> list[SimSeq]:
        """Stage 0 finished computing: apply results that came back meanwhile (in order), then schedule."""
        done: list[SimSeq] = []
        for mb in self.pending:
            done += self._apply(mb)
        self.pending = []
        self.kick(now, push)
        return done

    def _apply(self, mb: MicroBatch) -> list[SimSeq]:
        head = self.in_flight.popleft()
        if head is not mb:  # stages are FIFO, so results come back in launch order
            raise RuntimeError("simulator: micro-batch results out of order")
        done = []
        for seq, chunk in mb.items:
            seq.in_flight = 0
            seq.num_computed += chunk
            if seq.num_computed < seq.num_tokens:
                continue  # a prefill chunk that does not end the prompt samples nothing
            seq.num_tokens += 1
            seq.generated += 1
            if seq.first_token is None:
                seq.first_token = mb.emit_at
            if seq.generated >= seq.target:
                seq.done_at = mb.emit_at
                self.running.remove(seq)
                seq.running = False
                self.free_blocks += seq.blocks
                seq.blocks = 0
                done.append(seq)
        return done
