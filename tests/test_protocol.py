"""Codecs of hexgen.wire.protocol and names of hexgen.wire.keys."""
from __future__ import annotations

import msgpack
import pytest

from hexgen.engine.types import Request, SamplingParams
from hexgen.wire import keys as C
from hexgen.wire.records import PipelineRecord, WorkerRecord
from hexgen.wire.protocol import (DoneEvent, ErrorEvent, InternalError, InvalidRequest, NotFound,
                                     Overloaded, ProtocolError, RequestError, TokenEvent,
                                     cancel_fields, decode_work_item, done_event,
                                     encode_work_item, error_event, parse_cancel, parse_event, request_error,
                                     request_fields, token_event)


def _bytes(fields):
    """What redis-py hands back: bytes names and values."""
    return {k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in fields.items()}


def test_names_match_design():
    assert C.REQUESTS_STREAM == "hexgen:requests" and C.HEADS_GROUP == "heads"
    assert C.work_stream("m") == "hexgen:work:m" and C.PIPELINES_GROUP == "pipelines"
    assert C.result_stream("abc") == "hexgen:result:abc"
    assert C.CANCEL_STREAM == "hexgen:cancel" and C.DEADLETTER_STREAM == "hexgen:deadletter"
    assert C.worker_key("w") == "hexgen:worker:w" and C.heartbeat_key("w") == "hexgen:hb:w"
    assert C.pipeline_key("p0") == "hexgen:pipeline:p0"
    assert C.socket_timeout_for(C.BLOCK_MS) > C.BLOCK_MS / 1000


def test_work_item_round_trip_bytes_and_str():
    req = Request("req-1", [1, 2, 3], SamplingParams(max_new_tokens=7, temperature=0.5, top_k=3, top_p=0.9,
                                                     seed=11, stop=("\n", "END")),
                  output_ids=[9], meta={"request_entry": "1-0", "t": 1.5})
    fields = encode_work_item(req, "tiny")
    assert fields["id"] == b"req-1" and fields["model"] == b"tiny"
    assert msgpack.unpackb(fields["data"])["model"] == "tiny"
    for f in (fields, _bytes(fields), {k: v for k, v in fields.items()}):
        got, model = decode_work_item(f)
        assert model == "tiny"
        assert got == req


def test_work_item_rejects_garbage():
    with pytest.raises(ProtocolError, match="'data' is missing"):
        decode_work_item({b"id": b"x"})
    with pytest.raises(ProtocolError, match="not a valid msgpack"):
        decode_work_item({b"data": b"\xc1\xc1"})
    with pytest.raises(ProtocolError, match="not a valid msgpack"):
        decode_work_item({b"data": msgpack.packb({"request_id": "x"})})
    bad = msgpack.packb({**Request("x", [1], SamplingParams()).to_dict(), "model": "m"} | {
        "params": {**SamplingParams().to_dict(), "top_p": 2.0}})
    with pytest.raises(ProtocolError):
        decode_work_item({b"data": bad})


def test_work_item_meta_must_be_msgpackable():
    with pytest.raises(ProtocolError, match="msgpack"):
        encode_work_item(Request("x", [1], SamplingParams(), meta={"obj": object()}), "m")


def test_token_event_fields_match_wire_protocol():
    assert token_event(3, [10, 11], "hé") == {"event": "token", "seq": "3", "ids": "10,11", "text": "hé"}
    assert parse_event(_bytes(token_event(3, [10, 11], "hé"))) == TokenEvent(3, (10, 11), "hé")
    assert parse_event(token_event(0, [], "")) == TokenEvent(0, (), "")
    with pytest.raises(ProtocolError):
        token_event(-1, [1], "")


def test_done_and_error_events():
    assert done_event("eos", 5, 2) == {"event": "done", "finish_reason": "eos", "prompt_tokens": "5",
                                       "completion_tokens": "2", "cached_tokens": "0"}
    assert parse_event(_bytes(done_event("cancelled", 5, 0))) == DoneEvent("cancelled", 5, 0)
    assert parse_event(_bytes(done_event("stop", 40, 3, 32))) == DoneEvent("stop", 40, 3, 32)
    # an event without the field (written by an older pipeline) reads as no cached tokens
    old = {"event": "done", "finish_reason": "eos", "prompt_tokens": "5", "completion_tokens": "2"}
    assert parse_event(_bytes(old)).cached_tokens == 0
    expected = {"event": "error", "code": "overloaded", "message": "queue full"}
    assert error_event("overloaded", "queue full") == expected
    ev = parse_event(_bytes(error_event("not_found", "model: 'x'")))
    assert ev == ErrorEvent("not_found", "model: 'x'")
    exc = ev.to_exception()
    assert isinstance(exc, NotFound) and exc.code == "not_found" and exc.message == "model: 'x'"
    with pytest.raises(ProtocolError, match="finish_reason"):
        done_event("finished", 1, 1)
    with pytest.raises(ProtocolError, match="code"):
        error_event("oops", "x")


@pytest.mark.parametrize("fields,match", [
    ({"seq": "1"}, "'event' is missing"),
    ({"event": "weird"}, "token, done or error"),
    ({"event": "token", "seq": "x", "ids": "1"}, "not an integer"),
    ({"event": "token", "seq": "0", "ids": "1,a"}, "comma-separated"),
    ({"event": "done", "finish_reason": "eos", "prompt_tokens": "1"}, "completion_tokens"),
    ({b"event": b"\xff"}, "UTF-8"),
])
def test_parse_event_rejects_malformed(fields, match):
    with pytest.raises(ProtocolError, match=match):
        parse_event(fields)


def test_error_classes_carry_codes():
    cases = {"invalid_request": InvalidRequest, "overloaded": Overloaded, "not_found": NotFound,
             "internal": InternalError}
    for code, cls in cases.items():
        e = request_error(code, "msg")
        assert type(e) is cls and isinstance(e, RequestError) and e.code == code and e.message == "msg"
    odd = request_error("teapot", "x")
    assert type(odd) is RequestError and odd.code == "teapot"


def test_request_fields_serialize_and_omit_none():
    f = request_fields("hi", request_id="abc", max_new_tokens=5, temperature=0.0, top_p=0.5, stop=["a", "b"])
    assert f == {"prompt": "hi", "id": "abc", "max_new_tokens": "5", "temperature": "0.0", "top_p": "0.5",
                 "stop": '["a", "b"]'}
    m = request_fields(messages=[{"role": "user", "content": "é"}], stop="x", ignore_eos=True)
    assert m == {"messages": '[{"role": "user", "content": "é"}]', "stop": "x", "ignore_eos": "1"}


def test_cancel_codec():
    assert cancel_fields("abc") == {"id": "abc"}
    assert parse_cancel({b"id": b"abc"}) == "abc"
    with pytest.raises(ProtocolError):
        parse_cancel({b"x": b"1"})


def test_registry_records_round_trip():
    w = WorkerRecord(pipeline="p0", stage=1, tp_rank=2, host="h", device="cuda:3", memory=80 * 2**30, pid=42,
                     version="0.1.0", model="tiny", extra={"rank": "5"})
    f = w.to_fields()
    assert f["stage"] == "1" and f["rank"] == "5" and all(isinstance(v, str) for v in f.values())
    back = WorkerRecord.from_fields(_bytes(f))
    assert back == w and back.extra == {"rank": "5"}
    with pytest.raises(ProtocolError, match="stage"):
        WorkerRecord.from_fields({"pipeline": "p0", "stage": "x", "tp_rank": "0"})
    p = PipelineRecord("ready", "hetero-config 2 1", "10.0.0.1:29500")
    assert PipelineRecord.from_fields(_bytes(p.to_fields())) == p
