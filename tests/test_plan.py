"""The messages between ranks (hexgen/engine/plan.py): typed parts survive the msgpack round trip."""
from hexgen.engine.plan import Abort, NewSequence, StepPlan, StepResult
from hexgen.engine.types import Request, SamplingParams


def test_plan_round_trip_keeps_typed_messages():
    req = Request("r1", [1, 2, 3], SamplingParams(max_new_tokens=4, temperature=0.5, seed=7), [9], {"entry": "1-0"})
    plan = StepPlan(3, seq_ids=[0, 1], input_ids=[1, 2, 3, -1], positions=[0, 1, 2, 5], q_lens=[3, 1],
                    ctx_lens=[3, 6], block_tables=[[4], [2, 5]], sample=[True, True], out_lens=[1, 0],
                    new_requests=[NewSequence(0, req)],
                    cancelled=[Abort(7, "r7", "cancelled"), Abort(8, "r8", "length", req)])
    back = StepPlan.decode(plan.encode())
    assert back == plan
    assert isinstance(back.new_requests[0], NewSequence) and back.new_requests[0].request.params.seed == 7
    assert back.cancelled[0].request is None and back.cancelled[1].request.meta == {"entry": "1-0"}
    assert StepPlan.decode(StepPlan(9, shutdown=True).encode()).shutdown


def test_result_round_trip():
    res = StepResult(3, seq_ids=[0, 1], tokens=[11, 12], finished=[False, True], abandoned=["x"])
    assert StepResult.decode(res.encode()) == res
