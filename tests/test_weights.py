"""Weights in and out: vitscope's safetensors + sidecar files, timm checkpoints, and clear errors."""
from __future__ import annotations

import argparse
import json
import traceback
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
import torch.nn as nn

import vitscope
import vitscope.io.weights as weights_mod
from vitscope.io import (
    CheckpointError,
    load_checkpoint,
    load_model,
    load_weights,
    read_sidecar,
    save_weights,
)

X32 = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    """Move every parameter and float buffer off its init, so a lost tensor cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
                if name.endswith("running_var"):
                    t.abs_()
    return model.eval()


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def _no_chained_traceback(err: BaseException) -> None:
    text = "".join(traceback.format_exception(err))
    assert "During handling" not in text and "direct cause" not in text, text


def _sd(name: str, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return vitscope.create_model(name, **kwargs).state_dict()


# ---------------------------------------------------------------------------------------------
# save_weights / load_weights


@pytest.mark.parametrize("name", ["test_vit_cb", "test_vit_cbs", "test_convit_32", "test_resnet"])
def test_round_trip_rebuilds_from_sidecar(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = _perturb(vitscope.create_model(name, num_classes=7), seed=1)
    path = save_weights(model, tmp_path / "sub" / "model.safetensors", model_kwargs={"num_classes": 7})
    assert path == tmp_path / "sub" / "model.safetensors" and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]  # no temp left
    plain = tmp_path / "plain"
    plain.touch()
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's 0600

    info = json.loads((tmp_path / "sub" / "model.json").read_text())
    assert info["model_name"] == name  # taken from model.pretrained_cfg['architecture']
    assert info["model_kwargs"] == {"num_classes": 7}
    assert info["num_params"] == sum(p.numel() for p in model.parameters())
    assert info["vitscope_version"] == vitscope.__version__
    assert info["timm_version"] == timm.__version__ and info["torch_version"] == torch.__version__

    torch.manual_seed(123)  # a different init: only the file can make the outputs agree
    fresh = vitscope.create_model(name, num_classes=7).eval()
    x = X32 if name != "test_resnet" else X32[:, :, :24, :24]
    with torch.no_grad():
        expected = model(x)
        assert not torch.equal(fresh(x), expected)  # so the exact comparison below tells the file's weights apart
        loaded = load_weights(path).eval()
        assert type(loaded) is type(model) and loaded.num_classes == 7
        _assert_same_state(model, loaded)
        assert torch.equal(loaded(x), expected)
        # into a model given by the caller, and through the generic checkpoint loader
        assert torch.equal(load_weights(path, model=fresh).eval()(x), expected)
        again = load_checkpoint(vitscope.create_model(name, num_classes=7), path).eval()
        assert torch.equal(again(x), expected)


def test_rebuild_without_kwargs_takes_head_from_weights(tmp_path: Path) -> None:
    model = _perturb(vitscope.create_model("test_vit_cbs", num_classes=3), seed=2)
    path = save_weights(model, tmp_path / "m.safetensors")  # no model_kwargs recorded
    loaded = load_weights(path).eval()
    assert loaded.num_classes == 3
    _assert_same_state(model, loaded)


def test_sidecar_copy_in_header_when_json_is_lost(tmp_path: Path) -> None:
    model = _perturb(vitscope.create_model("test_vit_cb", num_classes=5), seed=3)
    path = save_weights(model, tmp_path / "m.safetensors", model_kwargs={"num_classes": 5})
    (tmp_path / "m.json").unlink()
    assert read_sidecar(path)["model_kwargs"] == {"num_classes": 5}
    _assert_same_state(model, load_weights(path))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(5, 5)
        self.dec = nn.Linear(5, 5)
        self.dec.weight = self.enc.weight  # tied
        self.register_buffer("enc_t", self.enc.weight.data.t())  # a strided view of the same storage


def test_tied_and_strided_tensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _Tied()
    with pytest.raises(RuntimeError):  # what save_weights must get around
        safetensors.torch.save_file(model.state_dict(), str(tmp_path / "raw.safetensors"))
    path = save_weights(model, tmp_path / "tied.safetensors", model_name="tied")
    stored = safetensors.torch.load_file(str(path))
    assert set(stored) == set(model.state_dict())  # every name stored, so any strict loader works
    torch.manual_seed(1)
    other = _Tied()
    assert not torch.equal(other.enc.weight, model.enc.weight)
    load_weights(path, model=other)
    _assert_same_state(model, other)
    assert other.dec.weight is other.enc.weight  # still tied after loading
    info = read_sidecar(path)
    assert info["num_params"] == 5 * 5 + 5 + 5  # the tied weight counted once


def test_save_rejects_bad_names_and_kwargs(tmp_path: Path) -> None:
    model = vitscope.create_model("test_vit_cb")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_weights(model, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="norm_layer"):
        save_weights(model, tmp_path / "m.safetensors", model_kwargs={"norm_layer": nn.LayerNorm})
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_failure_mid_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = vitscope.create_model("test_vit_cb")
    dest = tmp_path / "m.safetensors"

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)  # half a file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_weights(model, dest)
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a temp file

    monkeypatch.undo()
    save_weights(model, dest)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError):
        save_weights(_perturb(vitscope.create_model("test_vit_cb"), 5), dest)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old files intact

    # the sidecar's write fails after the weights' temp file is complete: both temps go, nothing moves
    monkeypatch.undo()
    real = weights_mod.write_temp

    def failing_sidecar(path, write):
        if path.suffix == ".json":
            raise OSError("disk full")
        return real(path, write)

    monkeypatch.setattr(weights_mod, "write_temp", failing_sidecar)
    with pytest.raises(OSError, match="disk full"):
        save_weights(_perturb(vitscope.create_model("test_vit_cb"), 6), dest)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# ---------------------------------------------------------------------------------------------
# timm checkpoints


@pytest.fixture(scope="module")
def vit_tiny_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, Path]]:
    """A random-init timm vit_tiny_patch16_224 state dict saved as the hub serves it."""
    torch.manual_seed(0)
    state = timm.create_model("vit_tiny_patch16_224").state_dict()
    d = tmp_path_factory.mktemp("vit_tiny")
    files = {"pth": d / "model.pth", "bin": d / "pytorch_model.bin", "safetensors": d / "model.safetensors"}
    torch.save(state, files["pth"])
    torch.save(state, files["bin"], _use_new_zipfile_serialization=False)  # legacy pickle format
    safetensors.torch.save_file(state, str(files["safetensors"]))
    return state, files


def _zero_(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for t in model.state_dict().values():
            t.zero_()
    return model


def test_timm_vit_tiny_into_timm_and_cb(vit_tiny_files: tuple[dict, dict[str, Path]]) -> None:
    state, files = vit_tiny_files
    vit = timm.create_model("vit_tiny_patch16_224").eval()
    cb = vitscope.create_model("vit_tiny_cb_patch16_224").eval()
    for fmt, path in files.items():
        for model in (_zero_(vit), _zero_(cb)):
            load_checkpoint(model, path)
            got = model.state_dict()
            assert got.keys() == state.keys(), fmt  # CB adds no parameters
            assert all(torch.equal(got[k], state[k]) for k in state), fmt

    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    reference = timm.create_model("vit_tiny_patch16_224").eval()
    reference.load_state_dict(state)
    with torch.no_grad():
        expected = reference(x)
        assert torch.equal(vit(x), expected)
        with_cb = cb(x)
        for blk in cb.blocks:  # switch CB off: then it is the same network
            blk.mlp.cb_placement = ""
        without_cb = cb(x)
    assert torch.equal(without_cb, expected)
    # outputs differ only by CB, which adds each MLP input's token mean to it: a change of the network's function,
    # the logits (|z| <= 0.95) move by ~0.35 here, far above 1e-3, itself ~1e4 float32 roundings of them
    assert not torch.allclose(with_cb, expected, atol=1e-3)

    loaded = load_model("vit_tiny_cb_patch16_224", files["safetensors"])
    assert all(torch.equal(loaded.state_dict()[k], state[k]) for k in state)


def test_nested_and_prefixed_pth(tmp_path: Path) -> None:
    plain, ema = _sd("test_vit_cb", 1), _sd("test_vit_cb", 2)
    path = tmp_path / "checkpoint-3.pth.tar"
    torch.save({
        "epoch": 3,
        "arch": "test_vit_cb",
        "args": argparse.Namespace(lr=0.1),  # timm train.py stores its args; allowed as in timm
        "state_dict": {f"module.{k}": v for k, v in plain.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]},
    }, path)
    model = load_checkpoint(vitscope.create_model("test_vit_cb"), path)
    assert all(torch.equal(model.state_dict()[k], plain[k]) for k in plain)

    path = tmp_path / "with_ema.pth"
    torch.save({"state_dict": plain, "state_dict_ema": ema}, path)
    model = load_checkpoint(vitscope.create_model("test_vit_cb"), path)  # raw weights unless asked (validate.py)
    assert all(torch.equal(model.state_dict()[k], plain[k]) for k in plain)
    model = load_checkpoint(model, path, use_ema=True)
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)
    for load in (lambda p, **kw: load_model("test_vit_cb", p, **kw),
                 lambda p, **kw: load_checkpoint(vitscope.create_model("test_vit_cb"), p, **kw)):
        assert torch.equal(load(path).head.weight, plain["head.weight"])
        assert torch.equal(load(path, use_ema=True).head.weight, ema["head.weight"])
    torch.save({"state_dict": plain}, tmp_path / "no_ema.pth")
    with pytest.raises(CheckpointError, match="holds no EMA weights"):  # never a silent fallback to the raw ones
        load_model("test_vit_cb", tmp_path / "no_ema.pth", use_ema=True)

    path = tmp_path / "model_key.pt"
    torch.save({"model": plain}, path)
    assert torch.equal(load_model("test_vit_cb", path).head.weight, plain["head.weight"])


def test_checkpoint_filter_resizes_pos_embed(tmp_path: Path) -> None:
    state = _sd("test_vit_cb", 4)  # 32 px, 4x4 grid
    path = tmp_path / "m.pth"
    torch.save(state, path)
    model = load_model("test_vit_cb", path, img_size=64)  # 8x8 grid: timm's filter resamples pos_embed
    assert model.pos_embed.shape == (1, 1 + 64, 24)
    assert torch.equal(model.pos_embed[:, :1], state["pos_embed"][:, :1])  # class token kept
    assert torch.equal(model.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("name", ["test_vit_cifar", "test_resnet"])
def test_load_model_infers_num_classes(tmp_path: Path, name: str) -> None:
    state = _sd(name, 5, num_classes=2)  # e.g. an ELPV checkpoint
    path = tmp_path / "elpv.bin"
    torch.save(state, path)
    model = load_model(name, path)
    assert model.num_classes == 2
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)
    with pytest.raises(CheckpointError, match="num_classes=2") as info:
        load_model(name, path, num_classes=10)
    clf = "head" if "vit" in name else "fc"
    assert f"{clf}.weight: ({2}, " in str(info.value) and f"vs ({10}, " in str(info.value)
    headless = {k: v for k, v in state.items() if not k.startswith(f"{clf}.")}
    torch.save(headless, path)
    assert load_model(name, path).num_classes == 0


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    for call in (lambda: load_weights(missing), lambda: load_model("test_vit_cb", missing),
                 lambda: load_checkpoint(vitscope.create_model("test_vit_cb"), missing)):
        with pytest.raises(CheckpointError, match="not found") as info:
            call()
        assert str(missing) in str(info.value)
    with pytest.raises(CheckpointError, match="directory"):
        load_model("test_vit_cb", tmp_path)
    (tmp_path / "empty.pth").touch()
    with pytest.raises(CheckpointError, match="empty"):
        load_model("test_vit_cb", tmp_path / "empty.pth")


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "legacy.bin"])
def test_truncated_file(tmp_path: Path, fmt: str) -> None:
    state = _sd("test_vit_cb")
    path = tmp_path / f"model.{fmt}"
    if fmt == "safetensors":
        safetensors.torch.save_file(state, str(path))
    else:
        torch.save(state, path, _use_new_zipfile_serialization=fmt == "pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as info:
        load_model("test_vit_cb", path)
    assert str(path) in str(info.value)
    _no_chained_traceback(info.value)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    cases = {
        "notes.pth": None,  # text, not a torch file
        "list.pt": [1, 2, 3],
        "meta.pth": {"epoch": 3, "lr": 0.1},
        "tensor.pt": torch.zeros(3),
    }
    for name, obj in cases.items():
        path = tmp_path / name
        if obj is None:
            path.write_text("just some text")
        else:
            torch.save(obj, path)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(vitscope.create_model("test_vit_cb"), path)
        assert str(path) in str(info.value), name
        _no_chained_traceback(info.value)


_RAN: list[str] = []


def _payload() -> None:
    _RAN.append("pwned")


class _Evil:
    def __reduce__(self):
        return (_payload, ())


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _sd("test_vit_cb"), "hook": _Evil()}, path)
    with pytest.raises(CheckpointError, match="Refused") as info:
        load_checkpoint(vitscope.create_model("test_vit_cb"), path)
    message = str(info.value)
    assert str(path) in message and "_payload" in message and "weights_only" in message
    assert _RAN == []  # nothing from the file ran
    _no_chained_traceback(info.value)


def test_shape_mismatch_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "wide.safetensors"
    safetensors.torch.save_file(_sd("test_vit_cb", embed_dim=48), str(path))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(vitscope.create_model("test_vit_cb"), path)
    message = str(info.value)
    assert str(path) in message
    assert "blocks.0.attn.qkv.weight: (144, 48) vs (72, 24)" in message
    n_bad = len(message.split("vs (")) - 1
    assert n_bad == 10 and "... and 21 more" in message  # at most 10 listed, then a count
    assert "embedding width differs" in message
    _no_chained_traceback(info.value)

    path = tmp_path / "partial.pth"
    state = _sd("test_vit_cb")
    state["extra.weight"] = state.pop("norm.weight")
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(vitscope.create_model("test_vit_cb"), path)
    message = str(info.value)
    assert "missing from the checkpoint: norm.weight" in message
    assert "unexpected key(s) in the checkpoint: extra.weight" in message
    model = load_checkpoint(vitscope.create_model("test_vit_cb"), path, strict=False)  # lenient load
    assert torch.equal(model.head.weight, state["head.weight"])

    # strict=False also skips tensors whose shapes differ: fine-tuning a 3-class checkpoint on 10 classes
    path = tmp_path / "three.pth"
    state = _sd("test_vit_cb", 7, num_classes=3)
    torch.save(state, path)
    model = vitscope.create_model("test_vit_cb")
    head = model.head.weight.clone()
    load_checkpoint(model, path, strict=False)
    assert torch.equal(model.head.weight, head) and model.num_classes == 10
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_wrong_architecture_and_no_sidecar(tmp_path: Path) -> None:
    model = vitscope.create_model("test_vit_cb", num_classes=4)
    path = save_weights(model, tmp_path / "cb.safetensors", model_kwargs={"num_classes": 4})
    with pytest.raises(CheckpointError, match="another architecture") as info:
        load_model("test_resnet", path)
    assert "saved from 'test_vit_cb'" in str(info.value)
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(model.state_dict(), str(plain))
    with pytest.raises(CheckpointError, match="model=") as info:
        load_weights(plain)
    assert str(plain) in str(info.value)
