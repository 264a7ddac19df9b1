"""``load_model(name, pretrained=True)`` and ``--pretrained`` through timm's hub loading, on a local Hugging Face
cache built here (no network): the exact cached weights, the model's own preprocessing, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from _helpers import HUB_COMMIT as COMMIT
from _helpers import spy_models, write_hub_cache
from vitscope.cli import main
from vitscope.io.weights import CheckpointError, load_model

TAG = "test_vit.r160_in1k"  # a real timm architecture and tag (370k parameters), hub id timm/test_vit.r160_in1k
HUB_ID = "timm/" + TAG


def _write_hub_cache(cache: Path, hub_id: str, state: dict[str, torch.Tensor]) -> Path:
    """TAG's architecture under ``hub_id`` in a local hub cache (``_helpers.write_hub_cache``)."""
    return write_hub_cache(cache, hub_id, state, TAG.split(".")[0])


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub cache holding seeded weights for TAG, HF_HUB_OFFLINE on; yields the weights."""
    from huggingface_hub import constants

    torch.manual_seed(123)
    state = timm.create_model(TAG).state_dict()
    cache = tmp_path / "hf" / "hub"
    _write_hub_cache(cache, HUB_ID, state)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return state


def test_load_model_pretrained_reads_the_cached_weights(hub):
    model = load_model(TAG, pretrained=True)
    got = model.state_dict()
    assert set(got) == set(hub)
    for k, v in hub.items():
        assert torch.equal(got[k], v), k
    assert model.pretrained_cfg["hf_hub_id"] == HUB_ID and model.num_classes == 1000
    # no tag: timm's default tag of the architecture, the same cached file
    assert torch.equal(load_model("test_vit", pretrained=True).state_dict()["head.weight"], hub["head.weight"])


def test_load_model_pretrained_with_an_overlaid_hub_id(hub, tmp_path, monkeypatch):
    """Any hub id timm is pointed at (pretrained_cfg_overlay) is read from the cache too."""
    from huggingface_hub import constants

    torch.manual_seed(7)
    other = timm.create_model(TAG).state_dict()
    _write_hub_cache(Path(constants.HF_HUB_CACHE), "someone/my-test-vit", other)
    model = load_model(TAG, pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id="someone/my-test-vit"))
    assert torch.equal(model.state_dict()["head.weight"], other["head.weight"])
    assert not torch.equal(other["head.weight"], hub["head.weight"])


def test_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    empty = tmp_path / "empty-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(empty))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError) as err:
        load_model(TAG, pretrained=True)
    msg = str(err.value)
    assert TAG in msg and str(empty) in msg and f"huggingface-cli download {HUB_ID}" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "\n" not in msg


def test_unknown_tag_and_models_without_weights(hub):
    with pytest.raises(CheckpointError, match=r"no pretrained weights 'test_vit\.nope'.*test_vit\.r160_in1k"):
        load_model("test_vit.nope", pretrained=True)
    with pytest.raises(CheckpointError, match="test_vit_cifar has none"):
        load_model("test_vit_cifar", pretrained=True)
    with pytest.raises(ValueError, match="Unknown model 'no_such_net'"):
        load_model("no_such_net", pretrained=True)
    with pytest.raises(ValueError, match="not both"):
        load_model(TAG, "w.safetensors", pretrained=True)


def _image_folder(root: Path) -> list[tuple[Path, int]]:
    """root/{train,val}/{cat,dog}/*.png of several sizes and aspect ratios; the val images in folder order."""
    rng = np.random.default_rng(0)
    sizes = [(200, 170), (90, 130), (161, 161), (300, 120)]
    items = []
    for split in ("train", "val"):
        for c, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i, (w, h) in enumerate(sizes[:2] if split == "train" else sizes):
                path = root / split / cls / f"{i}.png"
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
                if split == "val":
                    items.append((path, c))
    return items


def test_probe_pretrained_feeds_the_models_own_preprocessing(hub, tmp_path, monkeypatch):
    """The tensors the model receives equal timm's create_transform(**resolve_data_config(model=model)) on the
    same images; the preprocessing is written into the output's metadata."""
    import vitscope.io.checkpoints as weights

    items = _image_folder(tmp_path / "imgs")
    seen: list[torch.Tensor] = []
    built = []
    real = weights.load_model

    def spying(*a, **kw):
        m = real(*a, **kw)
        m.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach().clone()))
        built.append(m)
        return m

    monkeypatch.setattr(weights, "load_model", spying)
    out = tmp_path / "out"
    rc = main(["probe", "--model", TAG, "--pretrained", "--data", f"imagefolder:{tmp_path / 'imgs'}",
               "--measures", "attention_entropy", "--batch-size", "3", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    cfg = resolve_data_config(model=built[0])
    assert cfg["input_size"] == (3, 160, 160) and cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.95
    tf = create_transform(**cfg)
    ref = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in items])
    got = torch.cat(seen)
    assert got.shape == ref.shape == (8, 3, 160, 160)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    meta = json.loads((out / "meta.json").read_text())
    pre = meta["preprocessing"]
    assert pre["source"] == "model" and pre["input_size"] == [3, 160, 160] and pre["interpolation"] == "bicubic"
    assert pre["mean"] == [0.5, 0.5, 0.5] and pre["crop_pct"] == 0.95
    assert meta["pretrained"] is True and meta["hf_hub_id"] == HUB_ID and meta["num_classes"] == 1000
    assert "1000 classes" in meta["class_mismatch"] and meta["data_classes"] == 2


def test_preprocessing_overrides_and_data_statistics(hub, tmp_path, monkeypatch):
    import argparse

    from vitscope.cli import build_parser
    from vitscope.cli._common import build_setup

    _image_folder(tmp_path / "imgs")
    spec = f"imagefolder:{tmp_path / 'imgs'}"
    parser: argparse.ArgumentParser = build_parser()
    base = ["probe", "--model", TAG, "--pretrained", "--data", spec, "--out", str(tmp_path / "o"), "--device", "cpu"]
    s = build_setup(parser.parse_args(base + ["--mean", "0.1,0.2,0.3", "--std", "0.5", "--interpolation",
                                              "bilinear", "--crop-pct", "1"]))
    pre = s.preprocessing
    assert pre["mean"] == (0.1, 0.2, 0.3) and pre["std"] == (0.5, 0.5, 0.5) and pre["interpolation"] == "bilinear"
    assert pre["crop_pct"] == 1.0 and pre["input_size"] == (3, 160, 160) and pre["source"] == "model"
    assert pre["overridden"] == ["crop_pct", "interpolation", "mean", "std"]
    x, _ = next(iter(s.loader))
    cfg = dict(input_size=(3, 160, 160), interpolation="bilinear", mean=(0.1, 0.2, 0.3), std=(0.5,) * 3,
               crop_pct=1.0, crop_mode="center")
    first = sorted((tmp_path / "imgs" / "val" / "cat").glob("*.png"))[0]
    torch.testing.assert_close(x[0], create_transform(**cfg)(Image.open(first).convert("RGB")), rtol=0, atol=0)
    d = build_setup(parser.parse_args(base + ["--preprocess", "data"])).preprocessing
    # the data's statistics: an image folder has none of its own, so ImageNet's constants, exactly
    assert d["source"] == "data" and tuple(d["mean"]) == (0.485, 0.456, 0.406) and d["input_size"][-1] == 160
    r = build_setup(parser.parse_args(["probe", "--model", "test_vit_cifar", "--data", "fake", "--out",
                                       str(tmp_path / "o")])).preprocessing
    assert r["source"] == "data" and r["input_size"] == (3, 32, 32)  # no weights: the data's statistics


def test_cli_pretrained_offline_uncached_exits_2_in_a_fresh_process(tmp_path):
    """The environment variables a user sets (HF_HOME, HF_HUB_OFFLINE=1), read by a fresh process."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "vitscope", "probe", "--model", TAG, "--pretrained", "--data", "fake",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if "error" in line]  # timm logs one INFO line before it
    assert len(err) == 1 and err[0].startswith("vitscope probe: error: ") and TAG in err[0]
    assert str(tmp_path / "home" / "hub") in err[0] and f"huggingface-cli download {HUB_ID}" in err[0]
    assert not (tmp_path / "o").exists()


def test_default_preprocessing_of_a_run_is_what_training_validated_with(hub):
    """A run that recorded no preprocessing (older vitscope; fine-tuned or not) is fed the data's statistics at its
    img_size, as `vitscope train` then validated it; a run that recorded its preprocessing gets exactly that; hub
    weights get the model's."""
    import argparse

    from vitscope.cli._common import resolve_preprocessing
    from vitscope.data import data_info

    model = load_model(TAG, pretrained=True)
    args = argparse.Namespace(preprocess="auto", img_size=None, mean=None, std=None, interpolation=None,
                              crop_pct=None, data="fake")
    info = data_info("fake")
    run = {"pretrained": True, "checkpoint": "runs/ft/model.safetensors", "img_size": 96}
    pre = resolve_preprocessing(args, model, run, info)
    assert pre["source"] == "data" and pre["input_size"] == (3, 96, 96) and pre["mean"] == tuple(info.mean)
    recorded = {"mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic", "crop_pct": 0.9}
    pre = resolve_preprocessing(args, model, {**run, "trained_preprocessing": recorded}, info)
    assert pre["source"] == "run" and pre["std"] == (0.25,) * 3 and pre["input_size"] == (3, 96, 96)
    pre = resolve_preprocessing(args, model, {"pretrained": True, "checkpoint": None}, info)
    assert pre["source"] == "model" and pre == {**resolve_data_config(model=model), "input_size": (3, 160, 160),
                                                 "source": "model", "overridden": []}


def test_truncated_cached_weights_say_so(hub):
    from huggingface_hub import constants

    snap = Path(constants.HF_HUB_CACHE) / ("models--" + HUB_ID.replace("/", "--")) / "snapshots" / COMMIT
    data = (snap / "model.safetensors").read_bytes()
    (snap / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_model(TAG, pretrained=True)
    msg = str(err.value)
    assert "probably truncated" in msg and f"huggingface-cli download {HUB_ID}" in msg and "\n" not in msg


def test_pretrained_at_another_img_size_resamples_the_position_embedding(hub, tmp_path):
    """--img-size with hub weights builds the ViT at that size (timm resamples pos_embed from the weights)."""
    import argparse

    from vitscope.cli import build_parser
    from vitscope.cli._common import build_setup

    parser: argparse.ArgumentParser = build_parser()
    s = build_setup(parser.parse_args(["probe", "--model", TAG, "--pretrained", "--img-size", "96", "--data", "fake",
                                       "--out", str(tmp_path / "o"), "--device", "cpu"]))
    assert s.preprocessing["input_size"] == (3, 96, 96) and s.preprocessing["overridden"] == ["input_size"]
    ref = timm.create_model(TAG, pretrained=True, img_size=96).state_dict()
    got = s.model.state_dict()
    assert got["pos_embed"].shape == ref["pos_embed"].shape != hub["pos_embed"].shape
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    x, _ = next(iter(s.loader))
    assert x.shape[-1] == 96 and torch.isfinite(s.model(x)).all()


def test_robustness_pretrained_normalizes_with_the_models_statistics(hub, tmp_path):
    """robustness reads [0, 1] pixels cropped as the model says and normalizes inside with its mean/std: the clean
    logits equal the model on timm's own transform of the same images."""
    from vitscope.io.weights import load_model as load

    items = _image_folder(tmp_path / "imgs")
    out = tmp_path / "rob"
    assert main(["robustness", "--model", TAG, "--pretrained", "--data", f"imagefolder:{tmp_path / 'imgs'}",
                 "--split", "val", "--suite", "calibration", "--no-plots", "--no-progress", "--device", "cpu",
                 "--batch-size", "8", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["mean"] == [0.5, 0.5, 0.5] and res["meta"]["normalization"] == "model" and res["n"] == 8
    model = load(TAG, pretrained=True).eval()
    tf = create_transform(**resolve_data_config(model=model))
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in items])
    y = torch.tensor([c for _, c in items])
    with torch.no_grad():  # one batch of 8 as the command's: the same float32 logits, bit for bit
        nll = torch.nn.functional.cross_entropy(model(x).double(), y).item()
    # Both take float64 log-softmax of those logits and average the 8 terms, perhaps in another order: <= 7 roundings
    assert res["calibration"]["nll"] == pytest.approx(nll, rel=8 * 2.0**-53, abs=0)


# train: one deterministic training view (resize + center crop, no flip) so its tensors can be recomputed
_FINE_TUNE = ["epochs=1", "batch_size=4", "warmup_epochs=0", "train_crop=resize", "hflip=0", "progress=false"]


def _train_tensors_match(seen, paths, mean, std):
    """Each training input is one of the training images, resized + center-cropped and normalized by mean/std."""
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(160), transforms.CenterCrop(160), transforms.ToTensor(),
                             transforms.Normalize(mean, std)])
    refs = [tf(Image.open(p).convert("RGB")) for p in paths]
    xs = torch.cat([x for training, x in seen if training])
    assert len(xs) == len(refs) == 4
    for x in xs:
        assert min((x - r).abs().max().item() for r in refs) == 0


def test_train_pretrained_feeds_the_models_preprocessing_and_records_it(hub, tmp_path, monkeypatch):
    """`train --pretrained` normalizes train and val with the model's pretrained_cfg and crops val as it says (timm's
    train.py); the run records it, and `probe --checkpoint RUN` feeds the same tensors: it reproduces the val top-1
    and NLL of training."""
    from vitscope.training.checkpoint import run_model_spec

    items = _image_folder(tmp_path / "imgs")
    data = f"imagefolder:{tmp_path / 'imgs'}"
    built = spy_models(monkeypatch)
    run = tmp_path / "ft"
    assert main(["train", "--model", TAG, "--pretrained", "--data", data, "--out", str(run), *_FINE_TUNE]) == 0
    model, seen = built[0]
    cfg = resolve_data_config(model=model)
    # the data's own statistics differ from the model's by >= 0.015 in every channel: normalized pixels move by
    # >= 0.015 / std, so the exact comparisons below tell the two apart
    assert min(abs(a - b) for a, b in zip(cfg["mean"], (0.485, 0.456, 0.406))) >= 0.015
    ref = torch.stack([create_transform(**cfg)(Image.open(p).convert("RGB")) for p, _ in items])
    val = torch.cat([x for training, x in seen if not training])
    assert val.shape == ref.shape == (8, 3, 160, 160)
    torch.testing.assert_close(val, ref, rtol=0, atol=0)
    _train_tensors_match(seen, sorted((tmp_path / "imgs" / "train").glob("*/*.png")), cfg["mean"], cfg["std"])

    expected = {"input_size": [3, 160, 160], "interpolation": cfg["interpolation"], "mean": list(cfg["mean"]),
                "std": list(cfg["std"]), "crop_pct": cfg["crop_pct"], "crop_mode": cfg["crop_mode"],
                "source": "model", "overridden": []}
    assert run_model_spec(run)["preprocessing"] == expected
    assert run_model_spec(run / "model.safetensors")["preprocessing"] == expected
    assert "preprocess: model" in (run / "config.yaml").read_text()

    m = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    out = tmp_path / "probe"
    # A residual-stream measure (the forward as training ran it) in training's eval batches of 4: its float32
    # logits bit for bit; both NLLs are float64 means of the same 8 terms >= 0, summed in some order (<= 2n 2^-53).
    assert main(["probe", "--checkpoint", str(run), "--data", data, "--measures", "ratio_of_norms",
                 "--batch-size", "4", "--device", "cpu", "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["preprocessing"] == {**expected, "source": "run"}
    assert meta["examples"] == m["val_n"] == 8
    assert 100 * meta["accuracy"] == m["val_top1"]  # 100 (hits / n) both sides, the same float64 operations
    assert meta["nll"] == pytest.approx(m["val_nll"], rel=2 * 8 * 2.0**-53, abs=0)
    probed = torch.cat([x for _, x in built[-1][1]])  # the rebuilt network saw training's val tensors
    torch.testing.assert_close(probed, ref, rtol=0, atol=0)


def test_train_preprocessing_overrides_and_data_statistics(hub, tmp_path, monkeypatch):
    """Config keys mean/std/crop_pct/eval_interpolation override the model's; preprocess=data keeps the data set's
    statistics and crop (vitscope's behaviour before), also for a fine-tuned run."""
    from vitscope.data import data_info
    from vitscope.training.checkpoint import run_model_spec

    items = _image_folder(tmp_path / "imgs")
    data = f"imagefolder:{tmp_path / 'imgs'}"
    built = spy_models(monkeypatch)
    run = tmp_path / "over"
    assert main(["train", "--model", TAG, "--pretrained", "--data", data, "--out", str(run), *_FINE_TUNE,
                 "mean=[0.1,0.2,0.3]", "std=[0.5,0.4,0.3]", "crop_pct=1", "eval_interpolation=bilinear"]) == 0
    pre = run_model_spec(run)["preprocessing"]
    assert pre["source"] == "model" and pre["overridden"] == ["crop_pct", "interpolation", "mean", "std"]
    cfg = dict(input_size=(3, 160, 160), interpolation="bilinear", mean=(0.1, 0.2, 0.3), std=(0.5, 0.4, 0.3),
               crop_pct=1.0, crop_mode="center")
    ref = torch.stack([create_transform(**cfg)(Image.open(p).convert("RGB")) for p, _ in items])
    torch.testing.assert_close(torch.cat([x for t, x in built[0][1] if not t]), ref, rtol=0, atol=0)
    _train_tensors_match(built[0][1], sorted((tmp_path / "imgs" / "train").glob("*/*.png")), cfg["mean"], cfg["std"])

    run = tmp_path / "data"
    assert main(["train", "--model", TAG, "--pretrained", "--data", data, "--out", str(run), *_FINE_TUNE,
                 "preprocess=data"]) == 0
    info = data_info(data)
    cfg = dict(input_size=(3, 160, 160), interpolation="bilinear", mean=info.mean, std=info.std, crop_pct=0.875,
               crop_mode="center")
    ref = torch.stack([create_transform(**cfg)(Image.open(p).convert("RGB")) for p, _ in items])
    torch.testing.assert_close(torch.cat([x for t, x in built[-1][1] if not t]), ref, rtol=0, atol=0)
    pre = run_model_spec(run)["preprocessing"]
    assert pre["source"] == "data" and pre["mean"] == list(info.mean) and pre["crop_pct"] == 0.875  # JSON is exact


def test_preprocess_auto_resolution_and_resume_of_older_runs():
    """auto: the model's for pretrained runs, the data's otherwise; a checkpoint saved before the key existed keeps
    the data's on resume; --auto-resume accepts auto against the resolved saved value."""
    from vitscope.cli.train import _same_run
    from vitscope.training import resolve_config
    from vitscope.training.loaders import preprocess_mode

    ft = resolve_config(model=TAG, data="fake", pretrained=True)
    assert preprocess_mode(ft) == "model"
    assert preprocess_mode(resolve_config(model=TAG, data="fake")) == "data"
    assert preprocess_mode(ft, {"model": TAG}) == "data"  # an older run's saved config: no `preprocess` key
    assert preprocess_mode(ft, {"model": TAG, "preprocess": "model"}) == "model"
    assert preprocess_mode(resolve_config(model=TAG, data="fake", pretrained=True, preprocess="data")) == "data"
    saved = resolve_config(model=TAG, data="fake", pretrained=True, preprocess="model", out="r")
    assert _same_run(saved, resolve_config(model=TAG, data="fake", pretrained=True, out="r"), "r") == saved
    from vitscope.cli import CLIError

    with pytest.raises(CLIError, match="preprocess: 'model' -> 'data'"):
        _same_run(saved, resolve_config(model=TAG, data="fake", pretrained=True, preprocess="data", out="r"), "r")


def test_resumed_fine_tuning_keeps_the_models_preprocessing(hub, tmp_path, monkeypatch):
    """--resume (no download: the network is rebuilt from the checkpoint) and --auto-resume of a fine-tuned run go on
    with the preprocessing it started with."""
    from vitscope.training.checkpoint import read_jsonl, run_model_spec

    items = _image_folder(tmp_path / "imgs")
    data = f"imagefolder:{tmp_path / 'imgs'}"
    run = tmp_path / "ft"
    argv = ["train", "--model", TAG, "--pretrained", "--data", data, "--out", str(run), "--auto-resume", *_FINE_TUNE]
    assert main(argv) == 0
    first = run_model_spec(run)["preprocessing"]
    built = spy_models(monkeypatch)
    assert main(["train", "--resume", str(run), "epochs=2"]) == 0
    cfg = resolve_data_config(model=built[0][0])
    ref = torch.stack([create_transform(**cfg)(Image.open(p).convert("RGB")) for p, _ in items])
    torch.testing.assert_close(torch.cat([x for t, x in built[0][1] if not t]), ref, rtol=0, atol=0)
    assert run_model_spec(run)["preprocessing"] == first and first["source"] == "model"
    assert main([*argv[:-len(_FINE_TUNE)], *[a if a != "epochs=1" else "epochs=2" for a in _FINE_TUNE]]) == 0
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1]  # the finished run was accepted as is


def _write_hub_repo(cache: Path, repo: str, state: dict[str, torch.Tensor]) -> None:
    """A community repository as timm's push_to_hf_hub writes it: config.json with the architecture and the
    pretrained_cfg (here TAG's, so the preprocessing is known), model.safetensors."""
    _write_hub_cache(cache, repo, state)
    cfg = {k: v for k, v in timm.models.get_pretrained_cfg(TAG).to_dict().items() if not k.startswith("hf_hub")}
    config = {"architecture": TAG.split(".")[0], "num_classes": 1000, "pretrained_cfg": cfg}
    snap = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT
    (snap / "config.json").write_text(json.dumps(config))


def test_hf_hub_names_load_everywhere_a_model_is_named(hub, tmp_path):
    """``hf-hub:ORG/NAME`` (timm's name for a hub repository) with --pretrained: load_model, probe, train and the
    trained run read back, offline from the cache; its config's preprocessing is the model's."""
    from huggingface_hub import constants

    torch.manual_seed(11)
    other = timm.create_model(TAG).state_dict()
    _write_hub_repo(Path(constants.HF_HUB_CACHE), "someone/my-test-vit", other)
    name = "hf-hub:someone/my-test-vit"
    model = load_model(name, pretrained=True)
    for k, v in other.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert model.pretrained_cfg["hf_hub_id"] == "someone/my-test-vit"

    _image_folder(tmp_path / "imgs")
    data = f"imagefolder:{tmp_path / 'imgs'}"
    out = tmp_path / "probe"
    assert main(["probe", "--model", name, "--pretrained", "--data", data, "--measures", "attention_entropy",
                 "-b", "4", "-j", "0", "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model_name"] == name and meta["hf_hub_id"] == "someone/my-test-vit" and meta["weights"] == "pretrained"
    assert meta["preprocessing"]["input_size"] == [3, 160, 160] and meta["preprocessing"]["source"] == "model"
    run = tmp_path / "ft"
    assert main(["train", "--model", name, "--pretrained", "--data", data, "--out", str(run), *_FINE_TUNE]) == 0
    out = tmp_path / "probe-run"
    assert main(["probe", "--checkpoint", str(run), "--data", data, "--measures", "attention_entropy", "-b", "4",
                 "-j", "0", "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["model_name"] == name and meta["weights"] == "checkpoint" and meta["examples"] == 8


def test_hf_hub_names_not_cached_offline_are_one_line(hub, tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"someone/absent.*huggingface-cli download someone/absent"):
        load_model("hf-hub:someone/absent", pretrained=True)
    with pytest.raises(ValueError, match="not a hub name"):
        load_model("hf-hub:no-org", pretrained=True)
    assert main(["probe", "--model", "hf-hub:someone/absent", "--pretrained", "--data", "fake", "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "someone/absent" in err[0] and "HF_HUB_OFFLINE=1" in err[0]
