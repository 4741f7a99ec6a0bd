"""Continuous-batching scheduler of the stage-0 leader.

Each step mixes decodes of running sequences with (chunked) prefills of new ones under a token budget.
A sequence has at most one chunk in flight (two with asynchronous steps, below), so with P stages up to P
micro-batches of different sequences travel the pipeline at once. When the KV cache runs out, the youngest
idle sequence is preempted (its blocks freed; it is recomputed later from prompt + generated tokens).

Asynchronous steps (one-stage pipelines, ``schedule(..., ahead=True)``). The next step may be launched
before the last one's sampled ids are back: a sequence whose in-flight chunk samples, and that cannot finish
by length there, gets one more decode token whose input id is a placeholder ``-(1 + row)``, row being its
index among the in-flight plan's sampled rows. The leader fills it on the device from that plan's sampled
ids, so the host prepares step N+1 while the device runs step N. A sequence that then finishes at N (EOS, a
stop string) has made one wasted token; its result is dropped.

Context length. A sequence holds at most ``max_len`` tokens, prompt and completion together (``max_len`` is
max_model_len, or the KV cache's capacity if smaller), the same rule as the head's ``check_context`` and
Hugging Face's ``max_length``: a prompt of max_len − k tokens makes at most k tokens (max_len − 1 makes
one), and a prompt of max_len tokens or more finishes at once with "length" and no tokens. (One more token
could be sampled from a max_len prompt, since the last sampled token's K/V is never stored, but that
sequence would hold max_len + 1 tokens.)
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import dataclass, field

from hexgen.engine.block_hash import extend_hashes
from hexgen.engine.kv_cache import BlockManager
from hexgen.engine.plan import Abort, NewSequence, StepPlan, StepResult
from hexgen.engine.types import Request

log = logging.getLogger(__name__)


def max_step_batch(max_num_seqs: int, micro_batches: int) -> int:
    """The most sequences one step (micro-batch) can carry: ``schedule`` gives each of P micro-batches in
    flight about 1/P of at most max_num_seqs sequences (decode graphs, all-reduce buffers and the logits
    reserve are sized by it)."""
    return -(-max_num_seqs // max(1, micro_batches))


@dataclass(eq=False)  # identity: membership tests in running/waiting must not compare token lists
class Sequence:
    seq_id: int
    request: Request
    tokens: list[int]  # prompt + completion so far
    num_prompt: int
    num_computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    in_flight: int = 0  # tokens of the chunks now in the pipeline (0: idle)
    sample_row: int = -1  # row among the last scheduled plan's sampled rows (-1: its chunk there does not sample)
    announced: bool = False  # the last stage knows this request
    cancel_requested: bool = False
    hashes: list[int] = field(default_factory=list)  # chained hashes of the first full blocks of tokens
    num_registered: int = 0  # leading blocks registered in the prefix cache (or taken from it)
    cached_tokens: int = 0  # prompt tokens the prefix cache supplied at the first admission

    @property
    def num_output(self) -> int:
        return len(self.tokens) - self.num_prompt


@dataclass
class StepStats:
    """What the scheduler sent, summed over a run (logged at the end of a run)."""

    steps: int = 0
    mixed_steps: int = 0  # steps with a prefill chunk (several query tokens): they run eagerly, not in graphs
    decode_rows: int = 0  # sequences with one query token, over all steps
    prefill_tokens: int = 0  # query tokens of chunks of several tokens, recomputation after preemption included
    preemptions: int = 0
    recomputed_tokens: int = 0  # computed tokens thrown away by preemptions
    prefix_queries: int = 0  # tokens of admitted sequences looked up in the prefix cache
    prefix_hits: int = 0  # of those, tokens whose K/V the cache supplied

    def count(self, plan: StepPlan) -> None:
        self.steps += 1
        multi = [n for n in plan.q_lens if n > 1]
        self.mixed_steps += bool(multi)
        self.prefill_tokens += sum(multi)
        self.decode_rows += len(plan.q_lens) - len(multi)

    def line(self) -> str:
        per = self.decode_rows / max(1, self.steps)
        return (
            f"{self.steps} steps ({self.mixed_steps} with a prefill chunk), {per:.1f} decode rows a step, "
            f"{self.prefill_tokens} prefill tokens, {self.preemptions} preemptions "
            f"({self.recomputed_tokens} tokens to recompute), prefix cache {self.prefix_hits} of "
            f"{self.prefix_queries} tokens"
        )


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_num_seqs: int,
        max_batched_tokens: int,
        max_model_len: int,
        micro_batches: int = 1,
    ) -> None:
        self.blocks = blocks
        self.micro_batches = max(1, micro_batches)
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.max_len = min(max_model_len, blocks.num_blocks * blocks.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.by_request: dict[str, Sequence] = {}
        self._next_id = 0
        self._notices: list[Abort] = []  # aborted sequences the last stage must report
        self.ahead_tokens = 0  # decode tokens scheduled before their input was sampled (asynchronous steps)
        self.stats = StepStats()

    # -- admission ------------------------------------------------------------------------------------
    @property
    def free_capacity(self) -> int:
        """How many more requests may be queued here without exceeding max_num_seqs."""
        return max(0, self.max_num_seqs - len(self.running) - len(self.waiting))

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and not self._notices

    @property
    def num_in_flight(self) -> int:
        return sum(1 for s in self.running if s.in_flight)

    def add(self, req: Request) -> None:
        tokens = list(req.prompt_ids) + list(req.output_ids)
        room = self.max_len - len(tokens)
        remaining = req.params.max_new_tokens - len(req.output_ids)
        seq = Sequence(self._next_id, req, tokens, len(req.prompt_ids))
        self._next_id += 1
        if room < 1 or remaining < 1 or not tokens:
            self._notices.append(Abort(seq.seq_id, req.request_id, "length", req))
            return
        if remaining > room:  # cap the completion so prompt + completion fit the context and the cache
            cap = len(req.output_ids) + room
            req.params = dataclasses.replace(req.params, max_new_tokens=cap)
        self.waiting.append(seq)
        self.by_request[req.request_id] = seq

    def cancel(self, request_id: str) -> bool:
        seq = self.by_request.get(request_id)
        if seq is None:
            return False
        if seq.in_flight:
            seq.cancel_requested = True
        else:
            self._abort(seq, "cancelled")
        return True

    def _abort(self, seq: Sequence, reason: str) -> None:
        self._remove(seq)
        self._notices.append(Abort(seq.seq_id, seq.request.request_id, reason, None if seq.announced else seq.request))

    def _remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.blocks)
        seq.blocks = []
        self.by_request.pop(seq.request.request_id, None)

    # -- one step -------------------------------------------------------------------------------------
    def _ensure_blocks(self, seq: Sequence, num_tokens: int) -> bool:
        need = -(-num_tokens // self.blocks.block_size) - len(seq.blocks)  # blocks_for(num_tokens), inlined
        if need <= 0:
            return True
        if not self.blocks.can_allocate(need):
            return False
        seq.blocks += self.blocks.allocate(need)
        return True

    def _preempt_one(self, keep: Sequence) -> Sequence | None:
        """Preempt the youngest idle running sequence other than ``keep``; it, or None when there is none."""
        for victim in reversed(self.running):
            if victim is not keep and not victim.in_flight:
                log.info("KV cache full: preempting request %s", victim.request.request_id)
                self.stats.preemptions += 1
                self.stats.recomputed_tokens += victim.num_computed
                self.running.remove(victim)
                self.blocks.free(victim.blocks)
                victim.blocks, victim.num_computed, victim.num_registered = [], 0, 0
                self.waiting.appendleft(victim)
                return victim
        return None

    def _add_chunk(self, plan: StepPlan, seq: Sequence, chunk: int) -> None:
        start, end, tokens = seq.num_computed, seq.num_computed + chunk, seq.tokens
        plan.seq_ids.append(seq.seq_id)
        if chunk == 1:  # a decode row (most rows of most steps)
            plan.input_ids.append(tokens[start])
            plan.positions.append(start)
        else:
            plan.input_ids += tokens[start:end]
            plan.positions += range(start, end)
        plan.q_lens.append(chunk)
        plan.ctx_lens.append(end)
        plan.block_tables.append(seq.blocks.copy())
        plan.sample.append(end == len(tokens))
        plan.out_lens.append(len(tokens) - seq.num_prompt)
        if not seq.announced:
            plan.new_requests.append(NewSequence(seq.seq_id, seq.request, seq.cached_tokens))
            seq.announced = True
        seq.in_flight = chunk

    def _can_run_ahead(self, seq: Sequence) -> bool:
        """Whether ``seq`` (its one in-flight chunk samples) may get a decode token before that sample is
        back: it must not finish by length there, and its next token must fit the context."""
        return (
            seq.sample_row >= 0
            and seq.in_flight > 0
            and not seq.cancel_requested
            and seq.num_output + 1 < seq.request.params.max_new_tokens
            and len(seq.tokens) + 1 < self.max_len
        )

    def _add_ahead(self, plan: StepPlan, seq: Sequence) -> bool:
        """One decode token whose input is the in-flight sample (placeholder id); False when its KV slot
        does not fit now (the sequence then waits for its sample as usual)."""
        pos = len(seq.tokens)  # where the in-flight sampled token goes
        need = self.blocks.blocks_for(pos + 1) - len(seq.blocks)
        if need > 0:
            if not self.blocks.can_allocate(need):
                return False
            seq.blocks += self.blocks.allocate(need)
        plan.seq_ids.append(seq.seq_id)
        plan.input_ids.append(-1 - seq.sample_row)
        plan.positions.append(pos)
        plan.q_lens.append(1)
        plan.ctx_lens.append(pos + 1)
        plan.block_tables.append(list(seq.blocks))
        plan.sample.append(True)
        plan.out_lens.append(seq.num_output + 1)
        seq.in_flight += 1
        self.ahead_tokens += 1
        return True

    def schedule(self, step_id: int, ahead: bool = False) -> StepPlan | None:
        """The next micro-batch from idle sequences, or None when there is nothing to send.

        ``ahead``: exactly one plan is in flight (the last one scheduled) and the caller resolves placeholder
        ids from its sampled ids (see the module notes); its sampling sequences then decode once more."""
        plan = StepPlan(step_id)
        plan.cancelled, self._notices = self._notices, []
        budget = self.max_batched_tokens
        # With P micro-batches in flight, each takes about 1/P of the sequences so every stage stays busy.
        share = -(-(len(self.running) + len(self.waiting)) // self.micro_batches)
        added: list[Sequence] = []
        budget = self._schedule_running(plan, budget, share, ahead, added)
        budget = self._admit_waiting(plan, budget, share, added)
        if not plan.seq_ids and not plan.cancelled:
            return None
        self.stats.count(plan)
        row = 0
        for seq, samples in zip(added, plan.sample):
            seq.sample_row = row if samples else -1
            row += samples
        return plan

    def _schedule_running(self, plan: StepPlan, budget: int, share: int, ahead: bool, added: list[Sequence]) -> int:
        """Running sequences' next chunks (preempting others for blocks); returns the token budget left."""
        preempted: set[int] = set()  # seq ids this call took out of running
        for seq in list(self.running):
            if len(plan.seq_ids) >= share or budget <= 0:
                break
            if seq.seq_id in preempted:
                continue
            if seq.in_flight:
                if ahead and self._can_run_ahead(seq) and self._add_ahead(plan, seq):
                    added.append(seq)
                    budget -= 1
                continue
            chunk = min(len(seq.tokens) - seq.num_computed, budget)
            while not self._ensure_blocks(seq, seq.num_computed + chunk):
                victim = self._preempt_one(keep=seq)
                if victim is None:
                    break
                preempted.add(victim.seq_id)
            else:
                self._add_chunk(plan, seq, chunk)
                added.append(seq)
                budget -= chunk
        return budget

    def _admit_waiting(self, plan: StepPlan, budget: int, share: int, added: list[Sequence]) -> int:
        """Waiting sequences admitted in order while blocks, budget and the share allow; returns the budget left."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and len(plan.seq_ids) < share:
            seq = self.waiting[0]
            hit = self._match_prefix(seq) if not seq.blocks else 0
            chunk = min(len(seq.tokens) - seq.num_computed, budget)
            if not self._ensure_blocks(seq, seq.num_computed + chunk):
                if hit:  # give the cached blocks back; the next try looks them up again
                    self.blocks.free(seq.blocks)
                    seq.blocks, seq.num_computed, seq.num_registered = [], 0, 0
                break
            self.stats.prefix_queries += len(seq.tokens)
            self.stats.prefix_hits += hit
            if not seq.announced:
                seq.cached_tokens = min(hit, seq.num_prompt)
            self.waiting.popleft()
            self.running.append(seq)
            self._add_chunk(plan, seq, chunk)
            added.append(seq)
            budget -= chunk
        return budget

    def _match_prefix(self, seq: Sequence) -> int:
        """Take the cached blocks of ``seq``'s longest cached prefix (all but its last token: at least one
        token is computed, so the last stage has logits to sample from); returns the tokens they hold. A request
        that asked for prompt logprobs takes none: the last stage scores every prompt position it computes."""
        if not self.blocks.prefix_cache or seq.request.params.prompt_logprobs is not None:
            return 0
        bs = self.blocks.block_size
        n = (len(seq.tokens) - 1) // bs
        extend_hashes(seq.hashes, seq.tokens, bs, self.blocks.seed, n)
        hits = self.blocks.match(seq.hashes[:n])
        seq.blocks, seq.num_registered, seq.num_computed = hits, len(hits), len(hits) * bs
        return seq.num_computed

    def _register(self, seq: Sequence) -> None:
        """Register the blocks ``seq`` has filled since the last call: their K/V is written on every stage
        (this step's result came back from the last stage, and every rank runs plans in order)."""
        bs = self.blocks.block_size
        full = min(seq.num_computed // bs, len(seq.blocks))
        if full <= seq.num_registered:
            return
        extend_hashes(seq.hashes, seq.tokens, bs, self.blocks.seed, full)
        for i in range(seq.num_registered, full):
            self.blocks.register(seq.blocks[i], seq.hashes[i])
        seq.num_registered = full

    def update(self, plan: StepPlan, result: StepResult) -> list[str]:
        """Apply the last stage's result; returns request ids released by this step."""
        by_id = {s.seq_id: s for s in self.running}
        caching = self.blocks.prefix_cache
        for sid, chunk in zip(plan.seq_ids, plan.q_lens):
            seq = by_id.get(sid)
            if seq is not None:
                seq.num_computed += chunk
                seq.in_flight -= chunk
                if caching:
                    self._register(seq)
        released = [n.request_id for n in plan.cancelled]
        for sid, token, finished in zip(result.seq_ids, result.tokens, result.finished):
            seq = by_id.get(sid)
            if seq is None:
                continue
            seq.tokens.append(token)
            if finished:
                self._remove(seq)
                released.append(seq.request.request_id)
        for sid in plan.seq_ids:
            seq = by_id.get(sid)
            if seq is not None and seq.cancel_requested and seq in self.running:
                self._abort(seq, "cancelled")
        return released
