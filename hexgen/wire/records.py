"""The registry records workers write to Redis (``hexgen:worker:<id>`` and ``hexgen:pipeline:<id>`` hashes) and
read back, flat string fields checked as they are decoded."""

from __future__ import annotations

from dataclasses import dataclass, field

from hexgen.wire.protocol import Fields, _get, _int, _opt_int, str_fields


@dataclass(frozen=True)
class WorkerRecord:
    """One TP rank of one stage, as registered in ``hexgen:worker:<id>`` (a hash of plain strings)."""

    pipeline: str
    stage: int
    tp_rank: int
    host: str
    device: str
    memory: int  # bytes of device memory
    pid: int
    version: str
    model: str
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def to_fields(self) -> dict[str, str]:
        out = {
            "pipeline": self.pipeline,
            "stage": str(self.stage),
            "tp_rank": str(self.tp_rank),
            "host": self.host,
            "device": self.device,
            "memory": str(self.memory),
            "pid": str(self.pid),
            "version": self.version,
            "model": self.model,
        }
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_fields(cls, fields: Fields) -> WorkerRecord:
        f = str_fields(fields)
        known = ("pipeline", "stage", "tp_rank", "host", "device", "memory", "pid", "version", "model")
        return cls(
            pipeline=_get(f, "pipeline", "worker record"),
            stage=_int(f, "stage", "worker record"),
            tp_rank=_int(f, "tp_rank", "worker record"),
            host=f.get("host", ""),
            device=f.get("device", ""),
            memory=_opt_int(f, "memory"),
            pid=_opt_int(f, "pid"),
            version=f.get("version", ""),
            model=f.get("model", ""),
            extra={k: v for k, v in f.items() if k not in known},
        )


@dataclass(frozen=True)
class PipelineRecord:
    """One pipeline, as published in ``hexgen:pipeline:<pid>`` (state, layout, rendezvous address)."""

    state: str
    layout: str = ""
    rendezvous: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def to_fields(self) -> dict[str, str]:
        out = {"state": self.state, "layout": self.layout, "rendezvous": self.rendezvous}
        out.update({k: v for k, v in self.extra.items() if k not in out})
        return out

    @classmethod
    def from_fields(cls, fields: Fields) -> PipelineRecord:
        f = str_fields(fields)
        return cls(
            state=f.get("state", "unknown"),
            layout=f.get("layout", ""),
            rendezvous=f.get("rendezvous", ""),
            extra={k: v for k, v in f.items() if k not in ("state", "layout", "rendezvous")},
        )
