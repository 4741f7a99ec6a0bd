"""Device emulation settings (the CUDA part runs only on the GPU machine)."""
import pytest
import torch

from hexgen.engine.emulation import DeviceLimit, limited_device, memory_cap, parse_limits
from hexgen.errors import ConfigError


def test_parse_limits():
    assert parse_limits("2=40:24, 3=16:16") == {2: DeviceLimit(40, 24.0), 3: DeviceLimit(16, 16.0)}
    assert parse_limits("") == {}
    assert parse_limits("0=0:12.5") == {0: DeviceLimit(0, 12.5)}


@pytest.mark.parametrize("text", ["2=40", "x=1:2", "2=-8:1", "1=8:-3", "3:16:16"])
def test_parse_limits_rejects(text):
    with pytest.raises(ConfigError, match="emulate_devices"):
        parse_limits(text)


def test_engine_config_keeps_limits_per_rank():
    from hexgen.config import EngineConfig

    engine = EngineConfig(emulate_devices="3=16:16, 2=40:24")
    assert engine.emulate_devices == ((2, DeviceLimit(40, 24.0)), (3, DeviceLimit(16, 16.0)))
    assert engine.device_limit(2) == DeviceLimit(40, 24.0) and engine.device_limit(0) is None
    assert EngineConfig(emulate_devices={1: DeviceLimit(8, 0.0)}).device_limit(1) == DeviceLimit(8, 0.0)
    with pytest.raises(ConfigError, match="emulate_devices"):
        EngineConfig(emulate_devices="1=8")
    with pytest.raises(ConfigError, match="emulate_devices: -1"):
        EngineConfig(emulate_devices={-1: DeviceLimit(8, 0.0)})


def test_cpu_rank_is_never_limited():
    with limited_device(DeviceLimit(8, 1.0), torch.device("cpu")) as limit:
        assert limit is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_green_context_and_memory_cap():
    dev = torch.device("cuda", 0)
    with limited_device(DeviceLimit(16, 8.0), dev) as limit:
        assert limit == DeviceLimit(16, 8.0)
        assert memory_cap(dev) == 8 << 30
        x = torch.randn(256, 256, device=dev)
        y = (x @ x).sum().item()  # runs on the green context's stream
        assert y == pytest.approx((x @ x).sum().item(), rel=1e-4)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(9 << 30, dtype=torch.uint8, device=dev)
    assert memory_cap(dev) is None  # the cap ends with the block
