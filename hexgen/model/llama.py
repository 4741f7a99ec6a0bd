"""Llama model math for one pipeline stage. No collectives here: the parallel layers handed in by
``hexgen.parallel`` do the communication.

A stage owns layers [layer_start, layer_end); the first stage also owns the token embedding, the last the
final norm and the LM head. Inputs are ragged: all sequences of a step flattened into one token axis.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hexgen.config import KernelConfig, ModelConfig, StageSpec
from hexgen.kernels import fused, kv_quant
from hexgen.model.attention import AttnMeta, paged_attention
from hexgen.model.rope import apply_rotary
from hexgen.parallel.groups import TPContext
from hexgen.parallel.layers import (
    ReplicatedLinear,
    RowParallelLinear,
    attention_out_linear,
    gate_up_linear,
    qkv_linear,
)

# q [tokens, n_q, d], and k, v [tokens, n_kv, d] still to be written to the cache (None: already written)
QKV = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fast: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.fast = fast  # the fused Triton kernel (KernelConfig.fused, resolved for the device)
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return fused.add_rms_norm(x, None, self.weight, self.eps)[0]
        return fused.rms_norm_ref(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, res: torch.Tensor | None, fast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + res), x + res); res None: (norm(x), x). ``fast``: one Triton kernel."""
        if fast:
            return fused.add_rms_norm(x, res, self.weight, self.eps)
        return fused.add_rms_norm_ref(x, res, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext) -> None:
        super().__init__()
        # rotary + K/V written by one kernel: every attention read then goes through the cache (set_kernels)
        self.through_cache = False
        self.head_dim = cfg.head_dim
        self.qkv_proj, self.n_q, self.n_kv = qkv_linear(
            cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, tp
        )
        self.o_proj = attention_out_linear(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size, tp)
        self.scale = cfg.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttnMeta,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """kv_scales: [2, n_kv] (k, v) with an fp8 cache (``hexgen.kernels.kv_quant``), else None."""
        qkv = self.project(x, cos, sin, k_cache, v_cache, meta, kv_scales)
        return self.out(self.attend(qkv, k_cache, v_cache, meta, kv_scales))

    def project(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttnMeta,
        kv_scales: torch.Tensor | None = None,
    ) -> QKV:
        """The QKV projection and rotary: (q [tokens, n_q, d], k, v [tokens, n_kv, d]), or (q, None, None)
        when one kernel has already written the new K/V to the cache (``through_cache``)."""
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [tokens, (n_q + 2 n_kv) * d]
        ks, vs = (None, None) if kv_scales is None else (kv_scales[0], kv_scales[1])
        if self.through_cache:  # every attention read goes through the cache
            if kv_scales is not None and meta.calibrate_kv:  # before rotary: K's scale is the same either side
                kv_quant.update_scales(ks, vs, *self._kv_heads(qkv))
            q = fused.rotary_kv_write(qkv, cos, sin, meta.slot_mapping, k_cache, v_cache, self.n_q, self.n_kv, ks, vs)
            return q, None, None
        q = qkv[:, : self.n_q * self.head_dim].view(t, self.n_q, self.head_dim)  # [tokens, n_q, d]
        k, v = self._kv_heads(qkv)  # [tokens, n_kv, d] each
        if kv_scales is not None and meta.calibrate_kv:
            kv_quant.update_scales(ks, vs, k, v)
        q, k = apply_rotary(q, k, cos, sin)
        return q, k, v

    def attend(
        self,
        qkv: QKV,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttnMeta,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention over the paged cache (writing k, v there first when ``project`` did not): [tokens, n_q, d]."""
        ks, vs = (None, None) if kv_scales is None else (kv_scales[0], kv_scales[1])
        return paged_attention(*qkv, k_cache, v_cache, meta, self.scale, ks, vs)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """o: [tokens, n_q, d] → the output projection [tokens, hidden]."""
        return self.o_proj(o.reshape(o.shape[0], self.n_q * self.head_dim))

    def _kv_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [tokens, n_kv, d] views of the fused projection's output."""
        t, n = qkv.shape[0], self.n_q * self.head_dim
        w = self.n_kv * self.head_dim
        return (
            qkv[:, n : n + w].view(t, self.n_kv, self.head_dim),
            qkv[:, n + w : n + 2 * w].view(t, self.n_kv, self.head_dim),
        )


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext) -> None:
        super().__init__()
        self.fast = False  # SiLU * up fused into the down projection's input (set_kernels)
        self.gate_up, start, size = gate_up_linear(cfg.hidden_size, cfg.intermediate_size, tp)
        self.size = size
        self.down = RowParallelLinear(start, size, cfg.hidden_size, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)  # [tokens, 2 * local_inter]: gate | up
        if self.fast:
            return self.down.forward_silu(gu)
        gate, up = gu.split(self.size, dim=-1)  # [tokens, local_inter] each
        return self.down(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext) -> None:
        super().__init__()
        self.fast = False  # the fused norm, rotary and SiLU kernels (set_kernels)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, tp)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

    def set_kernels(self, kernels: KernelConfig) -> None:
        self.fast = self.input_norm.fast = self.post_norm.fast = self.mlp.fast = kernels.fused
        self.mlp.down.silu_input = kernels.fused  # what the GEMV tuners time it with
        self.attn.through_cache = kernels.fused and kernels.prefill_kernel

    def forward(
        self,
        x: torch.Tensor,
        res: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttnMeta,
        kv_scales: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual stream form: the layer's input hidden is x + res (res None: x). Returns (mlp output,
        residual), whose sum is its output hidden, so the next layer's norm can fuse the add."""
        qkv, res = self.pre(x, res, cos, sin, k_cache, v_cache, meta, kv_scales)
        return self.post(self.attn.attend(qkv, k_cache, v_cache, meta, kv_scales), res)

    def pre(
        self,
        x: torch.Tensor,
        res: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttnMeta,
        kv_scales: torch.Tensor | None = None,
    ) -> tuple[QKV, torch.Tensor]:
        """The layer up to attention: input norm, QKV projection, rotary (and the K/V write with
        ``through_cache``). Returns (qkv for ``attn.attend``, residual [tokens, hidden])."""
        h, res = self.input_norm.add_forward(x, res, self.fast)  # [tokens, hidden] x2
        return self.attn.project(h, cos, sin, k_cache, v_cache, meta, kv_scales), res

    def post(self, o: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer after attention: o [tokens, n_q, d] → (mlp output, residual), as ``forward`` returns."""
        h, res = self.post_norm.add_forward(self.attn.out(o), res, self.fast)
        return self.mlp(h), res


class LlamaStage(nn.Module):
    """The layers of one stage, plus embedding (first stage) and norm + LM head (last stage). ``kernels`` is
    the stage's KernelConfig resolved for its device (``hexgen.kernels.choice.resolve``)."""

    def __init__(
        self, cfg: ModelConfig, stage: StageSpec, tp: TPContext, kernels: KernelConfig, with_head: bool = True
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.stage = stage
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if stage.is_first else None
        if self.embed is not None:
            self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp) for _ in range(stage.num_layers))
        has_head = stage.is_last and with_head
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if has_head else None
        self.lm_head = ReplicatedLinear(cfg.hidden_size, cfg.vocab_size) if has_head else None
        self.set_kernels(kernels)

    def set_kernels(self, kernels: KernelConfig) -> None:
        """Hand ``kernels`` (resolved for this stage's device) to every layer; the stage is built with it, and
        A/B profiles switch it between runs."""
        self.kernels = kernels
        for layer in self.layers:
            layer.set_kernels(kernels)
        if self.norm is not None:
            self.norm.fast = kernels.fused

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttnMeta,
        kv_scales: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: token ids [tokens] on the first stage, else hidden states [tokens, hidden].
        kv_cache: [layers, 2, slots, n_kv_local, d]; kv_scales: [layers, 2, n_kv_local] with an fp8 cache
        (``hexgen.kernels.kv_quant``), else None. Returns hidden states [tokens, hidden]."""
        if self.embed is not None:
            x = self.embed(x)  # [tokens, hidden]
        res = None
        for i, layer in enumerate(self.layers):
            x, res = layer(
                x, res, cos, sin, kv_cache[i, 0], kv_cache[i, 1], meta, None if kv_scales is None else kv_scales[i]
            )
        return x if res is None else x + res

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [n, hidden] (the rows to sample) → float32 logits [n, vocab]."""
        return self.lm_head(self.norm(hidden)).float()
