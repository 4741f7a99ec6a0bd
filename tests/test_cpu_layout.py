"""CPU linear layouts (hexgen/kernels/cpu_layout.py): the choice per shape, and that a re-laid layer computes the
same thing. A whole re-laid stage against Hugging Face: tests/test_loader.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hexgen.kernels import cpu_layout
from hexgen.parallel.layers import ReplicatedLinear


def _linear(n: int, k: int, seed: int = 0) -> ReplicatedLinear:
    layer = ReplicatedLinear(k, n)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(n, k, generator=torch.Generator().manual_seed(seed)))
    return layer


def test_column_major_keeps_shape_and_values_and_linear_agrees():
    w = torch.randn(48, 32)
    c = cpu_layout.column_major(w)
    assert c.shape == w.shape and c.stride() == (1, 48) and cpu_layout.is_column_major(c)
    assert not cpu_layout.is_column_major(w) and torch.equal(c, w)
    for rows in (1, 2, 7):
        x = torch.randn(rows, 32)
        torch.testing.assert_close(F.linear(x, c), F.linear(x, w), rtol=1e-5, atol=1e-5)


def _timer_favouring(column_speedup: float):
    """A timer whose column-major weights run ``column_speedup`` times faster than row-major ones."""
    def timer(weights, x):
        return 1.0 / column_speedup if cpu_layout.is_column_major(weights[0]) else 1.0
    return timer


def test_tune_lays_column_major_only_where_it_is_faster_by_the_margin():
    fast = [_linear(64, 32, s) for s in range(3)]
    before = [m.weight.detach().clone() for m in fast]
    got = cpu_layout.tune(fast, timer=_timer_favouring(1.5), min_bytes=0)
    assert got == {(64, 32): "column"}
    for m, w in zip(fast, before):
        assert cpu_layout.is_column_major(m.weight) and torch.equal(m.weight, w)
        assert isinstance(m.weight, torch.nn.Parameter) and not m.weight.requires_grad

    near = [_linear(64, 32)]  # 5% faster: inside the margin, left row-major
    assert cpu_layout.tune(near, timer=_timer_favouring(1.05), min_bytes=0) == {(64, 32): "row"}
    assert near[0].weight.is_contiguous()


def test_tune_groups_by_shape_and_skips_small_weights_and_the_switch(monkeypatch):
    a, b = _linear(64, 32), _linear(32, 64)
    speedups = {(64, 32): 2.0, (32, 64): 0.5}

    def timer(weights, x):
        col = cpu_layout.is_column_major(weights[0])
        return 1.0 / speedups[tuple(weights[0].shape)] if col else 1.0

    assert cpu_layout.tune([a, b], timer=timer, min_bytes=0) == {(64, 32): "column", (32, 64): "row"}
    assert cpu_layout.is_column_major(a.weight) and b.weight.is_contiguous()

    small = _linear(64, 32)  # 8 KiB: under the default floor, never timed
    assert cpu_layout.tune([small], timer=_timer_favouring(3.0)) == {}
    assert small.weight.is_contiguous()



def test_tune_with_the_real_timer_picks_a_layout_and_keeps_outputs():
    """The default timer on a weight above the floor: whichever layout wins, the layer computes the same."""
    layer = _linear(1024, 512)  # 2 MiB fp32
    x = torch.randn(3, 512)
    want = layer(x)
    got = cpu_layout.tune([layer])
    assert set(got.values()) <= {"row", "column"} and list(got) == [(1024, 512)]
    assert cpu_layout.is_column_major(layer.weight) == (got[(1024, 512)] == "column")
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 8])
def test_column_major_linear_matches_for_decode_sized_inputs(rows):
    layer = _linear(256, 128)
    x = torch.randn(rows, 128)
    want = layer(x)
    cpu_layout.tune([layer], timer=_timer_favouring(2.0), min_bytes=0)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_weights_off_the_cpu_are_left_alone():
    """Only CPU weights are timed and re-laid (CUDA ones are read row-major by the Triton GEMV and cuBLAS);
    a meta-device layer stands in for a device one here."""
    with torch.device("meta"):
        layer = ReplicatedLinear(1024, 1024)
    assert cpu_layout.tune([layer], timer=_timer_favouring(3.0), min_bytes=0) == {}
    assert layer.weight.device.type == "meta" and layer.weight.is_contiguous()
