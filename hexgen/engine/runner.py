"""One rank's model runner: builds its stage, loads its weights, sizes its KV cache, runs a step."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

import torch

from hexgen.config import EngineConfig, ModelConfig, preset
from hexgen.engine import nano_batch
from hexgen.engine.cuda_graph import DecodeGraphs, graph_output_bytes
from hexgen.engine.emulation import memory_cap
from hexgen.engine.kv_cache import allocate_cache, kv_bytes_per_block
from hexgen.engine.plan import StepPlan
from hexgen.engine.scheduler import max_step_batch
from hexgen.engine.threads import CpuThreads
from hexgen.errors import ConfigError
from hexgen.kernels import cpu_layout, fp8_linear, gemv, kv_quant
from hexgen.kernels.choice import resolve
from hexgen.kernels.staging import upload
from hexgen.model.attention import AttnMeta, build_meta, decode_meta
from hexgen.model.loader import build_stage, init_random, load_stage
from hexgen.model.rope import RotaryCache
from hexgen.parallel.groups import PipelineGroups
from hexgen.quantization import weight_format

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Where the weights come from: a Hugging Face directory, or a preset shape with random weights."""

    model_dir: str | None = None
    preset: str | None = None
    random_weights: bool = False

    def __post_init__(self) -> None:
        if (self.model_dir is None) == (self.preset is None):
            raise ConfigError("model: give exactly one of a model directory or a preset")
        if self.preset is not None and not self.random_weights:
            raise ConfigError(f"preset {self.preset!r}: presets have no checkpoint; add --random-weights")

    @property
    def name(self) -> str:
        """The checkpoint's directory name, or the preset's name: the same on every host."""
        if self.model_dir is not None:
            return os.path.basename(os.path.normpath(self.model_dir))
        return f"{self.preset}/random"

    def config(self) -> ModelConfig:
        return preset(self.preset) if self.preset else ModelConfig.from_dir(self.model_dir)


class StageRunner:
    def __init__(self, model: ModelSpec, engine: EngineConfig, groups: PipelineGroups) -> None:
        cfg = model.config()
        self.cfg = replace(cfg, quantization=weight_format(cfg.quantization, engine.quantization))
        self.engine = engine
        self.model_name = model.name  # what the prefix cache's hashes are seeded with
        self.groups = groups
        self.device = groups.device
        self.dtype = getattr(torch, engine.dtype)
        self.kernels = resolve(engine.kernels, self.device)  # what runs here, handed to every layer
        stage = groups.stage
        self.model = build_stage(
            self.cfg, stage, groups.tp, self.dtype, self.device, with_head=groups.is_leader, kernels=self.kernels
        )
        if model.random_weights:
            init_random(self.model, engine.seed, groups.tp.rank)
        else:
            load_stage(self.model, model.model_dir, progress=groups.is_leader)
        self.linears = [m for m in self.model.modules() if hasattr(m, "gemv") and not fp8_linear.is_fp8(m)]
        gemv.tune(self.linears, self.kernels.gemv)  # batch-1 linears: the Triton GEMV, timed on these weights
        fp8 = [m for m in self.model.modules() if fp8_linear.is_fp8(m)]
        fp8_linear.tune(fp8, self.kernels.gemv, self.kernels.fp8_gemv)
        if self.kernels.cpu_layout:  # on CPU: each shape's weights in the storage order its GEMV reads fastest
            cpu_layout.tune(self.linears)
        self.max_len = engine.max_model_len or self.cfg.max_position_embeddings
        self.rotary = RotaryCache(self.cfg, self.max_len, self.device)
        self.n_kv_local = self.model.layers[0].attn.n_kv
        self.kv_dtype = kv_quant.FP8 if engine.kv_cache_dtype == "fp8" else self.dtype
        # TP > 1: decode-sized all-reduces take the symmetric-memory one-shot kernel (bf16/fp32), which
        # captures into the decode graphs with no NCCL work inside them. NCCL all-reduces captured in a
        # graph hung on two H100s, so without the one-shot kernel TP > 1 stays eager.
        # The most sequences a step carries: max_num_seqs split over the micro-batches in flight.
        self.step_batch = max_step_batch(engine.max_num_seqs, engine.micro_batches or groups.layout.num_stages)
        fast_ar = self.kernels.all_reduce == "symm" and groups.enable_fast_all_reduce(
            self.step_batch * self.cfg.hidden_size, self.dtype
        )
        use_graphs = engine.cuda_graphs and (groups.tp.size == 1 or fast_ar)
        if engine.cuda_graphs and not use_graphs:
            log.warning(
                "stage %d: CUDA graphs are off: TP %d without the symmetric-memory all-reduce",
                stage.index,
                groups.tp.size,
            )
        self._use_graphs = use_graphs
        # decode steps as two nano-batches on two streams (hexgen.engine.nano_batch): TP 1 stages on CUDA
        self._side = torch.cuda.Stream(self.device) if self.kernels.overlap and groups.tp.size == 1 else None
        # With decode graphs one extra block (index num_blocks, never handed out) takes padding rows' writes.
        spare = 1 if use_graphs else 0
        self.blocks_fit = self._blocks_that_fit() - spare  # this rank alone; every rank keeps the smallest
        self.num_blocks = groups.world_min(self.blocks_fit)
        self.kv = allocate_cache(
            stage.num_layers,
            self.num_blocks + spare,
            engine.block_size,
            self.n_kv_local,
            self.cfg.head_dim,
            self.kv_dtype,
            self.device,
        )
        # fp8: [layers, 2, n_kv_local] scales, fixed by the first eager step that writes (hexgen.kernels.kv_quant)
        self.kv_scales = (
            kv_quant.allocate_scales(stage.num_layers, self.n_kv_local, self.device)
            if self.kv_dtype == kv_quant.FP8
            else None
        )
        self._kv_written = False
        self.graphs = (
            DecodeGraphs(
                self._decode_forward,
                stage.is_first,
                self.cfg.hidden_size,
                self.dtype,
                self.device,
                engine.block_size,
                self.step_batch,
                self.max_len,
                scratch_block=self.num_blocks,
                kernels=self.kernels,
            )
            if use_graphs
            else None
        )
        if self.graphs is not None:
            self.graphs.capture_all()
        self._graph_logits: tuple[int, torch.Tensor] | None = None  # (step id, logits) of the last graph step
        self.cpu_threads: CpuThreads | None = None  # CPU ranks: set by run_rank
        if self.device.type == "cuda":
            self.warm_up()
        log.info(
            "stage %d rank %d/%d: %d KV heads, %d bytes per token; fits %d KV blocks alone; the pipeline keeps "
            "%d blocks (%d tokens, %s cache, the least any rank fits)",
            stage.index,
            groups.tp.rank,
            groups.tp.size,
            self.n_kv_local,
            kv_bytes_per_block(self.cfg, stage, self.n_kv_local, 1, self.kv_dtype),
            self.blocks_fit,
            self.num_blocks,
            self.num_blocks * engine.block_size,
            engine.kv_cache_dtype,
        )

    def warm_up_plans(self) -> list[StepPlan]:
        """Eager steps of the sizes serving meets: the whole token budget (one prefill chunk and a decode
        row), about half of it at sizes that are not multiples of 16, and a small chunk. Every row's block
        table points at one block that holds no sequence's data (the graphs' scratch block, or block 0 before
        any request), so the steps' writes land nowhere that is read."""
        bs, blk = self.engine.block_size, self.num_blocks if self._use_graphs else 0
        budget = min(self.engine.max_num_batched_tokens, self.max_len)
        plans = []
        for chunk, decodes in ((budget - 1, 1), (budget // 2 + 7, 3), (5, 0)):
            chunk = max(1, min(chunk, budget - decodes))
            q_lens = [1] * decodes + [chunk]
            ctx = [2] * decodes + [chunk]
            positions = [1] * decodes + list(range(chunk))
            plans.append(
                StepPlan(
                    len(plans),
                    seq_ids=list(range(len(q_lens))),
                    input_ids=[0] * len(positions),
                    positions=positions,
                    q_lens=q_lens,
                    ctx_lens=ctx,
                    block_tables=[[blk] * -(-c // bs) for c in ctx],
                    sample=[True] * len(q_lens),
                    out_lens=[0] * len(q_lens),
                )
            )
        return plans

    def warm_up(self) -> float:
        """Run ``warm_up_plans`` eagerly, with the LM head where this rank holds it, so that no serving step
        pays for compiling a kernel variant or for growing the memory pool (each a device stall of tenths of a
        second). An fp8 cache's scales stay unset: the first real write fixes them. Returns the seconds it
        took."""
        start = time.perf_counter()
        for plan in self.warm_up_plans():
            if self.groups.stage.is_first:
                x = torch.zeros(plan.num_tokens, dtype=torch.long, device=self.device)
            else:
                x = torch.zeros(plan.num_tokens, self.cfg.hidden_size, dtype=self.dtype, device=self.device)
            hidden = self.forward(plan, x)
            if self.model.lm_head is not None:
                self.logits(plan, hidden)
        if self.kv_scales is not None:
            self.kv_scales.zero_()
            self._kv_written = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        took = time.perf_counter() - start
        log.info("stage %d: warmed up the eager step path in %.2f s", self.groups.stage.index, took)
        return took

    def _blocks_that_fit(self) -> int:
        e = self.engine
        if e.num_kv_blocks:
            return e.num_kv_blocks
        per_block = kv_bytes_per_block(self.cfg, self.groups.stage, self.n_kv_local, e.block_size, self.kv_dtype)
        if self.device.type != "cuda":
            return max(1, e.cpu_kv_tokens // e.block_size)
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()  # blocks cached by start-up work would otherwise count as in use
        free, total = torch.cuda.mem_get_info(self.device)
        cap = memory_cap(self.device)  # an emulated smaller card (hexgen.engine.emulation)
        if cap is not None:
            free, total = max(0, cap - torch.cuda.memory_reserved(self.device)), cap
        # Everything already on the device (our weights included) counts against the fraction.
        reserve = self._activation_reserve()
        budget = total * e.gpu_memory_fraction - (total - free) - reserve
        log.info(
            "stage %d: KV budget %.2f GiB = %.2f GiB x %.2f - %.2f GiB in use - %.2f GiB activations "
            "(this process: %.2f GiB allocated, %.2f GiB reserved)",
            self.groups.stage.index,
            budget / 2**30,
            total / 2**30,
            e.gpu_memory_fraction,
            (total - free) / 2**30,
            reserve / 2**30,
            torch.cuda.memory_allocated(self.device) / 2**30,
            torch.cuda.memory_reserved(self.device) / 2**30,
        )
        return max(2, int(budget // per_block))

    def _activation_reserve(self) -> int:
        """Peak activation bytes of one step at the token budget (MLP intermediate dominates) + logits."""
        t = self.engine.max_num_batched_tokens
        elem = torch.empty(0, dtype=self.dtype).element_size()
        mlp = 3 * t * self.model.layers[0].mlp.size * elem if self.model.layers else 0  # this rank's shard
        logits = self.step_batch * self.cfg.vocab_size * 4 * 2
        graphs = (
            graph_output_bytes(
                self.step_batch, self.cfg.hidden_size, elem, self.cfg.vocab_size, self.model.lm_head is not None
            )
            if self._use_graphs
            else 0
        )
        return mlp + 4 * t * self.cfg.hidden_size * elem + logits + graphs + (256 << 20)

    @torch.inference_mode()
    def forward(self, plan: StepPlan, x: torch.Tensor) -> torch.Tensor:
        """x: token ids [tokens] (first stage) or hidden [tokens, hidden]. Returns hidden [tokens, hidden].

        Decode steps go through the captured graphs when ``cuda_graphs`` is on; everything else (and
        decode steps no bucket covers) takes the reference path below."""
        self._graph_logits = None
        if self.cpu_threads is not None:
            self.cpu_threads.apply()  # the host's rank count may have changed (hexgen.engine.threads)
        if self.graphs is not None:
            outs = self.graphs.run(plan, x)
            if outs is not None:
                if len(outs) > 1:
                    self._graph_logits = (plan.step_id, outs[1])
                return outs[0]
        k = self.kernels
        meta = build_meta(
            plan.positions,
            plan.q_lens,
            plan.ctx_lens,
            plan.block_tables,
            self.engine.block_size,
            self.device,
            kernel=k.decode_kernel,
            prefill_kernel=k.prefill_kernel,
            group_rows=k.decode_groups,
        )
        cos, sin = self.rotary.lookup(meta.positions, self.dtype)
        if self.kv_scales is not None and not self._kv_written:
            meta.calibrate_kv = True  # fp8: this step's writes fix the cache's scales
            self._kv_written = plan.num_tokens > 0
        return self.model(x, cos, sin, self.kv, meta, self.kv_scales)

    def _decode_forward(
        self, x: torch.Tensor, block_tables: torch.Tensor, ctx_lens: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """A decode step from device tensors only (graph-capturable): x [batch] ids or [batch, hidden];
        block_tables [batch, n_blocks]; ctx_lens [batch]. Returns (hidden [batch, hidden],) and, where this
        rank holds the LM head, float32 logits [batch, vocab] too: the head runs inside the graph."""
        with torch.inference_mode():
            if self._side is not None and x.shape[0] >= nano_batch.MIN_ROWS:
                halves = nano_batch.halves_of(x, block_tables, ctx_lens, self._decode_meta, self._rotary)
                hidden = nano_batch.forward(self.model, halves, self.kv, self.kv_scales, self._side)
            else:
                meta = self._decode_meta(block_tables, ctx_lens)
                cos, sin = self._rotary(ctx_lens - 1)
                hidden = self.model(x, cos, sin, self.kv, meta, self.kv_scales)  # fp8: scales fixed by eager steps
            if self.model.lm_head is None:
                return (hidden,)
            return hidden, self.model.logits(hidden)

    def _decode_meta(self, block_tables: torch.Tensor, ctx_lens: torch.Tensor) -> AttnMeta:
        return decode_meta(block_tables, ctx_lens, self.engine.block_size, kernel=self.kernels.decode_kernel)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary.lookup(positions, self.dtype)

    @torch.inference_mode()
    def logits(self, plan: StepPlan, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [sampled sequences, vocab] at the last token of each sequence that samples."""
        stash, self._graph_logits = self._graph_logits, None
        if stash is not None and stash[0] == plan.step_id and all(plan.sample):
            return stash[1]  # computed inside this step's decode graph
        rows, end = [], 0
        for n, s in zip(plan.q_lens, plan.sample):
            end += n
            if s:
                rows.append(end - 1)
        idx = upload(rows, torch.long, hidden.device)
        return self.model.logits(hidden.index_select(0, idx))
