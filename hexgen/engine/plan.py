"""The step plan: what stage 0 decided for one step, sent with the activations to every rank.

Plans and step results travel between ranks as msgpack bytes on the CPU (gloo) side channel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgpack


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
    new_requests: list[dict[str, Any]] = field(default_factory=list)  # {"seq_id", "request"} first seen
    cancelled: list[dict[str, Any]] = field(default_factory=list)  # {"seq_id", "request"|None}
    shutdown: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    def encode(self) -> bytes:
        return msgpack.packb(self.__dict__, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> StepPlan:
        return cls(**msgpack.unpackb(data, raw=False, strict_map_key=False))


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
