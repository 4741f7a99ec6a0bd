"""Measured per-layer times (the JSON file ``bin/hexgen profile`` writes) and their interpolation.

A calibration holds, for one device and one layer shape, the median time of ONE decoder layer on one TP rank
at several (tp, tokens, context) points. TP > 1 points time one rank's shard shapes with the all-reduce left
out (the cost model adds the collective from the link), so they are valid on any interconnect.

Two families of points are measured: prefill steps (``context == tokens``: one prompt of that length) and
decode steps (``tokens`` sequences with ``context / tokens`` cached positions each, at one or more contexts).
Lookups interpolate log-log in tokens inside a family, and linearly in context across decode families (a
decode step's time is close to affine in the KV it reads). Outside the measured token range the lookup
returns None and the cost model falls back to its datasheet estimate.
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import cast

from hexgen.errors import ConfigError

FORMAT_VERSION = 1
MODEL_KEYS = ("hidden", "intermediate", "heads", "kv_heads", "head_dim")
# A step whose context is below this multiple of its tokens counts as a prefill (else a decode).
PREFILL_RATIO = 2.0


@dataclass(frozen=True)
class Point:
    """One measurement: one decoder layer, one rank of TP ``tp``, ``tokens`` new tokens, ``context`` positions."""

    tp: int
    tokens: int
    context: int
    seconds: float

    def __post_init__(self) -> None:
        for name in ("tp", "tokens", "context"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"calibration point {name}: {v!r} must be an integer >= 1")
        if self.context < self.tokens:
            raise ConfigError(f"calibration point context: {self.context} must be >= tokens ({self.tokens})")
        s = self.seconds
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s < math.inf:
            raise ConfigError(f"calibration point seconds: {s!r} must be a finite number > 0")

    @property
    def is_prefill(self) -> bool:
        return self.context < PREFILL_RATIO * self.tokens


def _norm(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", str(name).lower())


@dataclass(frozen=True)
class Calibration:
    """Measured per-layer times for one device and one layer shape."""

    device: str  # DeviceSpec name it was measured on
    model: dict = field(hash=False)  # the layer shape: hidden, intermediate, heads, kv_heads, head_dim
    points: tuple[Point, ...]  # (tp, tokens, context, seconds)
    dtype: str = "bfloat16"
    meta: dict = field(default_factory=dict, compare=False, hash=False)  # torch version, host, reps, ...

    def __post_init__(self) -> None:
        if not isinstance(self.device, str) or not self.device:
            raise ConfigError(f"calibration device: {self.device!r} must be a device name")
        if not isinstance(self.model, dict):
            raise ConfigError(f"calibration model: {self.model!r} must be a table of {', '.join(MODEL_KEYS)}")
        for k in MODEL_KEYS:
            v = self.model.get(k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"calibration model.{k}: {v!r} must be an integer >= 1")
        if not self.points:
            raise ConfigError("calibration points: at least one measurement is needed")
        object.__setattr__(self, "points", tuple(self.points))
        for p in self.points:
            if not isinstance(p, Point):
                raise ConfigError(f"calibration points: {p!r} is not a Point")

    def matches_device(self, name: str) -> bool:
        """Whether ``name`` is the device measured (case- and punctuation-insensitive)."""
        return _norm(name) == _norm(self.device)

    def tp_degrees(self) -> list[int]:
        return sorted({p.tp for p in self.points})

    def layer_time(self, tp: int, tokens: int, context: int, device: str | None = None) -> float | None:
        """Interpolated time of one layer on one rank; None when out of the measured range, when ``tp`` was not
        measured, or when ``device`` is given and is not the measured device."""
        if device is not None and not self.matches_device(device):
            return None
        pts = [p for p in self.points if p.tp == tp]
        if not pts or tokens < 1:
            return None
        context = max(context, tokens)
        if context < PREFILL_RATIO * tokens:
            return _interp_tokens([p for p in pts if p.is_prefill], tokens)
        return _interp_decode([p for p in pts if not p.is_prefill], tokens, context)


def _interp_decode(pts: list[Point], tokens: int, context: int) -> float | None:
    """Decode time: per-family (context per token) value at ``tokens``, then affine in context."""
    families: dict[float, list[Point]] = {}
    for p in pts:
        families.setdefault(round(p.context / p.tokens, 6), []).append(p)
    vals = []
    for ratio in sorted(families):
        t = _interp_tokens(families[ratio], tokens)
        if t is not None:
            vals.append((ratio * tokens, t))
    if not vals:
        return None
    if len(vals) == 1:
        c0, t0 = vals[0]
        return t0 if 0.5 <= context / c0 <= 2.0 else None
    # Linear between the two families bracketing the query context; beyond the measured contexts,
    # extrapolated from the nearest end with the end segment's slope (clamped >= 0).
    cs = [c for c, _ in vals]
    i = min(max(bisect.bisect_left(cs, context), 1), len(vals) - 1)
    (c0, t0), (c1, t1) = vals[i - 1], vals[i]
    slope = (t1 - t0) / (c1 - c0) if c1 > c0 else 0.0
    if c0 <= context <= c1:
        return t1 if context == c1 else t0 + slope * (context - c0)
    end_c, end_t = (c0, t0) if context < c0 else (c1, t1)
    return max(min(t0, t1), end_t + max(0.0, slope) * (context - end_c))


def _interp_tokens(pts: list[Point], tokens: int) -> float | None:
    """Log-log interpolation of seconds over tokens; None outside [min, max] measured tokens."""
    if not pts:
        return None
    by_tokens: dict[int, list[float]] = {}
    for p in pts:
        by_tokens.setdefault(p.tokens, []).append(p.seconds)
    xs = sorted(by_tokens)
    ys = [sorted(by_tokens[x])[len(by_tokens[x]) // 2] for x in xs]
    if tokens < xs[0] or tokens > xs[-1]:
        return None
    i = bisect.bisect_left(xs, tokens)
    if xs[i] == tokens:
        return ys[i]
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    f = (math.log(tokens) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))


def calibration_to_dict(cal: Calibration) -> dict:
    """The JSON form of a calibration."""
    return {
        "format": FORMAT_VERSION,
        "device": cal.device,
        "dtype": cal.dtype,
        "model": dict(cal.model),
        "points": [{"tp": p.tp, "tokens": p.tokens, "context": p.context, "seconds": p.seconds} for p in cal.points],
        "meta": dict(cal.meta),
    }


def calibration_from_dict(d: dict) -> Calibration:
    """Parse the JSON form; ConfigError naming the key on anything malformed."""
    if not isinstance(d, dict):
        raise ConfigError("calibration: expected a JSON object")
    allowed = ("format", "device", "dtype", "model", "points", "meta")
    for k in d:
        if k not in allowed:
            raise ConfigError(f"calibration.{k}: unknown key; allowed keys: {', '.join(allowed)}")
    if d.get("format", FORMAT_VERSION) != FORMAT_VERSION:
        raise ConfigError(f"calibration.format: {d.get('format')!r} is not supported; expected {FORMAT_VERSION}")
    for k in ("device", "model", "points"):
        if k not in d:
            raise ConfigError(f"calibration.{k}: missing")
    points = _points_from_list(d["points"])
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise ConfigError("calibration.meta: must be an object")
    dtype = d.get("dtype", "bfloat16")
    if not isinstance(dtype, str):
        raise ConfigError(f"calibration.dtype: {dtype!r} must be a string")
    return Calibration(d["device"], d["model"], tuple(points), dtype, meta)


def _points_from_list(items: object) -> list[Point]:
    if not isinstance(items, list):
        raise ConfigError("calibration.points: must be a list of {tp, tokens, context, seconds}")
    points = []
    for i, p in enumerate(items):
        if not isinstance(p, dict) or set(p) != {"tp", "tokens", "context", "seconds"}:
            raise ConfigError(f"calibration.points[{i}]: {p!r} must have exactly tp, tokens, context, seconds")
        points.append(Point(p["tp"], p["tokens"], p["context"], p["seconds"]))
    return points


def load_calibration(path: str) -> Calibration:
    """Read a calibration JSON file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ConfigError(f"calibration: cannot read {path!r}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"calibration: {path!r} is not valid JSON: {e}") from e
    return calibration_from_dict(data)


def save_calibration(cal: Calibration, path: str) -> None:
    """Write a calibration JSON file (atomically: a temporary file renamed into place)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(calibration_to_dict(cal), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


# -- measurement (bin/hexgen profile) -------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileConfig:
    """What ``bin/hexgen profile`` measures: decode batches at each per-sequence context, and prefill lengths,
    for each TP degree (one rank's shard shapes, no collective)."""

    tp_degrees: tuple[int, ...] = (1,)
    batches: tuple[int, ...] = (1, 8, 32, 128)  # decode: sequences per step, one new token each
    contexts: tuple[int, ...] = (128, 1024)  # decode: cached positions per sequence
    prefills: tuple[int, ...] = (128, 512, 2048)  # prefill: prompt length of one sequence
    warmup: int = 3
    reps: int = 10
    block_size: int = 16
    seed: int = 0
    graphs: bool = True  # CUDA: time decode points as CUDA-graph replays, the way the engine runs decode

    def __post_init__(self) -> None:
        if not isinstance(self.graphs, bool):
            raise ConfigError(f"graphs: {self.graphs!r} must be true or false")
        for name in ("tp_degrees", "batches", "contexts", "prefills"):
            vals = tuple(getattr(self, name))
            object.__setattr__(self, name, vals)
            for v in vals:
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 1 << 20:
                    raise ConfigError(f"{name}: {v!r} must be an integer in [1, {1 << 20}]")
        for c in self.contexts:
            if c < PREFILL_RATIO:
                raise ConfigError(f"contexts: {c} must be >= {PREFILL_RATIO:g} (a decode reads a cached context)")
        if not self.tp_degrees or not (self.batches and self.contexts or self.prefills):
            raise ConfigError("profile: give at least one TP degree and some decode batches or prefill lengths")
        for name, low in (("warmup", 0), ("reps", 1), ("block_size", 1), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= 1 << 30:
                raise ConfigError(f"{name}: {v!r} must be an integer >= {low}")


def measure(cfg, device: str, dtype: str, device_name: str, prof: ProfileConfig, log=lambda msg: None) -> Calibration:
    """Time ONE decoder layer of ``cfg`` (random weights, hexgen.model.llama) on ``device`` ("cpu", "cuda",
    "cuda:1") at every point of ``prof``: CUDA events on GPUs, perf_counter on CPU; warm-up, then the median of
    ``reps`` runs. TP > 1 builds one rank's shard shapes with the all-reduce replaced by a no-op: the cost model
    adds the collective from the link, so these points hold on any interconnect."""
    import platform
    import statistics
    import time

    import torch

    from hexgen.config import StageSpec, normalize_dtype, valid_tp_degrees
    from hexgen.engine.kv_cache import allocate_cache
    from hexgen.kernels.timing import replay_time
    from hexgen.model.attention import build_meta
    from hexgen.model.llama import DecoderLayer
    from hexgen.model.loader import build_stage, init_random
    from hexgen.model.rope import RotaryCache
    from hexgen.parallel.groups import TPContext

    class ShardOnly(TPContext):
        """One rank's shapes of a TP group, with the collective left out (modelled separately)."""

        def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
            return x

    dev = torch.device(device)
    tdtype = getattr(torch, normalize_dtype(dtype))
    cuda = dev.type == "cuda"
    valid = valid_tp_degrees(cfg, 1 << 16)
    bs = prof.block_size
    shapes = [(b, b * c) for b in prof.batches for c in prof.contexts]
    shapes += [(n, n) for n in prof.prefills]
    max_len = max((*prof.contexts, *prof.prefills)) + 1
    rotary = RotaryCache(cfg, max_len, dev)
    points = []
    for tp in prof.tp_degrees:
        if tp not in valid:
            raise ConfigError(f"tp-degrees: {tp} is not valid for this model; valid: {', '.join(map(str, valid))}")
        stage = StageSpec(index=1, tp=tp, layer_start=0, layer_end=1, first_rank=0, num_stages=3)  # no embed/head
        model = build_stage(cfg, stage, ShardOnly(0, tp), tdtype, dev)
        init_random(model, prof.seed, 0)
        n_kv = cast(DecoderLayer, model.layers[0]).attn.n_kv
        for tokens, context in shapes:
            per_seq = context // tokens
            seqs, q_len = (tokens, 1) if context > tokens else (1, tokens)
            blocks_per_seq = -(-per_seq // bs) if context > tokens else -(-tokens // bs)
            kv = allocate_cache(1, seqs * blocks_per_seq, bs, n_kv, cfg.head_dim, tdtype, dev)
            tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(seqs)]
            ctx_len = per_seq if context > tokens else tokens
            positions = [p for _ in range(seqs) for p in range(ctx_len - q_len, ctx_len)]
            meta = build_meta(positions, [q_len] * seqs, [ctx_len] * seqs, tables, bs, dev)
            cos, sin = rotary.lookup(cast(torch.Tensor, meta.positions), tdtype)  # build_meta sets them
            g = torch.Generator(device=dev).manual_seed(prof.seed)
            x = torch.randn(tokens, cfg.hidden_size, generator=g, device=dev).to(tdtype)  # [tokens, hidden]
            times = []
            with torch.inference_mode():
                if cuda and prof.graphs and context > tokens:
                    step = functools.partial(model, x, cos, sin, kv, meta)
                    times.append(replay_time(step, prof.warmup, prof.reps))
                for i in range(0 if times else prof.warmup + prof.reps):
                    if cuda:
                        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        start.record()
                        model(x, cos, sin, kv, meta)
                        end.record()
                        end.synchronize()
                        took = start.elapsed_time(end) / 1e3
                    else:
                        t0 = time.perf_counter()
                        model(x, cos, sin, kv, meta)
                        took = time.perf_counter() - t0
                    if i >= prof.warmup:
                        times.append(took)
            secs = statistics.median(times)
            points.append(Point(tp, tokens, context, secs))
            log(f"tp {tp} tokens {tokens} context {context}: {secs * 1e6:.1f} us")
            del kv
        del model
        if cuda:
            torch.cuda.empty_cache()
    from hexgen.planner.costmodel import layer_shape

    info = {
        "torch": torch.__version__,
        "host": platform.node(),
        "torch_device": device,
        "device_label": torch.cuda.get_device_name(dev) if cuda else platform.processor() or "cpu",
        "warmup": prof.warmup,
        "reps": prof.reps,
        "block_size": bs,
        "graphs": prof.graphs and cuda,
        "note": "one decoder layer, one TP rank's shard shapes, all-reduce excluded"
        + ("; decode points: mean of CUDA-graph replays" if prof.graphs and cuda else ""),
    }
    return Calibration(device_name, layer_shape(cfg), tuple(points), normalize_dtype(dtype), info)
