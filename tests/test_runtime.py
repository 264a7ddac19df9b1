"""vitscope.runtime.keep_freed_memory: applied on glibc, skipped when the user opts out or set the
allocator themselves; called by the CLI and by probe on a CPU."""
from __future__ import annotations

import ctypes.util
import sys

import pytest
import torch

import vitscope
import vitscope.probing
import vitscope.runtime
from vitscope.cli import main


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="glibc only")
def test_applied_on_glibc_and_idempotent(monkeypatch):
    for key in ("VITSCOPE_KEEP_FREED_MEMORY", *vitscope.runtime._ENV_KEYS):
        monkeypatch.delenv(key, raising=False)
    assert vitscope.keep_freed_memory() is True
    assert vitscope.keep_freed_memory() is True


@pytest.mark.parametrize("key,value", [("VITSCOPE_KEEP_FREED_MEMORY", "0"), ("MALLOC_TRIM_THRESHOLD_", "1000")])
def test_opt_out_and_user_settings_win(monkeypatch, key, value):
    monkeypatch.setenv(key, value)
    assert vitscope.keep_freed_memory() is False


def test_cli_and_cpu_probe_call_it(monkeypatch):
    calls = []
    monkeypatch.setattr(vitscope.runtime, "keep_freed_memory", lambda: calls.append("cli") or True)
    monkeypatch.setattr(vitscope.probing.probe_pass, "keep_freed_memory", lambda: calls.append("probe") or True)
    assert main(["models", "test_vit_cifar"]) == 0
    model = vitscope.create_model("test_vit_cifar")
    vitscope.probe(model, [torch.randn(2, 3, 32, 32)], ["feature_variance"], progress=False)
    assert calls == ["cli", "probe"]


def test_device_and_autocast_resolvers(monkeypatch):
    """The one device resolver: auto follows CUDA's availability, bad names and absent CUDA devices are one-line
    errors naming the option; model_device reads (or moves to) a device; autocast is a no-op without a dtype."""
    from vitscope.runtime import autocast, model_device, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device 'gpu' is not a device"):
        resolve_device("gpu", "--device")
    with pytest.raises(ValueError, match="device cuda:0: torch sees no CUDA device"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"only 1 CUDA device\(s\)"):
        resolve_device("cuda:3")
    net = torch.nn.Linear(2, 2).double()
    assert model_device(net) == torch.device("cpu") and model_device(torch.nn.ReLU()) == torch.device("cpu")
    assert model_device(net, "meta") == torch.device("meta") and net.weight.device.type == "cpu"  # not moved
    model_device(net, "meta", move=True)
    assert net.weight.device.type == "meta"
    x = torch.ones(2, 2)
    with autocast("cpu", None):
        assert (x @ x).dtype == torch.float32
    with autocast(torch.device("cpu"), torch.bfloat16):
        assert (x @ x).dtype == torch.bfloat16
