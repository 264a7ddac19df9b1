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
    monkeypatch.setattr(vitscope.probing, "keep_freed_memory", lambda: calls.append("probe") or True)
    assert main(["models", "test_vit_cifar"]) == 0
    model = vitscope.create_model("test_vit_cifar")
    vitscope.probe(model, [torch.randn(2, 3, 32, 32)], ["feature_variance"], progress=False)
    assert calls == ["cli", "probe"]
