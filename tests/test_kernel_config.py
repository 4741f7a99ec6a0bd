"""KernelConfig (hexgen/config/engine.py): validation, the ``--kernel`` flags, resolution for a device
(hexgen/kernels/choice.py), and that each choice reaches the code it switches."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist

from hexgen.cli.flags import add_engine_flags, engine_fields
from hexgen.config import EngineConfig, KernelConfig, Layout, preset
from hexgen.errors import ConfigError
from hexgen.kernels import fused
from hexgen.kernels.choice import REFERENCE, resolve
from hexgen.model import attention
from hexgen.model.loader import build_stage, init_random
from hexgen.parallel.groups import TPContext

CPU = torch.device("cpu")


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"gemv": "torch"}, r"kernels.gemv: 'torch' is not allowed; choose one of triton, auto, cublas"),
    ({"all_reduce": "ring"}, r"kernels.all_reduce: 'ring' is not allowed; choose one of symm, nccl"),
    ({"fused": "yes"}, r"kernels.fused: 'yes' must be on or off"),
    ({"decode_groups": 1}, r"kernels.decode_groups: 1 must be on or off"),
])
def test_bad_values_name_the_field_and_the_allowed_ones(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        KernelConfig(**kwargs)


def test_flags_parse_names_and_on_off_values():
    k = KernelConfig.from_flags(["gemv=cublas", "fused=off", "pdl=0", "decode-kernel=false", "gemv=auto"])
    assert (k.gemv, k.fused, k.pdl, k.decode_kernel, k.prefill_kernel) == ("auto", False, False, False, True)
    assert KernelConfig.from_flags([]) == KernelConfig()
    assert KernelConfig.from_dict({"cpu_layout": False, "all_reduce": "nccl"}) == \
        KernelConfig(cpu_layout=False, all_reduce="nccl")
    assert KernelConfig(gemv="cublas", fused=False).describe().startswith("gemv=cublas fused=off pdl=on")


@pytest.mark.parametrize(("items", "match"), [
    (["gemv"], r"--kernel: 'gemv' must look like NAME=VALUE"),
    (["flash=on"], r"--kernel: 'flash' is not a kernel setting; choose one of gemv, fused, pdl"),
    (["fused=maybe"], r"--kernel.fused: 'maybe' must be on or off"),
    (["gemv=torch"], r"kernels.gemv: 'torch' is not allowed; choose one of triton, auto, cublas"),
])
def test_bad_flags_name_the_setting(items, match):
    with pytest.raises(ConfigError, match=match):
        KernelConfig.from_flags(items)


def test_cli_flags_become_engine_fields():
    import argparse

    p = argparse.ArgumentParser()
    add_engine_flags(p)
    fields = engine_fields(p.parse_args(["--kernel", "gemv=cublas", "--kernel", "fused=off",
                                         "--emulate-devices", "1=40:24"]))
    engine = EngineConfig(**fields)
    assert engine.kernels == KernelConfig(gemv="cublas", fused=False)
    assert engine.device_limit(1).sms == 40
    assert engine_fields(p.parse_args([])) == {}
    assert EngineConfig().kernels == KernelConfig()


def test_resolve_turns_off_what_cannot_run_on_cpu():
    got = resolve(KernelConfig(), CPU)
    assert got == KernelConfig(gemv="cublas", fused=False, pdl=False, decode_kernel=False, prefill_kernel=False,
                               all_reduce="nccl", cpu_layout=True, decode_groups=True)
    assert resolve(got, CPU) == got  # resolving twice changes nothing
    assert not resolve(KernelConfig(cpu_layout=False, decode_groups=False), CPU).decode_groups
    assert resolve(KernelConfig(), CPU) != REFERENCE  # the CPU layout and grouping stay on by default
    assert not resolve(KernelConfig(overlap=True), CPU).overlap  # two CUDA streams: nothing to overlap on a CPU
    assert KernelConfig.from_flags(["overlap=on"]).overlap


def _stage(kernels: KernelConfig):
    cfg = preset("tiny")
    stage = Layout.build(cfg, [1], None).stage_of_rank(0)
    model = build_stage(cfg, stage, TPContext(0, 1, None), torch.float32, CPU)
    init_random(model, 0, 0)
    model.set_kernels(kernels)
    return cfg, model


def test_fused_choice_reaches_every_norm_and_the_mlp(monkeypatch):
    """The stage hands its (resolved) choice to the layers: with ``fused`` on, every norm goes through
    ``fused.add_rms_norm`` (replaced here by a counting reference, so no Triton runs) and off, none does."""
    calls = []

    def counting(x, res, weight, eps):
        calls.append(x.shape)
        return fused.add_rms_norm_ref(x, res, weight, eps)

    monkeypatch.setattr(fused, "add_rms_norm", counting)
    monkeypatch.setattr(fused, "silu_mul", fused.silu_mul_ref)
    for on in (False, True):
        calls.clear()
        cfg, model = _stage(KernelConfig(fused=on, prefill_kernel=False))
        assert all(layer.fast == on and layer.mlp.fast == on for layer in model.layers)
        assert not any(layer.attn.through_cache for layer in model.layers)  # needs the prefill kernel too
        meta = attention.build_meta([0, 1, 2], [3], [3], [[0]], 16, CPU, kernel=False, prefill_kernel=False)
        cos, sin = model_rotary(cfg, meta)
        with torch.no_grad():
            kv = torch.zeros(cfg.num_layers, 2, 16, cfg.num_kv_heads, cfg.head_dim)
            model.logits(model(torch.tensor([5, 6, 7]), cos, sin, kv, meta))
        assert len(calls) == (2 * cfg.num_layers + 1 if on else 0)


def model_rotary(cfg, meta):
    from hexgen.model.rope import RotaryCache

    return RotaryCache(cfg, 64, CPU).lookup(meta.positions, torch.float32)


def test_decode_groups_choice_reaches_build_meta():
    ctx = list(range(20, 52))  # 32 decode rows: enough for groups
    tables = [[i] * (-(-c // 16)) for i, c in enumerate(ctx)]
    args = ([c - 1 for c in ctx], [1] * len(ctx), ctx, tables, 16, CPU)
    assert attention.build_meta(*args, kernel=False).decode_groups
    assert attention.build_meta(*args, kernel=False, group_rows=False).decode_groups is None
    assert attention.decode_groups(np.asarray(ctx)) is not None


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_runner_resolves_once_and_hands_the_choice_down(monkeypatch):
    """A CPU stage's runner: ``cpu_layout`` off skips the layout tuner, ``decode_groups`` off reaches each
    step's build_meta, and the layers hold the resolved choice."""
    from hexgen.engine import runner as runner_mod
    from hexgen.engine.plan import StepPlan
    from hexgen.engine.runner import ModelSpec, StageRunner
    from hexgen.parallel.groups import PipelineGroups

    tuned, metas = [], []
    monkeypatch.setattr(runner_mod.cpu_layout, "tune", lambda layers: tuned.append(len(layers)) or {})
    real = runner_mod.build_meta
    monkeypatch.setattr(runner_mod, "build_meta", lambda *a, **k: metas.append(k) or real(*a, **k))
    layout = Layout.build(preset("tiny"), [1], None)
    engine = EngineConfig(cpu_kv_tokens=1024, kernels=KernelConfig(cpu_layout=False, decode_groups=False,
                                                                   gemv="auto"))
    groups = PipelineGroups(layout, 0, f"tcp://127.0.0.1:{_port()}", CPU)
    try:
        r = StageRunner(ModelSpec(preset="tiny", random_weights=True), engine, groups)
        assert r.kernels == resolve(engine.kernels, CPU) and r.model.kernels == r.kernels
        assert not tuned and r.kernels.gemv == "cublas"
        plan = StepPlan(0, seq_ids=[0], input_ids=[5, 6], positions=[0, 1], q_lens=[2], ctx_lens=[2],
                        block_tables=[[0]], sample=[True], out_lens=[0])
        r.forward(plan, torch.tensor([5, 6]))
        assert metas[-1] == {"kernel": False, "prefill_kernel": False, "group_rows": False}
    finally:
        groups.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def test_no_environment_switches_below_the_cli_and_settings():
    """``os.environ`` is read only by the CLIs, settings loading (the model cache's folder among them), the demo
    (the environment of its children) and, for gloo's own ``GLOO_SOCKET_IFNAME``, where the groups are made.
    Triton's interpreter switch is read through Triton's knobs (``hexgen.kernels.support``)."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    allowed = {"hexgen/wire/settings.py", "hexgen/wire/model_cache.py", "hexgen/demo.py"}
    found = []
    for path in [*root.glob("hexgen/**/*.py"), *root.glob("workers/**/*.py")]:
        rel = str(path.relative_to(root))
        if rel.startswith("hexgen/cli/") or rel in allowed:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if ("os.environ" in line or "getenv" in line) and "GLOO_IFNAME_ENV" not in line:
                found.append(f"{rel}:{n}: {line.strip()}")
    assert found == []
    assert "os.environ" in (root / "hexgen/wire/settings.py").read_text(encoding="utf-8")  # the scan sees reads


def test_gemv_tuning_groups_the_silu_fed_down_projection_apart():
    """With fused kernels the MLP's down projection runs gemv_silu on gate | up, so the GEMV tuners
    (hexgen.kernels.gemv.groups) time it that way, apart from the plain layers; with them off it is plain."""
    from hexgen.kernels import gemv

    for fused_on in (True, False):
        cfg, model = _stage(KernelConfig(fused=fused_on))
        linears = [m for m in model.modules() if hasattr(m, "gemv")]
        downs = [layer.mlp.down for layer in model.layers]
        h, inter = cfg.hidden_size, cfg.intermediate_size
        keys = gemv.groups(linears)
        assert keys[(h, inter, fused_on)] == downs
        assert all(group == downs for (_, _, silu), group in keys.items() if silu)
        assert sum(len(g) for g in keys.values()) == len(linears)
    assert gemv.probe(downs[0].weight, True, torch.float32).shape == (1, 2 * inter)
    assert gemv.probe(downs[0].weight, False, torch.float32).shape == (1, inter)
    assert gemv.describe((h, inter, True)) == f"[{h}, {inter}] (SiLU input)"
