"""Hugging Face transformers ``generate`` on the same shapes: the baseline every engine figure is set beside.

Eager execution (no torch.compile, the default dynamic cache, the default attention implementation), greedy.
"""

from __future__ import annotations

import time

import torch

from hexgen.bench.stats import RequestTiming
from hexgen.config import ModelConfig
from hexgen.engine.types import Request


def hf_config(cfg: ModelConfig):
    """A transformers LlamaConfig of ``cfg``'s shape (rope theta and llama3 scaling included)."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", **cfg.rope_scaling_dict, "rope_theta": cfg.rope_theta}
    eos = list(cfg.eos_token_ids)
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters=rope,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
    )


def load_hf_model(
    model_dir: str | None,
    cfg: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    seed: int = 0,
    random_weights: bool = False,
):
    """The checkpoint in ``model_dir``; or, with ``random_weights`` (or no ``model_dir``: a preset), a
    random-init LlamaForCausalLM of that shape: ``model_dir``'s config.json when given, else ``cfg``'s.
    Random weights never read the directory's safetensors (it may have none)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_dir is not None and not random_weights:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    hf_cfg = AutoConfig.from_pretrained(model_dir) if model_dir is not None else hf_config(cfg)
    torch.manual_seed(seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.eval()


class _StepClock:
    """A generate streamer that stamps each decoding step (after the device finishes it)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate first hands over the prompt ids
            self._prompt_seen = True
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.monotonic())

    def end(self) -> None:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generate_batch(model, batch: list[Request], device: torch.device) -> tuple[float, list[float]]:
    """One static batch, left-padded, run until its longest request is done. Returns (start, step stamps)."""
    longest = max(len(r.prompt_ids) for r in batch)
    ids = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros(len(batch), longest, dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, longest - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, longest - len(r.prompt_ids) :] = 1
    new = max(r.params.max_new_tokens for r in batch)
    clock = _StepClock(device)
    _sync(device)
    start = time.monotonic()
    model.generate(
        ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        streamer=clock,
    )
    _sync(device)
    return start, clock.stamps


def run_static_batches(
    model, requests: list[Request], batch_size: int, device: torch.device, max_batches: int | None = None
) -> tuple[list[RequestTiming], dict]:
    """Requests in arrival order, ``batch_size`` at a time; all offered at the first batch's start.

    Each request is credited only with its own tokens (its ``max_new_tokens`` first steps of the batch).
    With ``max_batches`` only the first batches run (a subsample); the caller scales and says so.
    """
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    ran = batches[:max_batches] if max_batches else batches
    timings: list[RequestTiming] = []
    offered = None
    for batch in ran:
        start, stamps = generate_batch(model, batch, device)
        offered = start if offered is None else offered
        for r in batch:
            timings.append(RequestTiming(offered, stamps[: r.params.max_new_tokens]))
    info = {
        "batch_size": batch_size,
        "batches_run": len(ran),
        "batches_total": len(batches),
        "requests_run": sum(len(b) for b in ran),
        "requests_total": len(requests),
    }
    return timings, info


def warm_up(model, device: torch.device, vocab: int) -> None:
    ids = torch.randint(3, vocab, (1, 16), device=device)
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            pad_token_id=0,
        )
    _sync(device)
