"""One replica of the discrete-event simulator: HexGen's own stage-0 scheduler and its pipeline of stage servers.

Each replica drives the engine's real ``Scheduler`` and ``BlockManager`` (hexgen/engine/scheduler.py,
kv_cache.py) on a simulated clock, so the simulator's batching, chunked prefill, KV allocation and preemption
are the engine's by construction. Requests enter it as ``Request``s whose prompt ids are placeholders and whose
completion is capped as the engine caps it; each plan's sampled rows get a result as the last stage would send
it (a token, finished at the request's ``max_new_tokens``). The leader mirrors the synchronous loop of
hexgen/engine/leader.py (``PipelinedSteps``): it computes stage 0 itself, keeps up to P micro-batches in
flight, and a sequence is schedulable again only once its micro-batch's sampled ids are back at stage 0.

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

from hexgen.engine.kv_cache import BlockManager
from hexgen.engine.plan import StepPlan, StepResult
from hexgen.engine.scheduler import Scheduler, Sequence
from hexgen.engine.types import Request, SamplingParams

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
    """One request's lengths and timestamps inside the simulator (the scheduler holds its state)."""

    __slots__ = ("rid", "prompt", "target", "arrival", "generated", "first_token", "done_at", "rejected", "replica")

    def __init__(self, rid: int, prompt: int, output: int, arrival: float) -> None:
        self.rid, self.prompt, self.target, self.arrival = rid, prompt, output, arrival
        self.generated = 0
        self.first_token: float | None = None
        self.done_at: float | None = None
        self.rejected = False
        self.replica = -1


class MicroBatch:
    __slots__ = ("plan", "emit_at")

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan
        self.emit_at = 0.0  # the last stage finishes (tokens reach the output sink)


class ReplicaSim:
    """A replica: the engine's continuous-batching scheduler at stage 0 plus its stages as FIFO servers."""

    def __init__(
        self,
        index: int,
        stages: list[StageModel],
        return_latency: float,
        *,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        max_batched_tokens: int,
        max_len: int,
        max_in_flight: int,
    ) -> None:
        self.index = index
        self.stages = stages
        self.return_latency = return_latency
        self.max_in_flight = max_in_flight
        self.scheduler = Scheduler(
            BlockManager(num_blocks, block_size), max_num_seqs, max_batched_tokens, max_len, max_in_flight
        )
        self.queued: dict[str, SimSeq] = {}  # request id -> request, until its first plan names its sequence
        self.seqs: dict[int, tuple[SimSeq, Sequence]] = {}  # the scheduler's sequence id -> (request, sequence)
        self.in_flight: deque[MicroBatch] = deque()
        self.busy = [0.0] * len(stages)  # busy-until of each stage
        self.pending: list[MicroBatch] = []  # results back while the leader computes stage 0
        self.steps = 0
        self.peak_running = 0
        self.stage_busy_s = [0.0] * len(stages)

    @property
    def preemptions(self) -> int:
        return self.scheduler.stats.preemptions

    # -- admission ------------------------------------------------------------------------------------
    @property
    def free_capacity(self) -> int:
        """Requests the leader would still pull from the work stream (max_num_seqs less running and queued)."""
        return self.scheduler.free_capacity

    @property
    def polling(self) -> bool:
        """The leader is idle, polling its source: a new request starts a step at once."""
        return not self.in_flight

    def add(self, seq: SimSeq) -> bool:
        """Queue ``seq``; False (and the request rejected) when its prompt leaves no room in the context, as
        ``Scheduler.add`` rejects it; a longer output is capped as it caps it."""
        seq.replica = self.index
        rid = str(seq.rid)
        req = Request(rid, [0] * seq.prompt, SamplingParams(max_new_tokens=seq.target, ignore_eos=True))
        self.scheduler.add(req)
        if rid not in self.scheduler.by_request:
            seq.rejected = True
            return False
        seq.target = req.params.max_new_tokens
        self.queued[rid] = seq
        return True

    # -- scheduling -----------------------------------------------------------------------------------
    def _schedule(self) -> StepPlan | None:
        """The scheduler's next plan with rows; plans that only report aborted sequences (rejected requests)
        are applied at once: the engine sends them without a forward pass."""
        while True:
            plan = self.scheduler.schedule(self.steps)
            if plan is None or plan.seq_ids:
                return plan
            self.scheduler.update(plan, StepResult(plan.step_id))

    def _launch(self, plan: StepPlan, now: float, push: Push) -> None:
        for new in plan.new_requests:
            rid = new.request.request_id
            self.seqs[new.seq_id] = (self.queued.pop(rid), self.scheduler.by_request[rid])
        running = len(self.scheduler.running)
        if running > self.peak_running:
            self.peak_running = running
        mb = MicroBatch(plan)
        tokens = plan.num_tokens
        context = sum(plan.ctx_lens)
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
        plan = self._schedule()
        if plan is not None:
            self._launch(plan, now, push)

    # -- results --------------------------------------------------------------------------------------
    def on_result(self, now: float, mb: MicroBatch, push: Push) -> list[SimSeq]:
        """A micro-batch's sampled ids are back at stage 0; returns the requests that finished."""
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
        """The last stage's result for the plan: one token per sampled row, finished at the request's
        (capped) length; the scheduler applies it as the engine's leader does."""
        head = self.in_flight.popleft()
        if head is not mb:  # stages are FIFO, so results come back in launch order
            raise RuntimeError("simulator: micro-batch results out of order")
        plan = mb.plan
        result = StepResult(plan.step_id)
        done = []
        for sid, samples in zip(plan.seq_ids, plan.sample):
            if not samples:
                continue  # a prefill chunk that does not end the prompt samples nothing
            seq = self.seqs[sid][0]
            seq.generated += 1
            if seq.first_token is None:
                seq.first_token = mb.emit_at
            finished = seq.generated >= seq.target
            result.seq_ids.append(sid)
            result.tokens.append(0)
            result.finished.append(finished)
            if finished:
                seq.done_at = mb.emit_at
                del self.seqs[sid]
                done.append(seq)
        self.scheduler.update(plan, result)
        return done
