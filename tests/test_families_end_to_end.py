"""Every analysis command and the report, end to end through the CLI, on the timm families of issue 24 (Swin-T,
ConvNeXt-T, EVA02-S, DINOv3-S, BEiT-B, CaiT-XXS, BiT ResNetV2-50x1, EfficientNet-B0, RegNetY) with their real
pretrained tags, read offline from a local Hugging Face cache built here (weights of a seeded random
initialisation of that exact architecture, as in test_pretrained.py).

The architectures are the real ones; only the input is small (``--img-size``, where timm resizes the weights to it)
and the runs are tiny (4 examples, one batch, one Hessian eigenvalue from one product: a Rayleigh quotient); the file
took 78 s of CPU in one process under load (with two Hessian products then). ``docs/models.md`` has the commands at
224 px, run by hand.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from _helpers import write_hub_cache
from vitscope.cli import main
from vitscope.probing import PROBE_MEASURES, load_attention_maps

DATA = "fake:n=4,n_eval=4,classes=2"  # 4 examples per split; labels 0/1 (the first 2 of the model's 1000 classes)
ATTENTION = {n for n, cls in PROBE_MEASURES.items() if cls.needs_attention}
ALL = [*PROBE_MEASURES, "lesion", "localization"]  # what `probe --measures all` asks for


@dataclass(frozen=True)
class Family:
    tag: str  # a real timm tag: hub id timm/<tag>
    size: int | None  # --img-size (None: the tag's own)
    first_block: str  # module path of the first block, as capture names it (a one-block stage: the stage)
    attention: bool = False  # attention maps capture places on a grid (`vitscope attention`)
    window: int | None = None  # window side of windowed attention at the first layer
    loss: bool = True  # has a classifier head: hessian, landscape, robustness apply
    split: bool = True  # capture's table splits its blocks as z + f(z): ratio of norms applies
    curvature: bool = True  # hessian and landscape here (BEiT-B's 86M parameters: by hand at 224 px only)
    localization: bool = True  # the position probe here (Swin's 28 x 28 first grid: 784 classes, by hand only)


FAMILIES = [
    Family("swin_tiny_patch4_window7_224.ms_in1k", 112, "layers.0.blocks.0", attention=True, window=7,
           localization=False),
    Family("convnext_tiny.fb_in1k", 32, "stages.0.blocks.0"),
    Family("eva02_small_patch14_336.mim_in22k_ft_in1k", 28, "blocks.0", attention=True),
    Family("vit_small_patch16_dinov3.lvd1689m", 32, "blocks.0", attention=True, loss=False),  # features, no head
    Family("beit_base_patch16_224.in22k_ft_in22k_in1k", 32, "blocks.0", attention=True, curvature=False),
    Family("resnetv2_50x1_bit.goog_in21k_ft_in1k", 32, "stages.0.blocks.0"),
    Family("efficientnet_b0.ra_in1k", 32, "blocks.0.0"),
    Family("regnety_002.pycls_in1k", 32, "s1", split=False),  # RegNet's Bottleneck is not in the table
]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """Returns ``add(tag)``: writes a seeded random initialisation of the tag's architecture into a local hub cache
    under the tag's hub id (HF_HUB_OFFLINE on), so ``--model TAG --pretrained`` loads it."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def add(tag: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = timm.create_model(tag)  # the tag's pretrained_cfg: its class count (0: a feature backbone)
        state = model.state_dict()
        write_hub_cache(cache, model.pretrained_cfg["hf_hub_id"], state, tag.split(".")[0], model.num_classes)
        return state

    return add


def _numbers(obj, path="") -> list[tuple[str, float]]:
    """Every number in a JSON document, with its path."""
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in _numbers(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [x for i, v in enumerate(obj) for x in _numbers(v, f"{path}[{i}]")]
    return [(path, float(obj))] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


def _all_finite(path: Path) -> dict:
    doc = json.loads(path.read_text())
    bad = [p for p, v in _numbers(doc) if not math.isfinite(v)]
    assert not bad, (path, bad[:5])
    return doc


def _one_error_line(capsys, argv: list[str], *patterns: str) -> str:
    """Exit 2 and one `vitscope CMD: error:` line on stderr (timm logs INFO lines before it)."""
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith(f"vitscope {argv[0]}: error: ") and "Traceback" not in err[0], err
    for pattern in patterns:
        assert pattern in err[0], err[0]
    return err[0]


def _common(fam: Family, out: Path) -> list[str]:
    size = ["--img-size", str(fam.size)] if fam.size else []
    return ["--model", fam.tag, "--pretrained", "--data", DATA, *size, "--device", "cpu", "-j", "0", "--out", str(out)]


def _check_probe(fam: Family, out: Path) -> None:
    """Every measure of `all` is either a finite table naming the family's layers or named as not applicable."""
    res, meta = _all_finite(out / "results.json"), json.loads((out / "meta.json").read_text())
    assert meta["pretrained"] is True and meta["hf_hub_id"] == f"timm/{fam.tag}" and meta["examples"] == 4
    na = meta.get("not_applicable", {})
    skipped = set(meta.get("measures_not_applicable", []))
    asked = ALL if fam.localization else [m for m in ALL if m not in ("localization", "gpsa_gates")]
    expected = {"gpsa_gates"} & set(asked) | (set() if fam.attention else ATTENTION)
    assert expected <= skipped, (expected, skipped)
    assert not skipped & ({"cka", "fourier", "feature_variance", "ratio_of_norms"} | (ATTENTION if fam.attention
                                                                                      else set()))
    for m in asked:
        if m in skipped:
            assert isinstance(na[m], str) and len(na[m]) > 20 and m not in res, (m, na.get(m))
            continue
        rows = res[m]["rows"]
        if m == "ratio_of_norms" and not fam.split:  # no block capture splits as z + f(z): each named with why
            assert not rows and set(na[m]) >= {n for n in res["cka"]["layers"] if n != "stem"}, na.get(m)
            continue
        assert rows and all(r.get("value", 0) is not None for r in rows), m
    layers = res["cka"]["layers"]
    assert layers[0] == "stem" and any(n == fam.first_block or n.startswith(fam.first_block + ".") for n in layers)
    # a layer with itself: xy (a matmul's dot product) and xx (an elementwise sum) add the same n^2 = 16 squares in
    # other orders (gamma_16 each), one batch, x / sqrt(x x) 3 u: within 2 (16 + 2) u + 3 u of 1
    assert (np.abs(np.diag(res["cka"]["matrix"]) - 1) <= (2 * (16 + 2) + 3) * 2.0**-53).all()
    if fam.loss:
        assert 0 <= meta["accuracy"] <= 1 and meta["nll"] > 0
    else:
        assert "accuracy" not in meta and "no classifier head" in na["accuracy"]


def _check_attention(fam: Family, out: Path) -> None:
    maps = load_attention_maps(out / "attention.npz")
    assert maps.images.shape[0] == 1 and maps.layers and all(k == "msa" for k in maps.kinds)
    assert maps.layers[0].startswith(fam.first_block + ".")
    # a float32 softmax row's entries each within (N + 3) u32 relative (exp 2 u, the sum of N, the division) of
    # values summing to 1, N = h w + the prefix tokens (<= 5 here: DINOv3's class and 4 registers); summed here in
    # float64 (h w u64)
    for name, q in zip(maps.layers, maps.query_maps):  # (B, heads, h, w): the query patch's attention weights
        hw = q.shape[2] * q.shape[3]
        mass = q.astype(np.float64).sum((2, 3))
        assert np.isfinite(q).all() and q.min() >= 0 and (mass <= 1 + (hw + 8) * 2.0**-24 + hw * 2.0**-53).all(), name
        assert (q.sum((2, 3)) > 0).all(), name
    if fam.window:  # windowed attention: the query attends within one (possibly shifted) window
        first = maps.query_maps[0]
        assert ((first > 0).sum((2, 3)) <= fam.window**2).all()
        # the whole window lies on the map: the row's N = window^2 weights, within (N + 3) u32 of summing to 1
        n = fam.window**2
        np.testing.assert_allclose(first.astype(np.float64).sum((2, 3)), 1.0, rtol=0,
                                   atol=(n + 3) * 2.0**-24 + first.shape[2] * first.shape[3] * 2.0**-53)
    assert (out / "query_maps_0.png").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fam", FAMILIES, ids=[f.tag.split(".")[0] for f in FAMILIES])
def test_every_command_and_the_report(fam, hub, tmp_path, capsys):
    hub(fam.tag)
    out = {k: tmp_path / k for k in ("probe", "attention", "hessian", "landscape", "robustness")}
    measures = "all" if fam.localization else ",".join(m for m in ALL if m not in ("localization", "gpsa_gates"))
    assert main(["probe", *_common(fam, out["probe"]), "-b", "4", "--max-batches", "1", "--measures", measures]) == 0
    _check_probe(fam, out["probe"])

    if fam.attention:
        assert main(["attention", *_common(fam, out["attention"]), "--num-images", "1"]) == 0
        _check_attention(fam, out["attention"])
    else:
        _one_error_line(capsys, ["attention", *_common(fam, out["attention"]), "--num-images", "1"],
                        "no attention layer")

    loss_runs = {
        "hessian": ["-b", "1", "--batches", "1", "--k", "1", "--max-iter", "1", "--no-progress"],
        "landscape": ["-b", "1", "--batches", "1", "--dims", "1", "--steps", "3", "--no-progress"],
        "robustness": ["-b", "2", "--max-batches", "1", "--split", "val", "--no-progress", "--no-plots", "--eps",
                       "1/255", "--pgd-steps", "1", "--freqs", "0,0.5", "--corruptions", "gaussian_noise",
                       "--severities", "1"],
    }
    if not fam.curvature:  # vector operations over every parameter dominate: ~15 s of CPU for BEiT-B at 32 px
        del loss_runs["hessian"], loss_runs["landscape"]
    for cmd, extra in loss_runs.items():
        if not fam.loss:
            _one_error_line(capsys, [cmd, *_common(fam, out[cmd]), *extra], "no classifier head")
            assert not out[cmd].exists()
            continue
        assert main([cmd, *_common(fam, out[cmd]), *extra]) == 0, cmd
    if fam.loss and fam.curvature:
        assert _all_finite(out["hessian"] / "hessian.json")["n_hvp"] >= 1
        assert _all_finite(out["landscape"] / "landscape.json")
    if fam.loss:
        rob = _all_finite(out["robustness"] / "results.json")
        assert rob["n"] == 2 and {"calibration", "fgsm", "pgd", "frequency", "corruptions"} <= set(rob)

    dirs = [str(p) for p in out.values() if p.exists()]
    html = tmp_path / "report.html"
    assert main(["report", *dirs, "--out", str(html), "--workers", "1"]) == 0
    page = html.read_text()
    assert fam.tag in page and (tmp_path / "figures").is_dir()


def test_cait_at_its_own_size_and_the_img_size_its_loader_cannot_resize(hub, tmp_path, capsys):
    """CaiT's timm loader resizes no position embedding: at another --img-size the one-line error says so (not a
    truncated file); at 224 px the probe and the attention maps run (class attention named not applicable)."""
    fam = Family("cait_xxs24_224.fb_dist_in1k", None, "blocks.0", attention=True)
    hub(fam.tag)
    _one_error_line(capsys, ["probe", *_common(Family(fam.tag, 32, ""), tmp_path / "o")],
                    "does not resize pos_embed", "[1, 196, 192] in the weights", "drop --img-size")
    out = tmp_path / "probe"
    assert main(["probe", *_common(fam, out), "-b", "4", "--max-batches", "1", "--measures",
                 "attention_entropy,cka,ratio_of_norms,fourier"]) == 0
    res, meta = _all_finite(out / "results.json"), json.loads((out / "meta.json").read_text())
    kinds = meta["not_applicable"]["attention_entropy"]  # talking heads and class attention: no entropy over positions
    assert "blocks_token_only.0.attn" in kinds and len(res["attention_entropy"]["rows"]) == 0
    att = ["attention", *_common(fam, tmp_path / "att"), "--num-images", "1"]
    if main(att) == 0:  # maps placed on the image (class attention: the class token's query over the patches)
        maps = load_attention_maps(tmp_path / "att" / "attention.npz")
        assert maps.layers and all(np.isfinite(q).all() for q in maps.query_maps)
    else:  # talking heads mix maps after the softmax, class attention pools: no query map, said in one line
        err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
        assert len(err) == 1 and "no query and key positions" in err[0], err


def test_probe_names_what_does_not_apply_and_refuses_it_when_asked_by_name(tmp_path, capsys):
    """The default measures on a CNN: the attention measures are left out and named; asked for by name, one line
    before any work."""
    base = ["probe", "--model", "test_convnext", "--data", DATA, "--img-size", "32", "--device", "cpu", "-j", "0",
            "-b", "4"]
    _one_error_line(capsys, [*base, "--measures", "cka,attention_entropy", "--out", str(tmp_path / "o")],
                    "measure 'attention_entropy' does not apply to test_convnext", "no attention layer")
    assert not (tmp_path / "o").exists()
    assert main([*base, "--out", str(tmp_path / "d")]) == 0
    meta, res = json.loads((tmp_path / "d" / "meta.json").read_text()), _all_finite(tmp_path / "d" / "results.json")
    assert meta["measures_not_applicable"] == ["attention_distance", "attention_entropy"]
    assert "no attention layer" in meta["not_applicable"]["attention_entropy"]
    assert set(res) == {"cka", "ratio_of_norms", "fourier", "feature_variance"}
