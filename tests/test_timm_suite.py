"""timm's own model tests (``tests/test_models.py`` of the installed timm), run on vitscope's registry.

The bodies below restate timm's checks (forward + grad checkpointing, backward, default cfgs,
features_only / forward_intermediates, FX forward/backward/TorchScript, TorchScript, device/dtype at
creation) so that CI runs them offline: full-depth models on the meta device where only shapes,
devices and dtypes are checked, numerics on the tiny ``test_*`` variants and on the full-depth models
that are cheap at 32 px. ``test_timm_test_file_unchanged`` runs timm's file itself when its source
distribution is present locally (``VITSCOPE_TIMM_SDIST``), through ``tests/timm_suite_plugin.py``.
"""
from __future__ import annotations

import fnmatch
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import get_channel_dim, get_spatial_dim
from timm.models import get_notrace_functions, get_notrace_modules

import vitscope

ALL = vitscope.list_models()
TINY = vitscope.list_models("test_*")
# token-output models (no spatial pool_size), timm's NON_STD_FILTERS. timm's file matches names only and
# misses test_convit_32 (its filters list test_vit* but no test_convit*): there it gets the NCHW checks.
NON_STD = [n for n in ALL if any(fnmatch.fnmatch(n, f) for f in ("vit_*", "convit_*", "test_vit*", "test_convit*"))]
STD = [n for n in ALL if n not in NON_STD]
# full-depth CNNs whose forward at their 32-px config costs well under a second
# full-depth models whose forward at their 32-px config is cheap (64-token ViTs)
CHEAP_FULL = ["resnet18_cifar", "resnet18_smooth_cifar", "resnet50_cifar", "alternet50_cifar",
              "vit_tiny_cbs_patch4_32", "convit_tiny_32"]


def _input_size(model: torch.nn.Module, target: int | None = None) -> tuple[int, ...]:
    """timm's ``_get_input_size``: the cfg size, capped at ``target`` unless ``fixed_input_size``."""
    cfg = model.pretrained_cfg
    size = cfg["input_size"]
    if cfg.get("fixed_input_size") or not target or max(size) <= target:
        return size
    return tuple(min(s, target) for s in size)


def _grad_checkpointing(model: torch.nn.Module) -> bool:
    """Switch gradient checkpointing on where the model supports it (timm's ConViT raises)."""
    try:
        model.set_grad_checkpointing()
    except Exception:  # timm's tests accept models without it the same way
        return False
    return True


def _fx_model(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's ``_create_fx_model``: a torchvision feature extractor of the last node, timm's leaf modules."""
    from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

    kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                  param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=kwargs)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        out_names = [n.name for n in nodes[0]._input_nodes]
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n)] for n in out_names]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=kwargs)


# ---------------------------------------------------------------- config, head and device contract (meta)

@pytest.mark.parametrize("name", ALL)
def test_default_cfgs_and_device_dtype_on_meta(name):
    """timm's test_model_default_cfgs(_non_std): cfg vs shapes, head resets, factory device/dtype."""
    model = timm.create_model(name, device="meta", dtype=torch.float32).eval()
    cfg = model.pretrained_cfg
    assert model.in_chans == cfg["input_size"][0]
    assert model.num_features > 0 and model.head_hidden_size > 0
    with pytest.raises(TypeError):  # unknown constructor args raise
        timm.create_model(name, device="meta", not_a_model_arg=1)
    state = model.state_dict()
    for key in (cfg["first_conv"], cfg["classifier"]):
        assert key + ".weight" in state, f"cfg names {key!r}, not a parameter"

    x = torch.randn(1, *cfg["input_size"], device="meta")
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape[1] == model.head_hidden_size
    if name in STD:
        spatial, chans = get_spatial_dim("NCHW"), get_channel_dim("NCHW")
        assert tuple(feats.shape[i] for i in spatial) == tuple(cfg["pool_size"]), "pool_size != final map"
        assert feats.shape[chans] == model.num_features
    else:
        assert feats.shape[-1] == model.num_features
    model.to(torch.bfloat16)  # timm's _assert_dtype_change_after_forward
    assert model(x.to(torch.bfloat16)).dtype == torch.bfloat16
    model.to(torch.float32)

    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre.shape
    if name in STD:
        model.reset_classifier(0, "")
        out = model(x)
        assert out.ndim == 4 and tuple(out.shape[-2:]) == tuple(cfg["pool_size"])
        no_pool = timm.create_model(name, num_classes=0, global_pool="", device="meta", dtype=torch.float32)
        assert tuple(no_pool(x).shape[-2:]) == tuple(cfg["pool_size"])
    headless = timm.create_model(name, num_classes=0, device="meta", dtype=torch.float32).eval()
    assert headless(x).shape == pre.shape

    # timm's _assert_reset_classifier_preserves_parent_device_dtype
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    head = list(model.get_classifier().parameters())
    assert head and all(p.device.type == "meta" and p.dtype == torch.float64 for p in head)

    # timm's _assert_factory_device and _assert_frozen_survives_reset_and_resize
    fresh = timm.create_model(name, device="meta", dtype=torch.float64)
    wrong = [n for n, t in [*fresh.named_parameters(), *fresh.named_buffers()]
             if t.device.type != "meta" or (t.is_floating_point() and t.dtype != torch.float64)]
    assert not wrong, f"tensors not created on meta/float64: {wrong[:5]}"
    fresh.requires_grad_(False)
    fresh.reset_classifier(0)
    if name in STD:
        fresh.reset_classifier(0, "")
    if hasattr(fresh, "set_input_size"):
        fresh.set_input_size(img_size=tuple(2 * s for s in cfg["input_size"][-2:]))
    assert not [n for n, p in fresh.named_parameters() if p.requires_grad], "frozen parameters became trainable"


def test_cb_scale_follows_create_model_device_and_dtype():
    model = timm.create_model("test_vit_cbs", dtype=torch.float64)
    scales = [m.scale for m in model.modules() if isinstance(m, vitscope.layers.ContextBroadcast)]
    assert len(scales) == len(model.blocks) and all(s.dtype == torch.float64 for s in scales)
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_fixed_input_sizes_are_stated_and_checked():
    for name in ALL:  # learned position embeddings (ViT, ConViT) or attention windows (AlterNet)
        fixed = not fnmatch.fnmatch(name, "*resnet*")
        assert bool(timm.get_pretrained_cfg_value(name, "fixed_input_size")) is fixed, name
    with torch.device("meta"):
        timm.create_model("alternet50", img_size=448)  # multiples of 224 fit the 7x7 windows
        with pytest.raises(ValueError, match="not a whole number of 7x7 attention windows"):
            timm.create_model("alternet50", img_size=256)


# ---------------------------------------------------------------- numerics on tiny and cheap models

@pytest.mark.parametrize("name", TINY)
def test_forward_grad_checkpointing_backward(name):
    """timm's test_model_forward (grad checkpointing keeps outputs) and test_model_backward."""
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(model, 384))
    out = model(x)
    assert out.shape[0] == 1 and not out.isnan().any()
    if _grad_checkpointing(model):
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)  # checkpointing recomputes, the same ops

    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, *_input_size(model, 128)))
    out.mean().backward()
    assert out.shape[-1] == 42
    assert not [n for n, p in model.named_parameters() if p.grad is None], "parameters without gradient"


@pytest.mark.parametrize("name", TINY + CHEAP_FULL)
def test_forward_intermediates_and_features_only(name):
    """timm's test_model_forward_intermediates(_features): timm selects it by module, so never for vitscope."""
    model = timm.create_model(name).eval()
    info = timm.models.FeatureInfo(model.feature_info, len(model.feature_info))
    assert len(info.channels()) >= (2 if name.startswith("test_vit") else 3)  # tiny ViTs have 2 blocks
    size = _input_size(model, 96)
    x = torch.randn(1, *size)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(inter) == len(info.channels())
        for c, r, o in zip(info.channels(), info.reduction(), inter):
            assert o.shape[1] == c and o.shape[0] == 1 and not o.isnan().any()
            assert o.shape[2] <= math.ceil(size[1] / r) + 1 and o.shape[3] <= math.ceil(size[2] / r) + 1
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)  # the same operations
        if _grad_checkpointing(model):
            torch.testing.assert_close(model.forward_intermediates(x, output_fmt="NCHW")[0], final, rtol=0, atol=0)

        getter = timm.create_model(name, features_only=True, feature_cls="getter").eval()
        outs = getter(x)
    assert len(outs) == len(getter.feature_info.channels())
    for c, r, o in zip(getter.feature_info.channels(), getter.feature_info.reduction(), outs):
        assert o.shape[1] == c and o.shape[2] <= math.ceil(size[1] / r) + 1


@pytest.mark.parametrize("name", TINY)
def test_torchscript(name):
    """timm's test_model_forward_torchscript."""
    with timm.set_scriptable(True):
        model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(model, 128))
    with torch.no_grad():
        ref = model(x)
        out = torch.jit.script(model)(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)  # the first scripted run: the same ops, unfused


@pytest.mark.parametrize("name", TINY)
def test_fx_forward_backward_and_fx_torchscript(name):
    """timm's test_model_forward_fx, test_model_backward_fx and test_model_forward_fx_torchscript."""
    model = timm.create_model(name).eval()
    x = torch.randn(1, *_input_size(model, 128))
    with torch.no_grad():
        ref = model(x)
        fx = _fx_model(model)
        torch.testing.assert_close(next(iter(fx(x).values())), ref, rtol=0, atol=0)  # fx replays the same ops
        with timm.set_scriptable(True):
            scripted = torch.jit.script(_fx_model(timm.create_model(name).eval()))
        assert not next(iter(scripted(x).values())).isnan().any()

    model = timm.create_model(name, num_classes=42).train()
    fx = _fx_model(model, train=True)
    out = torch.cat(tuple(fx(torch.randn(2, *_input_size(model, 128))).values()))
    out.mean().backward()
    assert out.shape[-1] == 42
    assert not [n for n, p in fx.named_parameters() if p.grad is None], "parameters without gradient"


@pytest.mark.parametrize("name", ["alternet50", "alternet50_cifar", "vit_base_cbs_patch16_224", "resnet50_smooth"])
def test_full_depth_models_trace_with_fx(name):
    """Symbolic tracing needs no real weights: the full-depth models trace on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(name).eval()
    fx = _fx_model(model)
    assert next(iter(fx(torch.randn(1, *_input_size(model), device="meta")).values())).shape == (1, model.num_classes)


# ---------------------------------------------------------------- timm's file itself, when available

def _timm_tests_dir() -> Path | None:
    root = os.environ.get("VITSCOPE_TIMM_SDIST")
    if not root:
        return None
    path = Path(root) / "tests" / "test_models.py"
    return path if path.is_file() else None


@pytest.mark.skipif(_timm_tests_dir() is None, reason=(
    "timm's tests/test_models.py is not in the package; set VITSCOPE_TIMM_SDIST to an unpacked "
    "`pip download --no-deps --no-binary :all: timm==<installed version>` to run it"))
def test_timm_test_file_unchanged():
    """timm's test_models.py, unchanged, on vitscope's test_* models (VITSCOPE_TIMM_MODELS widens it)."""
    test_file = _timm_tests_dir()
    pkg_info = (test_file.parent.parent / "PKG-INFO").read_text()
    assert f"\nVersion: {timm.__version__}\n" in pkg_info, "the source distribution is not the installed timm"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
               VITSCOPE_TIMM_MODELS=os.environ.get("VITSCOPE_TIMM_MODELS", "test_*"))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "timm_suite_plugin", "-p", "no:cacheprovider", str(test_file)],
        cwd=test_file.parent.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    tail = proc.stdout[-3000:]
    assert proc.returncode == 0, tail
    assert re.search(r"\b[1-9]\d* passed", tail) and not re.search(r"\b\d+ failed", tail), tail
