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
import json
import math
import os
import re
from dataclasses import dataclass, field

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
    model: dict  # the layer shape: hidden, intermediate, heads, kv_heads, head_dim
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
        # Decode: per-family (context per token) value at `tokens`, then affine in context.
        families: dict[float, list[Point]] = {}
        for p in pts:
            if not p.is_prefill:
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
        # Two families bracketing (or nearest to) the query context; slope clamped >= 0.
        cs = [c for c, _ in vals]
        i = min(max(bisect.bisect_left(cs, context), 1), len(vals) - 1)
        (c0, t0), (c1, t1) = vals[i - 1], vals[i]
        slope = max(0.0, (t1 - t0) / (c1 - c0)) if c1 > c0 else 0.0
        return max(min(t0, t1), t0 + slope * (context - c0))


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
        "points": [{"tp": p.tp, "tokens": p.tokens, "context": p.context, "seconds": p.seconds}
                   for p in cal.points],
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
    if not isinstance(d["points"], list):
        raise ConfigError("calibration.points: must be a list of {tp, tokens, context, seconds}")
    points = []
    for i, p in enumerate(d["points"]):
        if not isinstance(p, dict) or set(p) != {"tp", "tokens", "context", "seconds"}:
            raise ConfigError(f"calibration.points[{i}]: {p!r} must have exactly tp, tokens, context, seconds")
        points.append(Point(p["tp"], p["tokens"], p["context"], p["seconds"]))
    meta = d.get("meta", {})
    if not isinstance(meta, dict):
        raise ConfigError("calibration.meta: must be an object")
    dtype = d.get("dtype", "bfloat16")
    if not isinstance(dtype, str):
        raise ConfigError(f"calibration.dtype: {dtype!r} must be a string")
    return Calibration(d["device"], d["model"], tuple(points), dtype, meta)


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
