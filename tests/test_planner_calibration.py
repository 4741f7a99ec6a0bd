"""Calibration files (hexgen/planner/calibration.py), the cost model using them, and `bin/hexgen profile`."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from hexgen.config import PRESETS
from hexgen.errors import ConfigError
from hexgen.planner.calibration import (Calibration, Point, ProfileConfig, calibration_from_dict,
                                        calibration_to_dict, load_calibration, save_calibration)
from hexgen.planner.costmodel import CostModel, layer_shape
from hexgen.planner.devices import DEVICE_SPECS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = PRESETS["tiny"]
SHAPE = layer_shape(TINY)


def make_cal(points=None, device="A6000") -> Calibration:
    pts = points or [
        Point(1, 1, 100, 1e-4), Point(1, 16, 1600, 4e-4),  # decode, 100 positions a sequence
        Point(1, 1, 1000, 2e-4), Point(1, 16, 16000, 1.6e-3),  # decode, 1000 positions a sequence
        Point(1, 128, 128, 1e-3), Point(1, 512, 512, 4e-3),  # prefill
        Point(2, 1, 100, 6e-5),
    ]
    return Calibration(device, dict(SHAPE), tuple(pts), "bfloat16", {"reps": 3})


def test_round_trip(tmp_path):
    cal = make_cal()
    path = str(tmp_path / "cal.json")
    save_calibration(cal, path)
    back = load_calibration(path)
    assert back == cal
    assert back.meta == {"reps": 3}
    assert calibration_from_dict(json.loads(json.dumps(calibration_to_dict(cal)))) == cal
    assert hash(back) == hash(cal)


def test_exact_points_and_log_log_interpolation():
    cal = make_cal()
    assert cal.layer_time(1, 1, 100) == 1e-4
    assert cal.layer_time(1, 128, 128) == 1e-3
    # prefill 256 tokens: halfway in log(tokens) between 128 and 512 -> geometric mean of the times
    assert cal.layer_time(1, 256, 256) == pytest.approx(math.sqrt(1e-3 * 4e-3))
    # decode 4 sequences of 100: halfway in log tokens between 1 and 16
    assert cal.layer_time(1, 4, 400) == pytest.approx(math.sqrt(1e-4 * 4e-4))


def test_decode_is_affine_in_context():
    cal = make_cal()
    # batch 1: 1e-4 s at 100 positions, 2e-4 s at 1000 -> 550 positions: 1.5e-4; 1900: 3e-4 (extrapolated)
    assert cal.layer_time(1, 1, 550) == pytest.approx(1.5e-4)
    assert cal.layer_time(1, 1, 1900) == pytest.approx(3e-4)
    # below the smallest context the slope still holds but never under the smaller measurement
    assert cal.layer_time(1, 1, 2) == pytest.approx(1e-4)


def test_out_of_range_other_tp_other_device_is_none():
    cal = make_cal()
    assert cal.layer_time(1, 64, 6400) is None  # more decode tokens than measured
    assert cal.layer_time(1, 1024, 1024) is None  # longer prefill than measured
    assert cal.layer_time(4, 1, 100) is None  # TP not measured
    assert cal.layer_time(1, 1, 100, device="H100") is None
    assert cal.layer_time(1, 1, 100, device="rtx a6000") is None
    assert cal.layer_time(1, 1, 100, device="a6000") == 1e-4


def test_single_decode_family_only_near_its_context():
    cal = make_cal([Point(1, 1, 100, 1e-4), Point(1, 8, 800, 2e-4)])
    assert cal.layer_time(1, 2, 200) == pytest.approx(1e-4 * 2 ** (1 / 3))
    assert cal.layer_time(1, 2, 300) is not None
    assert cal.layer_time(1, 2, 2000) is None


def test_cost_model_uses_calibration_in_range_and_falls_back():
    cal = make_cal()
    a6000, h100 = DEVICE_SPECS["A6000"], DEVICE_SPECS["H100"]
    plain = CostModel(TINY)
    cost = CostModel(TINY, calibration=cal)
    assert cost.layer_time(a6000, 1, 1, 100) == 1e-4
    assert cost.layer_time(a6000, 1, 256, 256) == pytest.approx(math.sqrt(1e-3 * 4e-3))
    # outside the measured range, another device, another TP: the datasheet estimate
    assert cost.layer_time(a6000, 1, 2048, 2048) == plain.layer_time(a6000, 1, 2048, 2048)
    assert cost.layer_time(h100, 1, 1, 100) == plain.layer_time(h100, 1, 1, 100)
    assert cost.layer_time(a6000, 4, 1, 100) == plain.layer_time(a6000, 4, 1, 100)
    # stage_time adds the all-reduce on top of the measured (collective-free) TP 2 time
    from hexgen.planner.cluster import Link
    link = Link(25e9, 10e-6)
    st = cost.stage_time(a6000, 2, 3, link, 1, 100, False, False)
    assert st == pytest.approx(3 * (6e-5 + 2 * cost.allreduce_time(link, 2, 1)))


def test_cost_model_takes_one_calibration_per_device_type():
    """A mixed cluster: each device type's calibration covers its own points; a device none measured falls
    back to the datasheet estimate; a custom device name (a cluster file's [devices.NAME]) matches too."""
    a6000, h100 = DEVICE_SPECS["A6000"], DEVICE_SPECS["H100"]
    custom = dataclasses.replace(a6000, name="A6000-40SM")
    plain = CostModel(TINY)
    cost = CostModel(TINY, calibration=(make_cal(device="A6000"),
                                        make_cal([Point(1, 1, 100, 7e-4), Point(1, 16, 1600, 9e-4)],
                                                 device="A6000-40SM")))
    assert cost.layer_time(a6000, 1, 1, 100) == 1e-4
    assert cost.layer_time(custom, 1, 1, 100) == 7e-4
    assert cost.layer_time(h100, 1, 1, 100) == plain.layer_time(h100, 1, 1, 100)
    with pytest.raises(ConfigError, match="calibration"):
        CostModel(TINY, calibration=(make_cal(), "not a calibration"))


def test_cost_model_rejects_another_shape():
    cal = make_cal()
    with pytest.raises(ConfigError, match="calibration model"):
        CostModel(PRESETS["llama-2-7b"], calibration=cal)


@pytest.mark.parametrize("mutate,key", [
    (lambda d: d.update(extra=1), "calibration.extra"),
    (lambda d: d.pop("device"), "calibration.device"),
    (lambda d: d.update(format=9), "calibration.format"),
    (lambda d: d["points"].append({"tp": 1, "tokens": 1}), "calibration.points[7]"),
    (lambda d: d["points"][0].update(seconds=-1.0), "seconds"),
    (lambda d: d["points"][0].update(context=0), "context"),
    (lambda d: d["model"].pop("kv_heads"), "model.kv_heads"),
])
def test_malformed_files_name_the_key(mutate, key):
    d = calibration_to_dict(make_cal())
    mutate(d)
    with pytest.raises(ConfigError) as e:
        calibration_from_dict(d)
    assert key in str(e.value)


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_calibration(str(tmp_path / "none.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_calibration(str(bad))


def test_profile_config_validation():
    with pytest.raises(ConfigError, match="batches"):
        ProfileConfig(batches=(0,))
    with pytest.raises(ConfigError, match="contexts"):
        ProfileConfig(contexts=(1,))
    with pytest.raises(ConfigError, match="reps"):
        ProfileConfig(reps=0)
    with pytest.raises(ConfigError, match="graphs"):
        ProfileConfig(graphs="yes")


def test_profile_cli_on_cpu_writes_a_calibration_that_loads(tmp_path):
    out = tmp_path / "tiny-cpu.json"
    cmd = [sys.executable, os.path.join(ROOT, "bin", "hexgen"), "profile", "--preset", "tiny", "--device", "cpu",
           "--dtype", "fp32", "--tp-degrees", "1", "2", "--batch", "1", "4", "--context", "8", "32",
           "--prefill", "8", "32", "--warmup", "1", "--reps", "3", "--threads", "1", "--quiet", "--out", str(out)]
    env = dict(os.environ, HEXGEN_NO_VENV="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    cal = load_calibration(str(out))
    assert cal.device == "CPU" and cal.dtype == "float32"
    assert cal.model == SHAPE
    # 2 TP degrees x (2 batches x 2 contexts + 2 prefills)
    assert len(cal.points) == 12
    assert {(p.tokens, p.context) for p in cal.points} == {(1, 8), (1, 32), (4, 32), (4, 128), (8, 8), (32, 32)}
    cost = CostModel(TINY, dtype_bytes=4, calibration=cal)
    cpu = DEVICE_SPECS["CPU"]
    for p in cal.points:
        assert cost.layer_time(cpu, p.tp, p.tokens, p.context) == pytest.approx(p.seconds)
    assert cost.layer_time(cpu, 1, 16, 16) is not None


def test_profile_cli_errors():
    cmd = [sys.executable, os.path.join(ROOT, "bin", "hexgen"), "profile", "--preset", "tiny", "--device", "cpu",
           "--tp-degrees", "3", "--batch", "1", "--prefill", "8", "--reps", "1", "--threads", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, HEXGEN_NO_VENV="1"),
                       cwd=ROOT)
    assert r.returncode == 2
    assert "tp-degrees: 3" in r.stderr


def test_profile_cli_records_a_custom_device_name(tmp_path):
    """A device the cluster file defines itself (e.g. an emulated, cut-down GPU) keeps its given name."""
    out = tmp_path / "custom.json"
    cmd = [sys.executable, os.path.join(ROOT, "bin", "hexgen"), "profile", "--preset", "tiny", "--device", "cpu",
           "--device-name", "My-Box", "--batch", "1", "--context", "8", "--prefill", "8", "--warmup", "0",
           "--reps", "1", "--threads", "1", "--quiet", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=dict(os.environ, HEXGEN_NO_VENV="1"),
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert load_calibration(str(out)).device == "My-Box"
