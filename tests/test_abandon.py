"""A request whose results another pipeline took over stops at stage 0 (sink.lost() → StepResult.abandoned)."""

import torch
import torch.distributed as dist

from hexgen.config import EngineConfig, Layout, preset
from hexgen.engine.offline import ListSource
from hexgen.engine.pipeline import FirstLeader, LastStage
from hexgen.engine.runner import ModelSpec, StageRunner
from hexgen.engine.types import Request, SamplingParams, StepOutput
from hexgen.parallel.groups import PipelineGroups
from hexgen.procs import free_port


class LosingSink:
    """Collects outputs; reports ``victim`` as taken over once it has produced ``after`` tokens."""

    def __init__(self, victim: str, after: int) -> None:
        self.victim, self.after = victim, after
        self.outputs: list[StepOutput] = []
        self._reported = False

    def emit(self, outputs: list[StepOutput]) -> None:
        self.outputs += outputs

    def lost(self) -> list[str]:
        got = sum(len(o.ids) for o in self.outputs if o.request_id == self.victim)
        if got >= self.after and not self._reported:
            self._reported = True
            return [self.victim]
        return []

    def close(self) -> None:
        pass


def test_abandoned_request_stops_and_others_finish():
    model = ModelSpec(preset="tiny", random_weights=True)
    layout = Layout.build(preset("tiny"), [1], None)
    engine = EngineConfig(cpu_kv_tokens=4096)
    groups = PipelineGroups(layout, 0, f"tcp://127.0.0.1:{free_port()}", torch.device("cpu"))
    try:
        runner = StageRunner(model, engine, groups)
        sink = LosingSink("victim", after=3)
        params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
        reqs = [Request(rid, [5, 6, 7, 8], params) for rid in ("victim", "keeper")]
        FirstLeader(groups, runner, engine, ListSource([r.to_dict() for r in reqs]),
                    LastStage(runner, model, sink, False)).run()
    finally:
        groups.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    tokens = {rid: sum(len(o.ids) for o in sink.outputs if o.request_id == rid) for rid in ("victim", "keeper")}
    final = {o.request_id: o.finish_reason for o in sink.outputs if o.finish_reason}
    assert tokens["keeper"] == 40 and final["keeper"] == "length"
    assert 3 <= tokens["victim"] < 40  # stopped within the steps already in flight
    assert final["victim"] == "cancelled"
