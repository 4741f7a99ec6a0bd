"""Analytic cost model of HexGen's stages: time of a layer's prefill/decode step, TP all-reduce, stage-to-stage
transfer, and memory (weights, KV cache, activation workspace), for any Llama-family ModelConfig.

A layer step on one TP rank is roofline-bound: max(compute, memory traffic, kernel floor) + a fixed overhead,
with compute at ``FLOPS_EFFICIENCY`` of the datasheet peak and traffic at ``BANDWIDTH_EFFICIENCY`` of the
datasheet bandwidth. A calibration from ``bin/hexgen profile`` replaces the estimate for the device it was
measured on, inside its measured range.

Sharding follows hexgen/parallel/layers.py: query heads and the MLP intermediate split across ranks (the
intermediate unevenly when TP does not divide it: the largest shard is costed); KV heads split when
tp <= n_kv, else each rank holds one replicated KV head; the embedding (first stage) and the final norm + LM
head (last stage) are replicated on every rank of their stage, the LM head as its own copy even when the
checkpoint ties it to the embedding (hexgen/model/llama.py).

Memory follows the engine: a stage holds its weights, the activation workspace the engine reserves for a step
of ``max_tokens`` tokens and ``max_seqs`` sequences (hexgen/engine/runner.py), and its KV cache;
``kv_capacity_tokens`` also leaves ``GPU_RUNTIME_BYTES`` for the CUDA runtime (not on "CPU"). A TP degree the
model's heads do not allow raises ConfigError; ``tokens`` and ``context`` may be fractional (mean shapes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hexgen.config import ModelConfig, valid_tp_degrees
from hexgen.errors import ConfigError
from hexgen.planner.calibration import Calibration
from hexgen.planner.cluster import Link
from hexgen.planner.devices import DeviceSpec

# Achievable fractions of datasheet peaks for large GEMMs / streaming reads (typical of cuBLAS bf16 GEMMs at
# 60-70% of peak and of measured device copy bandwidth at ~80-90% of the datasheet HBM/GDDR rate).
FLOPS_EFFICIENCY = 0.65
BANDWIDTH_EFFICIENCY = 0.8
# Per-layer fixed cost (synchronisation, small kernels that neither saturate compute nor bandwidth), and the
# floor of a layer with tiny shapes: ~12 kernels (2 norms, QKV, rope, KV write, attention, o_proj, gate/up,
# SiLU*up, down, 2 adds) of at least ~2.5 us each on a GPU.
LAYER_OVERHEAD_S = 3e-6
KERNELS_PER_LAYER = 12
KERNEL_MIN_S = 2.5e-6
# On the generic "CPU" device each eager PyTorch op costs ~10 us of dispatch however small (a tiny-preset layer
# measures ~120-160 us with `bin/hexgen profile --device cpu --threads 1`).
CPU_OP_MIN_S = 10e-6
# Activation bytes moved per token per layer besides weights and KV, in units of dtype elements:
# each op reads its input and writes its output (norms, residuals, QKV, attention out, gate/up, SiLU, down).
ACT_HIDDEN_PASSES = 10  # x hidden
ACT_INTER_PASSES = 4  # x local intermediate
# LM head rows per step: HexGen computes logits only for sequences that sample; at most this many per step.
LM_HEAD_MAX_ROWS = 256
# Memory the engine reserves besides weights and KV (hexgen/engine/runner.py _activation_reserve) and what the
# CUDA context, NCCL buffers and allocator fragmentation take outside PyTorch's accounting.
ACTIVATION_SLACK_BYTES = 256 << 20
GPU_RUNTIME_BYTES = 1 << 30
DEFAULT_MAX_TOKENS = 2048  # EngineConfig.max_num_batched_tokens
DEFAULT_MAX_SEQS = 64  # EngineConfig.max_num_seqs


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class CostModel:
    """Time and memory of one Llama model's layers on any device and TP degree (see the module docstring)."""

    model: ModelConfig
    dtype_bytes: int = 2
    # one Calibration, or several (one per device type: each covers the points of the device it measured)
    calibration: Calibration | tuple[Calibration, ...] | None = None
    # derived in __post_init__
    _valid_tp: frozenset[int] = field(init=False, repr=False, compare=False)
    _cals: tuple[Calibration, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            raise ConfigError(f"cost model model: {self.model!r} must be a hexgen.config.ModelConfig")
        if self.dtype_bytes not in (1, 2, 4):
            raise ConfigError(f"cost model dtype_bytes: {self.dtype_bytes!r} must be 1, 2 or 4")
        object.__setattr__(self, "_valid_tp", frozenset(valid_tp_degrees(self.model, 1 << 16)))
        cals = self.calibration
        if cals is None:
            cals = ()
        elif isinstance(cals, list):
            cals = tuple(cals)
        elif not isinstance(cals, tuple):
            cals = (cals,)
        object.__setattr__(self, "_cals", cals)
        want = layer_shape(self.model)
        for cal in cals:
            if not isinstance(cal, Calibration):
                raise ConfigError(f"cost model calibration: {cal!r} must be a Calibration")
            if dict(cal.model) != want:
                raise ConfigError(
                    f"calibration model: measured layer shape {cal.model} does not match the "
                    f"model being planned {want}; profile this model"
                )

    # -- shapes -------------------------------------------------------------------------------------------
    def _check_tp(self, tp: int) -> None:
        valid = self._valid_tp
        if tp not in valid or isinstance(tp, bool):
            raise ConfigError(
                f"tp: {tp!r} is not a valid TP degree for this model "
                f"({self.model.num_heads} query heads, {self.model.num_kv_heads} KV heads); "
                f"valid: {', '.join(map(str, sorted(valid)))}"
            )

    def local_heads(self, tp: int) -> tuple[int, int]:
        """(query heads, KV heads) on one rank: KV heads sharded when tp <= n_kv, else one replicated head."""
        self._check_tp(tp)
        m = self.model
        return m.num_heads // tp, (m.num_kv_heads // tp if tp <= m.num_kv_heads else 1)

    def local_intermediate(self, tp: int) -> int:
        """The largest rank's MLP intermediate shard (split_sizes gives the first ranks one more)."""
        return _ceil_div(self.model.intermediate_size, tp)

    def layer_params(self, tp: int) -> int:
        """Parameters of one decoder layer on one rank."""
        m = self.model
        nq, nkv = self.local_heads(tp)
        inter = self.local_intermediate(tp)
        qkv = m.hidden_size * (nq + 2 * nkv) * m.head_dim
        o = nq * m.head_dim * m.hidden_size
        mlp = 3 * m.hidden_size * inter
        return qkv + o + mlp + 2 * m.hidden_size  # + input and post-attention RMSNorm weights

    def layer_weight_bytes(self, tp: int) -> int:
        """One decoder layer's weights on one TP rank. FP8 weights (``model.quantization``): the linears at one
        byte a weight plus a float32 scale per output row (hexgen.kernels.fp8_linear), the norms in the dtype."""
        m = self.model
        norms = 2 * m.hidden_size
        if m.quantization != "fp8":
            return self.layer_params(tp) * self.dtype_bytes
        nq, nkv = self.local_heads(tp)
        rows = (nq + 2 * nkv) * m.head_dim + m.hidden_size + 2 * self.local_intermediate(tp) + m.hidden_size
        return self.layer_params(tp) - norms + 4 * rows + norms * self.dtype_bytes

    def embed_bytes(self) -> int:
        """Embedding (first stage) + final norm and LM head (last stage); each replicated on every rank of its
        stage. HexGen keeps the LM head as its own tensor even when the checkpoint ties it to the embedding."""
        return self.first_extra_bytes() + self.last_extra_bytes()

    def first_extra_bytes(self) -> int:
        """The token embedding a first-stage rank holds."""
        return self.model.vocab_size * self.model.hidden_size * self.dtype_bytes

    def last_extra_bytes(self) -> int:
        """The final norm and LM head a last-stage rank holds."""
        m = self.model
        return (m.vocab_size * m.hidden_size + m.hidden_size) * self.dtype_bytes

    def kv_bytes_per_token(self, tp: int) -> int:
        """K and V of one token in one layer on one rank."""
        _, nkv = self.local_heads(tp)
        return 2 * nkv * self.model.head_dim * self.dtype_bytes

    # -- time ---------------------------------------------------------------------------------------------
    def layer_flops(self, tp: int, tokens: int, context: int) -> float:
        """FLOPs of one layer step on one rank: 2 * params * tokens for the matmuls, plus attention
        (QK^T and PV: 4 * local heads * head_dim per query/key pair)."""
        nq, _ = self.local_heads(tp)
        attn = 4.0 * nq * self.model.head_dim * attention_pairs(tokens, context)
        return 2.0 * self.layer_params(tp) * tokens + attn

    def layer_bytes(self, tp: int, tokens: int, context: int) -> float:
        """Bytes one layer step moves on one rank: weights once, the KV of every context position read and the
        new tokens' KV written, and the activations."""
        m = self.model
        kv = self.kv_bytes_per_token(tp) * (max(context, tokens) + tokens)
        act = (
            tokens
            * self.dtype_bytes
            * (ACT_HIDDEN_PASSES * m.hidden_size + ACT_INTER_PASSES * self.local_intermediate(tp))
        )
        return float(self.layer_weight_bytes(tp) + kv + act)

    def estimate_layer_time(self, dev: DeviceSpec, tp: int, tokens: int, context: int) -> float:
        """The datasheet estimate of layer_time (no calibration)."""
        compute = self.layer_flops(tp, tokens, context) / (dev.peak_flops * FLOPS_EFFICIENCY)
        memory = self.layer_bytes(tp, tokens, context) / (dev.mem_bandwidth * BANDWIDTH_EFFICIENCY)
        floor = KERNELS_PER_LAYER * (CPU_OP_MIN_S if dev.name == "CPU" else KERNEL_MIN_S)
        return max(compute, memory, floor) + LAYER_OVERHEAD_S

    def layer_time(self, dev: DeviceSpec, tp: int, tokens: int, context: int) -> float:
        """One decoder layer on one TP rank: ``tokens`` new tokens in the step (prefill: batch*prompt; decode:
        batch) attending to ``context`` cached positions summed over the batch (after the step). Measured time
        when a calibration for ``dev`` covers the point, else the datasheet estimate. No all-reduce."""
        _check_count("tokens", tokens, 1)
        _check_count("context", context, 0)
        for cal in self._cals:
            t = cal.layer_time(tp, tokens, max(context, tokens), device=dev.name)
            if t is not None:
                return t
        return self.estimate_layer_time(dev, tp, tokens, context)

    def allreduce_time(self, link: Link, tp: int, tokens: int) -> float:
        """One ring all-reduce of the [tokens, hidden] partial sums over ``tp`` ranks:
        2(t-1)/t * bytes / bandwidth + 2(t-1) * latency. Zero when tp == 1. A layer has two."""
        if tp <= 1:
            return 0.0
        nbytes = tokens * self.model.hidden_size * self.dtype_bytes
        return 2 * (tp - 1) / tp * nbytes / link.bandwidth + 2 * (tp - 1) * link.latency

    def transfer_time(self, link: Link, tokens: int) -> float:
        """Hidden states [tokens, hidden] from one stage's leader to the next's."""
        return tokens * self.model.hidden_size * self.dtype_bytes / link.bandwidth + link.latency

    def lm_head_time(self, dev: DeviceSpec, tokens: int) -> float:
        """Final norm + LM head for ``tokens`` sampled rows (float32 logits written)."""
        m = self.model
        flops = 2.0 * m.vocab_size * m.hidden_size * tokens
        nbytes = m.vocab_size * m.hidden_size * self.dtype_bytes + tokens * m.vocab_size * 4
        return (
            max(flops / (dev.peak_flops * FLOPS_EFFICIENCY), nbytes / (dev.mem_bandwidth * BANDWIDTH_EFFICIENCY))
            + LAYER_OVERHEAD_S
        )

    def stage_time(
        self,
        dev: DeviceSpec,
        tp: int,
        layers: int,
        link: Link | None,
        tokens: int,
        context: int,
        first: bool,
        last: bool,
    ) -> float:
        """One step of a stage: layers * (layer_time + 2 all-reduces over ``link``) (+ LM head on the last
        stage, for at most LM_HEAD_MAX_ROWS rows). ``link`` may be None when tp == 1."""
        _check_count("layers", layers, 1)
        per_layer = self.layer_time(dev, tp, tokens, context)
        if tp > 1:
            if link is None:
                raise ConfigError("stage_time link: a TP > 1 stage needs the link between its GPUs")
            per_layer += 2 * self.allreduce_time(link, tp, tokens)
        t = layers * per_layer
        if last:
            t += self.lm_head_time(dev, min(tokens, LM_HEAD_MAX_ROWS))
        return t

    # -- memory -------------------------------------------------------------------------------------------
    def weight_bytes(self, tp: int, layers: int, first: bool, last: bool) -> int:
        """Weights on one rank of a stage of ``layers`` layers."""
        return (
            layers * self.layer_weight_bytes(tp)
            + (self.first_extra_bytes() if first else 0)
            + (self.last_extra_bytes() if last else 0)
        )

    def activation_bytes(self, tp: int, max_tokens: int = DEFAULT_MAX_TOKENS, max_seqs: int = DEFAULT_MAX_SEQS) -> int:
        """Workspace the engine reserves for one step (as hexgen/engine/runner.py _activation_reserve does):
        the MLP intermediate at the token budget, a few hidden-sized buffers, float32 logits, slack."""
        m = self.model
        mlp = 3 * max_tokens * (m.intermediate_size // tp + 1) * self.dtype_bytes
        logits = max_seqs * m.vocab_size * 4 * 2
        return mlp + 4 * max_tokens * m.hidden_size * self.dtype_bytes + logits + ACTIVATION_SLACK_BYTES

    def stage_memory(
        self,
        tp: int,
        layers: int,
        kv_tokens: int,
        first: bool,
        last: bool,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_seqs: int = DEFAULT_MAX_SEQS,
    ) -> int:
        """Per-rank bytes of a stage: weights + KV cache for ``kv_tokens`` tokens + activation workspace."""
        _check_count("kv_tokens", kv_tokens, 0)
        return (
            self.weight_bytes(tp, layers, first, last)
            + kv_tokens * layers * self.kv_bytes_per_token(tp)
            + self.activation_bytes(tp, max_tokens, max_seqs)
        )

    def kv_capacity_tokens(
        self,
        dev: DeviceSpec,
        tp: int,
        layers: int,
        first: bool,
        last: bool,
        memory_fraction: float = 0.9,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_seqs: int = DEFAULT_MAX_SEQS,
    ) -> int:
        """Tokens of KV cache one rank of the stage can hold in ``memory_fraction`` of the device memory after
        weights, the activation workspace and (on GPUs) the CUDA runtime; 0 when the weights do not fit."""
        if not 0.0 < memory_fraction <= 1.0:
            raise ConfigError(f"memory_fraction: {memory_fraction!r} must be in (0, 1]")
        _check_count("layers", layers, 1)
        runtime = 0 if dev.name == "CPU" else GPU_RUNTIME_BYTES
        free = (
            int(dev.memory_bytes * memory_fraction)
            - runtime
            - self.stage_memory(tp, layers, 0, first, last, max_tokens, max_seqs)
        )
        if free <= 0:
            return 0
        return free // (layers * self.kv_bytes_per_token(tp))


def attention_pairs(tokens: int, context: int) -> float:
    """Query/key pairs of a step of ``tokens`` new tokens and ``context`` positions summed over its sequences.

    Decode rows attend to their whole context (pairs = context); a prefill of L tokens attends causally
    (L^2 / 2 pairs). From the two sums alone the split is unknown, so this takes the larger of the two readings,
    never more than every token attending to the whole context: max(context, min(tokens^2 / 2, tokens * context)).
    """
    context = max(context, tokens)
    return max(float(context), min(tokens * tokens / 2.0, float(tokens) * context))


def layer_shape(model: ModelConfig) -> dict:
    """The layer shape a calibration is keyed on."""
    return {
        "hidden": model.hidden_size,
        "intermediate": model.intermediate_size,
        "heads": model.num_heads,
        "kv_heads": model.num_kv_heads,
        "head_dim": model.head_dim,
    }


def _check_count(name: str, v: float, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v < math.inf:
        raise ConfigError(f"{name}: {v!r} must be a number >= {low}")
