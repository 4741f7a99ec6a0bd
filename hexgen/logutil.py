"""Logging set-up that stamps every record with the process's pipeline rank and stage."""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s [rank %(rank)s stage %(stage)s] %(name)s: %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: str, stage: str) -> None:
        super().__init__()
        self.rank, self.stage = rank, stage

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = getattr(record, "rank", self.rank)
        record.stage = getattr(record, "stage", self.stage)
        return True


def setup_logging(rank: int | str = "-", stage: int | str = "-", level: str | None = None) -> None:
    """Configure the root logger of this process (idempotent); ``level`` defaults to WARNING (the CLIs read
    ``HEXGEN_LOG_LEVEL`` and pass it down)."""
    level = level or "WARNING"
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_hexgen", False):
            root.removeHandler(h)
    handler = logging.StreamHandler()
    handler._hexgen = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(_RankFilter(str(rank), str(stage)))
    root.addHandler(handler)
    root.setLevel(level.upper())
