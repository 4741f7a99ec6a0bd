"""Host time a loop spends in each of its phases (the stage-0 loop logs it at the end of a run)."""
from __future__ import annotations

import time


class LoopClock:
    """Host seconds a loop spends in each of its phases (``lap(name)`` ends the phase called name)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.spent: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.spent[name] = self.spent.get(name, 0.0) + now - self.last
        self.last = now

    def line(self) -> str:
        total = self.last - self.start
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.spent.items(), key=lambda kv: -kv[1]))
        return f"{total:.2f} s: {parts}"
