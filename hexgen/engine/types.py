"""Request-side types shared by the engine, its request sources and its output sinks."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol

from hexgen.errors import ConfigError

FINISH_REASONS = ("length", "stop", "eos", "cancelled")
MAX_SEED = 2**63 - 1
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-MAX_PENALTY, MAX_PENALTY]
MAX_REPETITION_PENALTY = 100.0
MAX_LOGIT_BIAS = 100.0  # logit_bias values lie in [-100, 100] (OpenAI's range)
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI's top_logprobs range)


def _num(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _nat(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, int) and v >= 0


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request; validated on construction (ConfigError names the field)."""

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 0 < top_p <= 1
    seed: int | None = None  # same seed -> same tokens
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt and generated tokens
    min_p: float = 0.0  # drop tokens below min_p times the top token's probability
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens are generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    stop_token_ids: tuple[int, ...] = ()  # tokens that end the request (finish reason stop)
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's logprob and the top k alternatives
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob and the top k alternatives

    @property
    def penalized(self) -> bool:
        """Whether the logits need the request's token history (a penalty other than the neutral value)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    grammar: str | None = None  # llguidance grammar constraining the output (hexgen.engine.guided)

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens: {self.max_new_tokens!r} must be an integer ≥ 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0 or t > 100:
            raise ConfigError(f"temperature: {t!r} must be a finite number in [0, 100]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k: {self.top_k!r} must be an integer ≥ 0 (0 = off)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise ConfigError(f"top_p: {p!r} must be a number with 0 < top_p ≤ 1")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED
        ):
            raise ConfigError(f"seed: {self.seed!r} must be an integer in [0, {MAX_SEED}]")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ConfigError(f"stop: {s!r} must be a non-empty string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise ConfigError("grammar: must be a non-empty string (an llguidance grammar) or None")
        self._check_processing()

    def _check_processing(self) -> None:
        """The penalties, biases, token lists and logprob counts."""
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _num(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise ConfigError(f"{name}: {v!r} must be a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        r = self.repetition_penalty
        if not _num(r) or not 0 < r <= MAX_REPETITION_PENALTY:
            raise ConfigError(f"repetition_penalty: {r!r} must be a number in (0, {MAX_REPETITION_PENALTY:g}]")
        if not _num(self.min_p) or not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p: {self.min_p!r} must be a number in [0, 1]")
        if not _nat(self.min_tokens):
            raise ConfigError(f"min_tokens: {self.min_tokens!r} must be an integer ≥ 0")
        self._check_token_lists()

    def _check_token_lists(self) -> None:
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in self.logit_bias))
        for t, b in self.logit_bias:
            if t < 0 or not math.isfinite(b) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
                raise ConfigError(f"logit_bias: {t}: {b!r} needs a token id ≥ 0 and a bias in [-100, 100]")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        for t in self.stop_token_ids:
            if not _nat(t):
                raise ConfigError(f"stop_token_ids: {t!r} must be a token id (an integer ≥ 0)")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _nat(v) or v > MAX_LOGPROBS):
                raise ConfigError(f"{name}: {v!r} must be null or an integer in [0, {MAX_LOGPROBS}]")

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_new_tokens": self.max_new_tokens,
            "temperature": float(self.temperature),
            "top_k": self.top_k,
            "top_p": float(self.top_p),
            "seed": self.seed,
            "stop": list(self.stop),
            "ignore_eos": self.ignore_eos,
            "presence_penalty": float(self.presence_penalty),
            "frequency_penalty": float(self.frequency_penalty),
            "repetition_penalty": float(self.repetition_penalty),
            "min_p": float(self.min_p),
            "min_tokens": self.min_tokens,
            "logit_bias": [list(p) for p in self.logit_bias],
            "stop_token_ids": list(self.stop_token_ids),
            "logprobs": self.logprobs,
            "prompt_logprobs": self.prompt_logprobs,
            "grammar": self.grammar,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        return cls(
            max_new_tokens=d["max_new_tokens"],
            temperature=d["temperature"],
            top_k=d["top_k"],
            top_p=d["top_p"],
            seed=d.get("seed"),
            stop=tuple(d.get("stop") or ()),
            ignore_eos=bool(d.get("ignore_eos", False)),
            presence_penalty=d.get("presence_penalty", 0.0),
            frequency_penalty=d.get("frequency_penalty", 0.0),
            repetition_penalty=d.get("repetition_penalty", 1.0),
            min_p=d.get("min_p", 0.0),
            min_tokens=d.get("min_tokens", 0),
            logit_bias=tuple((int(t), float(b)) for t, b in d.get("logit_bias") or ()),
            stop_token_ids=tuple(d.get("stop_token_ids") or ()),
            logprobs=d.get("logprobs"),
            prompt_logprobs=d.get("prompt_logprobs"),
            grammar=d.get("grammar"),
        )


@dataclass
class Request:
    """One generation request as the engine sees it.

    ``output_ids`` holds tokens already emitted to the client (a request resumed after its pipeline died):
    the engine prefills prompt + output_ids and continues with the next token. ``meta`` is opaque to the
    engine (msgpack-able values only) and travels to the output sink, e.g. the Redis stream entry id.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "prompt_ids": list(self.prompt_ids),
            "params": self.params.to_dict(),
            "output_ids": list(self.output_ids),
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Request:
        return cls(
            request_id=d["request_id"],
            prompt_ids=list(d["prompt_ids"]),
            params=SamplingParams.from_dict(d["params"]),
            output_ids=list(d.get("output_ids") or []),
            meta=dict(d.get("meta") or {}),
        )


@dataclass
class StepOutput:
    """What the last stage produced for one request in one step.

    ``seq`` is the index of this token among the request's completion tokens (0-based, continuing after
    resumed ``output_ids``). ``text`` is a UTF-8-safe delta (may be empty while bytes or a possible stop
    string are held back). ``finish_reason`` is set on the request's final output. A cancelled request gets
    one output with no ids and finish_reason "cancelled".
    """

    request_id: str
    seq: int
    ids: list[int]
    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    logits: Any = None  # float32 tensor [vocab] when the engine collects logits (tests)
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    # per id in ``ids`` (when the request asked for logprobs): (logprob, [(alt id, alt logprob), ...])
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    # with the request's first token (when it asked for prompt_logprobs): the prompt's ids and, per id,
    # None for the first, else (logprob, top alternatives)
    prompt_ids: list[int] | None = None
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None


class RequestSource(Protocol):
    """Feeds the stage-0 leader. Implementations: a fixed list (offline), Redis streams (serving)."""

    def poll(self, max_requests: int, timeout_s: float) -> list[Request]:
        """Up to ``max_requests`` new requests; wait up to ``timeout_s`` when none is ready (0: don't wait)."""

    def poll_cancelled(self) -> list[str]:
        """Request ids cancelled since the last call (cheap; called every step)."""

    def finished(self, request_id: str) -> None:
        """The engine has released this request (its final output was handed to the sink)."""

    def exhausted(self) -> bool:
        """True when no more requests will come: the pipeline shuts down once idle."""

    def close(self) -> None:
        """Release connections and threads."""


class OutputSink(Protocol):
    """Receives outputs on the last-stage leader. Implementations: collector/printer, Redis result streams."""

    def emit(self, outputs: list[StepOutput]) -> None:
        """One call per step with every request's output of that step; must not block the GPU loop long."""

    def close(self) -> None:
        """Flush pending writes and release resources."""

    # Optional: ``lost() -> list[str]`` — ids of requests whose results another writer took over since the
    # last call (another pipeline resumed them); stage 0 then stops generating them (see LastStage).
