"""The messages between the ranks of a pipeline: the step plan (what stage 0 decided for one step, sent with
the activations to every rank) and the step result (what the last stage sampled, back to stage 0).

They travel between ranks as msgpack bytes on the CPU (gloo) side channel; ``encode``/``decode`` are the only
codecs, and the typed parts (``NewSequence``, ``Abort``) travel as fixed-order arrays.

Prefix reuse needs nothing more: a sequence whose first blocks came from the prefix cache has those block
ids at the head of its block table and its first chunk's positions start after them, so every rank of
every stage reads the cached K/V and computes only the rest, with no message of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack

from hexgen.engine.types import Request


@dataclass
class NewSequence:
    """A request the last stage sees for the first time, with the sequence id the plan's rows use for it."""

    seq_id: int
    request: Request
    cached_tokens: int = 0  # prompt tokens whose K/V the prefix cache supplied (reported to the client)

    def pack(self) -> list[Any]:
        return [self.seq_id, self.request.to_dict(), self.cached_tokens]

    @classmethod
    def unpack(cls, v: list[Any]) -> NewSequence:
        return cls(int(v[0]), Request.from_dict(v[1]), int(v[2]))


@dataclass
class Abort:
    """A sequence stage 0 ended with no further token: cancelled, or with no room left ("length")."""

    seq_id: int
    request_id: str
    reason: str  # "cancelled" or "length": the finish reason the client gets
    request: Request | None = None  # the request itself when the last stage never saw it, else None

    def pack(self) -> list[Any]:
        return [self.seq_id, self.request_id, self.reason, None if self.request is None else self.request.to_dict()]

    @classmethod
    def unpack(cls, v: list[Any]) -> Abort:
        return cls(int(v[0]), v[1], v[2], None if v[3] is None else Request.from_dict(v[3]))


@dataclass
class StepPlan:
    """One micro-batch. Per-sequence lists are aligned; ``input_ids``/``positions`` are flattened."""

    step_id: int
    seq_ids: list[int] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)  # [tokens]
    positions: list[int] = field(default_factory=list)  # [tokens]
    q_lens: list[int] = field(default_factory=list)  # [batch]
    ctx_lens: list[int] = field(default_factory=list)  # [batch] cached tokens after this step
    block_tables: list[list[int]] = field(default_factory=list)  # [batch][blocks]
    sample: list[bool] = field(default_factory=list)  # [batch] this chunk ends the known tokens
    out_lens: list[int] = field(default_factory=list)  # [batch] completion tokens so far (seeding)
    new_requests: list[NewSequence] = field(default_factory=list)  # requests the last stage sees first here
    cancelled: list[Abort] = field(default_factory=list)  # sequences ended before this step
    shutdown: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def encode(self) -> bytes:
        d = dict(self.__dict__)
        d["new_requests"] = [n.pack() for n in self.new_requests]
        d["cancelled"] = [a.pack() for a in self.cancelled]
        return msgpack.packb(d, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> StepPlan:
        d = msgpack.unpackb(data, raw=False, strict_map_key=False)
        d["new_requests"] = [NewSequence.unpack(v) for v in d["new_requests"]]
        d["cancelled"] = [Abort.unpack(v) for v in d["cancelled"]]
        return cls(**d)


@dataclass
class StepResult:
    """What the last stage sends back to stage 0 for one plan."""

    step_id: int
    seq_ids: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # sampled id per sampled sequence
    finished: list[bool] = field(default_factory=list)
    abandoned: list[str] = field(default_factory=list)  # request ids another writer took over: stop them

    def encode(self) -> bytes:
        return msgpack.packb(self.__dict__, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> StepResult:
        return cls(**msgpack.unpackb(data, raw=False, strict_map_key=False))
