"""The last stage's leader: samples each step's tokens, turns them into outputs for its sink, and returns a
result to stage 0.

Logprobs (the sampled token's and the top alternatives) come from the step's raw logits; prompt logprobs
from the prefill's hidden states, chunk by chunk, and travel with the request's first output. The penalties'
token history is kept here per sequence; a step still in flight adds its tokens on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hexgen.engine.guided import GuidedDecoding, apply_bitmask
from hexgen.engine.logit_processors import History
from hexgen.engine.logprobs import LogprobRows, TokenLogprob, hidden_logprobs, token_logprobs
from hexgen.engine.output import OutputProcessor
from hexgen.engine.plan import Abort, StepPlan, StepResult
from hexgen.engine.runner import ModelSpec, StageRunner
from hexgen.engine.sampler import sample
from hexgen.engine.types import OutputSink, Request, SamplingParams, StepOutput
from hexgen.kernels.staging import upload
from hexgen.model.tokenizer import has_tokenizer, load_tokenizer


def load_model_tokenizer(model: ModelSpec):
    """The model's Hugging Face tokenizer, or None (random-weight presets, directories without one)."""
    return load_tokenizer(model.model_dir, field="model.path") if has_tokenizer(model.model_dir) else None


class LastStage:
    """Sampling and output processing on the last stage's leader."""

    def __init__(self, runner: StageRunner, model: ModelSpec, sink: OutputSink, collect_logits: bool) -> None:
        self.runner = runner
        self.sink = sink
        self._lost = getattr(sink, "lost", None)  # optional OutputSink.lost (types.py), looked up once
        self.collect_logits = collect_logits
        tokenizer = load_model_tokenizer(model)
        self.processor = OutputProcessor(tokenizer, runner.cfg.eos_token_ids)
        self.requests: dict[int, Request] = {}  # seq_id -> request
        self.history: dict[int, list[int]] = {}  # seq_id -> completion ids (penalized requests)
        self.prompt_lps: dict[int, list[TokenLogprob | None]] = {}  # seq_id -> prompt logprobs so far
        self.in_flight: tuple[torch.Tensor, dict[int, int]] | None = None  # last step's ids, seq_id -> row
        self.guided = GuidedDecoding(tokenizer, runner.cfg.vocab_size, runner.cfg.eos_token_ids)
        self._last: tuple[StepPlan, Sampled] | None = None  # the step sampled last (for guided catch-up)

    def _forget(self, seq_id: int) -> None:
        self.history.pop(seq_id, None)
        self.prompt_lps.pop(seq_id, None)
        self.guided.remove(seq_id)

    def _aborted(self, notice: Abort) -> StepOutput:
        self._forget(notice.seq_id)
        req = self.requests.pop(notice.seq_id, None)
        if req is not None and notice.reason == "cancelled" and req.request_id in self.processor:
            return self.processor.cancel(req.request_id)
        req = req or notice.request
        if req is None:
            raise RuntimeError(f"sequence {notice.seq_id}: aborted ({notice.reason}) but never announced here")
        n = len(req.output_ids)
        return StepOutput(req.request_id, n, [], "", notice.reason, len(req.prompt_ids), n, req.meta)

    def finish_step(self, plan: StepPlan, hidden: torch.Tensor | None) -> StepResult:
        return self.complete(plan, self.sample(plan, hidden))

    def sample(self, plan: StepPlan, hidden: torch.Tensor | None) -> Sampled:
        """Enqueue the step's sampling on the device; no host sync (``complete`` reads the ids)."""
        for item in plan.new_requests:
            self.requests[item.seq_id] = item.request
            self.processor.add(item.request, item.cached_tokens)
            if item.request.params.penalized:
                self.history[item.seq_id] = list(item.request.output_ids)
            if item.request.params.prompt_logprobs is not None:
                self.prompt_lps[item.seq_id] = [None]
            if item.request.params.grammar is not None:
                self.guided.add(
                    item.seq_id, item.request.request_id, item.request.params.grammar, item.request.output_ids
                )
        prompt_rows = self._prompt_logprobs(plan, hidden) if self.prompt_lps and hidden is not None else []
        rows = [i for i, s in enumerate(plan.sample) if s]
        if not rows or hidden is None:
            return Sampled(rows=[], prompt=prompt_rows)
        logits = self.runner.logits(plan, hidden)  # [n_sampled, vocab]
        sids = [plan.seq_ids[i] for i in rows]
        raw = logits  # logprobs are the model's, before the grammar's mask and the processors
        if len(self.guided):
            logits = self._guide(plan, rows, logits)
        # A request may already be gone (finished one step earlier while this step ran ahead): any params do.
        params = [self.requests[sid].params if sid in self.requests else GREEDY for sid in sids]
        steps = [plan.out_lens[i] for i in rows]
        lp_k = [-1 if p.logprobs is None else p.logprobs for p in params]
        history = self._history(sids) if self.history else None
        ids = sample(logits, params, steps, history, self.processor.eos_token_ids)  # [n_sampled] int64
        lps = token_logprobs(raw, ids, max(lp_k)) if max(lp_k) >= 0 else None
        if self.history:  # the penalties' next step counts these tokens before they reach the host
            self.in_flight = (ids, {sid: r for r, sid in enumerate(sids)})
        sampled = Sampled(rows, ids, host_copy(ids), logits if self.collect_logits else None, lps, lp_k, prompt_rows)
        self._last = (plan, sampled)
        return sampled

    def _history(self, sids: list[int]) -> History:
        """The penalties' token history for the rows of ``sids`` that keep one."""
        h = History(rows=[], prompt=[], output=[])
        src, dst = [], []
        for r, sid in enumerate(sids):
            out = self.history.get(sid)
            if out is None:
                continue
            if self.in_flight is not None and sid in self.in_flight[1]:
                src.append(self.in_flight[1][sid])
                dst.append(len(h.rows))
            h.rows.append(r)
            h.prompt.append(self.requests[sid].prompt_ids)
            h.output.append(out)
        if src and self.in_flight is not None:
            h.pending = (self.in_flight[0], src, dst)
        return h

    def _prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor) -> list[tuple[int, int, LogprobRows]]:
        """Enqueue the logprobs of the prompt tokens this step's chunks predict: (seq_id, how many, rows)."""
        out = []
        start = 0
        for sid, q in zip(plan.seq_ids, plan.q_lens):
            begin, start = start, start + q
            acc = self.prompt_lps.get(sid)
            req = self.requests.get(sid)
            if acc is None or req is None:
                continue
            p0 = plan.positions[begin]
            n = min(q, len(req.prompt_ids) - 1 - p0)  # rows whose next token is a prompt token
            if n <= 0:
                continue
            targets = upload(req.prompt_ids[p0 + 1 : p0 + 1 + n], torch.int64, hidden.device)  # [n]
            k = req.params.prompt_logprobs or 0
            out.append((sid, n, hidden_logprobs(self.runner.model.logits, hidden[begin : begin + n], targets, k)))
        return out

    def _attach(self, sid: int, req: Request, tok: int, out: StepOutput, lp: TokenLogprob | None) -> None:
        """Add the logprobs the request asked for to ``out``; extend its penalty history with ``tok``."""
        if lp is not None and req.params.logprobs is not None:
            out.logprobs = [lp]
        if sid in self.prompt_lps:
            out.prompt_ids, out.prompt_logprobs = list(req.prompt_ids), self.prompt_lps.pop(sid)
        if sid in self.history:
            self.history[sid].append(tok)

    def _guide(self, plan: StepPlan, rows: list[int], logits: torch.Tensor) -> torch.Tensor:
        """``logits`` [n_sampled, vocab] with the constrained rows' disallowed tokens at -inf. The bitmask is
        filled on the host while the device runs this step; a matcher one token behind (its token was
        sampled by the step still in flight, asynchronous steps) first waits for that step's ids."""
        pos = [r for r, i in enumerate(rows) if plan.seq_ids[i] in self.guided]
        if not pos:
            return logits
        if self._last is not None and any(
            self.guided.consumed(plan.seq_ids[rows[r]]) < plan.out_lens[rows[r]] for r in pos
        ):
            last_plan, last = self._last
            for i, tok in zip(last.rows, last.tokens()):
                self.guided.advance(last_plan.seq_ids[i], last_plan.out_lens[i], tok)
        mask = self.guided.fill([plan.seq_ids[rows[r]] for r in pos])  # [n_guided, words] int32, host
        idx = torch.tensor(pos, dtype=torch.long).to(logits.device, non_blocking=True)  # [n_guided]
        masked = apply_bitmask(logits.index_select(0, idx), mask.to(logits.device, non_blocking=True))
        return logits.index_copy(0, idx, masked)  # [n_sampled, vocab]

    def complete(self, plan: StepPlan, sampled: Sampled) -> StepResult:
        """Wait for the sampled ids, turn them into outputs for the sink and a result for stage 0."""
        outputs = [self._aborted(n) for n in plan.cancelled]
        result = StepResult(plan.step_id)
        for sid, n, lp_rows in sampled.prompt:
            if sid in self.prompt_lps:
                k = self.requests[sid].params.prompt_logprobs or 0
                self.prompt_lps[sid].extend(lp_rows.to_host([k] * n))
        tokens = sampled.tokens()
        if self.in_flight is not None and self.in_flight[0] is sampled.ids:
            self.in_flight = None
        token_lps = sampled.logprobs.to_host([max(k, 0) for k in sampled.lp_k]) if sampled.logprobs else None
        for row, (i, tok) in enumerate(zip(sampled.rows, tokens)):
            sid = plan.seq_ids[i]
            req = self.requests.get(sid)
            if req is None:  # finished at the step before (ran ahead): drop the extra token
                continue
            self.guided.advance(sid, plan.out_lens[i], tok)
            out = self.processor.step(req.request_id, tok)
            if sampled.logits is not None:
                out.logits = sampled.logits[row].cpu()
            self._attach(sid, req, tok, out, None if token_lps is None else token_lps[row])
            if out.finish_reason is not None:
                del self.requests[sid]
                self._forget(sid)
            outputs.append(out)
            result.seq_ids.append(sid)
            result.tokens.append(tok)
            result.finished.append(out.finish_reason is not None)
        if outputs:
            self.sink.emit(outputs)
        if self._lost is not None:
            result.abandoned = list(self._lost())
        return result


GREEDY = SamplingParams()


def host_copy(ids: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying ``ids`` to pinned host memory now, on the current stream, so that a later read waits
    for this step's work only and not for steps enqueued after it."""
    if ids.device.type != "cuda":
        return ids, None
    host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
    host.copy_(ids, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


@dataclass
class Sampled:
    """One step's sampling, enqueued: the plan rows that sampled, their ids on the device and in flight to
    the host, and (collect_logits) their logits."""

    rows: list[int]
    ids: torch.Tensor | None = None  # [n_sampled] int64 on the device
    host: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
    logits: torch.Tensor | None = None  # [n_sampled, vocab] float32
    logprobs: LogprobRows | None = None  # raw-logit logprobs of the sampled ids (some row asked for them)
    lp_k: list[int] = field(default_factory=list)  # per sampled row: top alternatives wanted (-1: none)
    prompt: list[tuple[int, int, LogprobRows]] = field(default_factory=list)  # prompt logprobs in flight

    def wait(self) -> None:
        """Block until the ids are on the host."""
        if self.host is not None and self.host[1] is not None:
            self.host[1].synchronize()

    def tokens(self) -> list[int]:
        if self.host is None:
            return []
        self.wait()
        return self.host[0].tolist()
