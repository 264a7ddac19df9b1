"""Attention on images: ``vitscope.attention_maps`` against the captured maps and independent references,
the .npz round trip, the figures and ``vitscope attention``."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import vitscope
from vitscope.cli import main as cli_main
from vitscope.measures import attention_rollout
from vitscope.probing.attention_images import load_attention_maps

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _images(n=3, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _captured(model, x):
    model.eval()
    with torch.no_grad(), vitscope.capture(model, residual=False, branches=False) as cap:
        model(x)
    return cap


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return vitscope.create_model("test_vit_cb").eval()


@pytest.fixture(scope="module")
def convit():
    torch.manual_seed(0)
    model = vitscope.create_model("test_convit_32").eval()
    with torch.no_grad():  # gates away from their init, different per head and layer
        for i, m in enumerate(model.modules()):
            if hasattr(m, "gating_param"):
                m.gating_param.copy_(torch.linspace(-2, 2, m.gating_param.numel()) + 0.1 * i)
    return model


def test_vit_rollout_and_query_maps_match_capture(vit):
    x = _images()
    maps = vitscope.attention_maps(vit, x, query=(1, 2))
    cap = _captured(vit, x)
    ref = attention_rollout(cap.attentions)[:, 0, 1:].reshape(3, 4, 4)  # class token row, patch columns
    # the same float32 maps (same batch), the same float64 rollout, kept in float32: the same bits
    np.testing.assert_array_equal(maps.rollout, ref.float().numpy())
    assert maps.rollout_source == "class token"
    assert maps.query_grid == (4, 4) and maps.query == (1, 2)
    for a, m, cell in zip(cap.attentions, maps.query_maps, maps.query_cells):
        assert cell == (1, 2)
        np.testing.assert_array_equal(m, a[:, :, 1 + 1 * 4 + 2, 1:].reshape(3, -1, 4, 4).numpy())
    assert maps.query_box == (8.0, 16.0, 16.0, 24.0)  # 8-pixel patches: rows 8..16, columns 16..24
    assert maps.gpsa_gates is None and maps.gpsa_positional is None


def test_maps_do_not_depend_on_the_batch(vit):
    """Each image's maps are its own: replacing one image of the batch leaves the others' maps unchanged, bit for
    bit (the same operations on tensors of the same shapes; splitting the batch instead would change float32
    rounding by amounts no a-priori bound covers)."""
    x = _images(5)
    whole = vitscope.attention_maps(vit, x, embeddings=False)
    other = x.clone()
    other[0] = -x[0]
    swapped = vitscope.attention_maps(vit, other, embeddings=False)
    assert not np.array_equal(swapped.rollout[0], whole.rollout[0])
    np.testing.assert_array_equal(swapped.rollout[1:], whole.rollout[1:])
    for i in range(len(whole.query_maps)):
        np.testing.assert_array_equal(swapped.query_maps[i][1:], whole.query_maps[i][1:])


def test_registers_and_a_non_square_dynamic_size():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2,
                              dynamic_img_size=True, reg_tokens=2).eval()
    x = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(1))
    maps = vitscope.attention_maps(model, x)
    cap = _captured(model, x)
    assert maps.query_grid == (6, 8) and maps.query == (3, 4)  # the centre of a 6 x 8 patch grid
    ref = attention_rollout(cap.attentions)[:, 0, 3:].reshape(2, 6, 8)  # class + 2 registers before the patches
    # the same forward (eval, no grad, the same capture) gives the same attention bits, and attention_maps reads
    # them with the same attention_rollout and slicing: equal exactly once the reference is stored as the maps are
    np.testing.assert_array_equal(maps.rollout, ref.numpy().astype(maps.rollout.dtype))
    query = cap.attentions[1][:, :, 3 + 3 * 8 + 4, 3:].reshape(2, 2, 6, 8).numpy()
    np.testing.assert_array_equal(maps.query_maps[1], query.astype(maps.query_maps[1].dtype))
    assert maps.position_grid == (4, 4)  # position embeddings stay on the 32 px grid they were built for


def test_pooled_vit_uses_the_mean_over_patch_queries():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2,
                              class_token=False, global_pool="avg").eval()
    x = _images(2)
    maps = vitscope.attention_maps(model, x, discard_ratio=0.2, head_fusion="max")
    cap = _captured(model, x)
    R = attention_rollout(cap.attentions, head_fusion="max", discard_ratio=0.2)  # (B, 16, 16), no prefix
    np.testing.assert_array_equal(maps.rollout, R.mean(1).reshape(2, 4, 4).float().numpy())  # same bits, float32
    assert maps.rollout_source == "mean over patch queries"
    # rows of the float64 rollout sum to 1 (to 2^-53 per term); stored in float32 (2^-24 each) and summed over 16
    # cells in float32 (15 roundings of a sum <= 1)
    np.testing.assert_allclose(maps.rollout.sum((1, 2)), 1.0, rtol=0, atol=(1 + 15) * 2.0**-24 + 16 * 2.0**-53)


def test_convit_rollout_composes_mhsa_class_row_with_gpsa_rollout(convit):
    x = _images(2)
    maps = vitscope.attention_maps(convit, x)
    cap = _captured(convit, x)
    kinds = [i.kind for i in cap.attention_layout]
    gpsa = [a for a, k in zip(cap.attentions, kinds) if k == "gpsa"]
    mhsa = [a for a, k in zip(cap.attentions, kinds) if k == "msa"]
    assert gpsa and mhsa and gpsa[0].shape[-1] == 64 and mhsa[0].shape[-1] == 65
    cls = attention_rollout(mhsa)[:, 0, 1:]  # (B, 64)
    ref = torch.einsum("bn,bnm->bm", cls, attention_rollout(gpsa)).reshape(2, 8, 8)
    # float64 einsum vs the library's matmul over 64 terms >= 0 (64 2^-53 relative), then stored in float32 (2^-24)
    np.testing.assert_allclose(maps.rollout, ref.numpy(), rtol=2.0**-24 + 64 * 2.0**-53, atol=0)
    assert "through the GPSA rollout" in maps.rollout_source
    assert maps.kinds == kinds


def test_convit_gates_and_positional_maps_against_a_numpy_reference(convit):
    x = _images(1)
    maps = vitscope.attention_maps(convit, x, query=(2, 5))
    layers = [m for m in convit.modules() if hasattr(m, "gating_param")]
    gates = np.stack([1 / (1 + np.exp(-m.gating_param.detach().numpy())) for m in layers])
    np.testing.assert_allclose(maps.gpsa_gates, gates, rtol=4 * 2.0**-24)  # float32 sigmoid: exp 2u, +, / u each
    rows, cols = np.divmod(np.arange(64), 8)
    dx, dy = cols - 5, rows - 2  # key minus query (column, row), GPSA's r = [dx, dy, dx^2 + dy^2]
    for layer, pos in zip(layers, maps.gpsa_positional):
        w = layer.pos_proj.weight.detach().double().numpy()
        b = layer.pos_proj.bias.detach().double().numpy()
        logits = w[:, :1] * dx + w[:, 1:2] * dy + w[:, 2:] * (dx**2 + dy**2) + b[:, None]  # (heads, 64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        ref = p / p.sum(1, keepdims=True)
        # float32: each logit a sum of 4 terms (<= 4u of their magnitudes), the shift by the max (u of the range),
        # so ln p moves by <= 2 delta; then exp (2u), the sum of 64 terms (63u) and the division (u)
        u = 2.0**-24
        mag = np.abs(w[:, :1] * dx) + np.abs(w[:, 1:2] * dy) + np.abs(w[:, 2:] * (dx**2 + dy**2)) + np.abs(b[:, None])
        delta = 4 * u * mag.max(1, keepdims=True) + u * np.ptp(logits, axis=1, keepdims=True)
        assert (np.abs(pos.reshape(len(w), 64) - ref) <= ref * (2 * delta + (64 + 3) * u)).all()


def test_convit_positional_map_is_the_attention_when_the_gate_is_one():
    torch.manual_seed(1)
    model = vitscope.create_model("test_convit_32").eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gating_param"):
                m.gating_param.fill_(40.0)  # sigmoid = 1 - 4e-18: purely positional
    maps = vitscope.attention_maps(model, _images(2))
    for i, kind in enumerate(maps.kinds):
        if kind == "gpsa":
            # float32 sigmoid(40) is 1.0, so GPSA's map is the positional softmax divided by its row sum (64 terms
            # summing to 1 within 63u, and the division: (64 + 1) u relative)
            np.testing.assert_allclose(maps.query_maps[i], np.broadcast_to(maps.gpsa_positional[i], (2,) +
                                       maps.gpsa_positional[i].shape), rtol=(64 + 1) * 2.0**-24, atol=0)


def test_windowed_attention_query_maps():
    torch.manual_seed(0)
    model = vitscope.create_model("test_alternet").eval()
    x = _images(2)
    maps = vitscope.attention_maps(model, x)
    cap = _captured(model, x)
    assert maps.rollout is None and "windowed" in maps.rollout_source
    assert maps.patch_components is None and maps.position_similarity is None
    for a, info, m, (r, c) in zip(cap.attentions, cap.attention_layout, maps.query_maps, maps.query_cells):
        ws = info.grid[0]
        H, W = m.shape[-2:]
        assert (H, W) == (32 // info.patch_size, 32 // info.patch_size)
        windows = a.reshape(2, H // ws, W // ws, a.shape[1], ws * ws, ws * ws)  # row-major windows
        win = windows[:, r // ws, c // ws, :, (r % ws) * ws + c % ws]
        block = m[:, :, r // ws * ws:(r // ws + 1) * ws, c // ws * ws:(c // ws + 1) * ws]
        np.testing.assert_array_equal(block.reshape(win.shape), win.numpy())
        # zero outside the query's window; a float32 softmax row of n = ws^2 entries is within (n + 3) u of its
        # exact value entrywise (relative), and their float32 sum adds (n - 1) u
        np.testing.assert_allclose(m.sum((2, 3)), 1.0, rtol=0, atol=(2 * ws * ws + 2) * 2.0**-24)


def test_images_denormalised_and_errors(vit):
    x = _images(2)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    maps = vitscope.attention_maps(vit, x, mean=mean, std=std, embeddings=False)
    scaled = np.abs(x.numpy()) * np.array(std)[:, None, None] + np.array(mean)[:, None, None]
    ref = (x.numpy() * np.array(std)[:, None, None] + np.array(mean)[:, None, None]).clip(0, 1).transpose(0, 2, 3, 1)
    # float32 x * s + m: two roundings (u = 2^-24 of |x s| + |m| at most each); clipping cannot widen the gap
    np.testing.assert_allclose(maps.images, ref, rtol=0, atol=2 * 2.0**-24 * scaled.max())
    with pytest.raises(ValueError, match="outside the 4x4 patch grid"):
        vitscope.attention_maps(vit, x, query=(4, 0))
    with pytest.raises(ValueError, match="no attention layer"):
        vitscope.attention_maps(vitscope.create_model("test_resnet_cifar"), x)


def test_npz_round_trip_and_figures(convit, tmp_path):
    from vitscope.reports.image_figures import save_attention_figures

    maps = vitscope.attention_maps(convit, _images(2))
    maps.meta = {"model_name": "test_convit_32", "labels": ["a", "b"]}
    path = maps.save(tmp_path / "attention.npz")
    back = load_attention_maps(path)
    for key in ("images", "rollout", "gpsa_gates", "gpsa_positional", "patch_components", "patch_explained",
                "position_similarity"):
        # stored as float32: exactly the float32 values
        np.testing.assert_array_equal(getattr(back, key), np.asarray(getattr(maps, key)).astype(np.float32), key)
    for a, b in zip(back.query_maps, maps.query_maps):  # float32 maps stored as float32: the same values
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert (back.query, back.query_grid, back.layers, back.kinds, back.query_cells, back.rollout_source, back.meta,
            back.position_grid) == (maps.query, maps.query_grid, maps.layers, maps.kinds, maps.query_cells,
                                    maps.rollout_source, maps.meta, maps.position_grid)
    pngs = save_attention_figures(back, tmp_path / "png")
    assert sorted(p.name for p in pngs) == sorted(["rollout.png", "query_maps_0.png", "query_maps_1.png", "gpsa.png",
                                                   "patch_embedding.png", "position_embedding.png"])
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in pngs)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable attention"):
        load_attention_maps(tmp_path / "bad.npz")


def test_cli_writes_png_and_npz(tmp_path, capsys):
    out = tmp_path / "att"
    rc = cli_main(["attention", "--model", "test_vit_cb", "--data", "fake", "--num-images", "2", "--query", "0,3",
                   "--device", "cpu", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    maps = load_attention_maps(out / "attention.npz")
    heads = vitscope.create_model("test_vit_cb").blocks[0].attn.num_heads
    assert maps.images.shape == (2, 32, 32, 3) and maps.rollout.shape == (2, 4, 4)
    assert [m.shape for m in maps.query_maps] == [(2, heads, 4, 4)] * 2 and maps.query == (0, 3)
    assert maps.position_similarity.shape == (16, 16) and maps.patch_components.shape[1:] == (3, 8, 8)
    assert maps.meta["model_name"] == "test_vit_cb" and len(maps.meta["labels"]) == 2
    for name in ("rollout", "query_maps_0", "query_maps_1", "patch_embedding", "position_embedding"):
        assert (out / f"{name}.png").read_bytes().startswith(PNG_MAGIC), name


def test_cli_image_folder_and_errors(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((40, 50, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "att"
    assert cli_main(["attention", "--model", "test_convit_32", "--images", str(folder), "--num-images", "5",
                     "--device", "cpu", "--out", str(out)]) == 0
    maps = load_attention_maps(out / "attention.npz")
    assert maps.images.shape == (3, 32, 32, 3) and maps.meta["labels"] == ["0.png", "1.png", "2.png"]
    assert (out / "gpsa.png").read_bytes().startswith(PNG_MAGIC)
    capsys.readouterr()
    assert cli_main(["attention", "--model", "test_resnet_cifar", "--data", "fake", "--out", str(tmp_path / "r")]) == 2
    assert "no attention layer" in capsys.readouterr().err
    assert cli_main(["attention", "--model", "test_vit_cb", "--out", str(tmp_path / "r")]) == 2
    assert "exactly one of --data" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_report_shows_attention_on_images(tmp_path):
    """An attention-only output directory (the CLI's) gets a section with the image figures; the CSVs are the
    .npz arrays; a probe directory of the same model and weights shares that section."""
    import csv

    from vitscope.reports import build_report

    att, vit = tmp_path / "convit", tmp_path / "vit"
    for name, out in (("test_convit_32", att), ("test_vit_cb", vit)):  # what vitscope attention writes
        torch.manual_seed(0)
        maps = vitscope.attention_maps(vitscope.create_model(name, num_classes=10), _images(2))
        maps.meta = {"model_name": name, "model": name, "checkpoint": None, "labels": ["a", "b"]}
        maps.save(out / "attention.npz")
    # the ViT's probe output in the same directory: one section with both
    torch.manual_seed(0)
    model = vitscope.create_model("test_vit_cb", num_classes=10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_images(4), torch.zeros(4, dtype=torch.long)),
                                         batch_size=4)
    result = vitscope.probe(model, loader, ["attention_entropy"], progress=False)
    result.meta.update(model_name="test_vit_cb")
    result.save(vit)
    page = build_report([att, vit], tmp_path / "report.html").read_text()
    fig = tmp_path / "figures"
    convit_keys = ["patch_embedding_components", "position_embedding_similarity", "attention_rollout",
                   "attention_query_maps", "gpsa_positional"]
    for key in convit_keys:
        assert f'id="test-convit-32--{key}"' in page, key
        assert (fig / "test-convit-32" / f"{key}.png").read_bytes().startswith(PNG_MAGIC)
    for key in ["attention_entropy", *convit_keys[:4]]:
        assert f'id="test-vit-cb--{key}"' in page, key
    assert 'id="test-vit-cb--gpsa_positional"' not in page
    assert "ViT Fig. 7 centre" in page and "ViT Fig. 6" in page and "CONVIT Fig. 5" in page

    def rows(section, key):
        with open(fig / section / f"{key}.csv", newline="") as f:
            return list(csv.DictReader(f))

    maps = load_attention_maps(att / "attention.npz")
    roll = rows("test-convit-32", "attention_rollout")
    np.testing.assert_array_equal(np.array([float(r["value"]) for r in roll]).reshape(maps.rollout.shape),
                                  maps.rollout)
    sim = rows("test-convit-32", "position_embedding_similarity")
    np.testing.assert_array_equal(np.array([float(r["value"]) for r in sim]).reshape(64, 64),
                                  maps.position_similarity)
    assert (int(sim[9]["position"]), int(sim[9]["row"]), int(sim[9]["col"])) == (0, 1, 1)
    q = rows("test-convit-32", "attention_query_maps")
    first = [float(r["value"]) for r in q if r["layer"] == maps.layers[0] and r["image"] == "1" and r["head"] == "2"]
    np.testing.assert_array_equal(np.array(first).reshape(8, 8), maps.query_maps[0][1, 2])
    gates = {(r["layer"], int(r["head"])): float(r["gate"]) for r in rows("test-convit-32", "gpsa_positional")}
    assert [gates[(maps.gpsa_layers[i], h)] for i in range(len(maps.gpsa_layers)) for h in range(4)] == \
        maps.gpsa_gates.ravel().tolist()
    pc = rows("test-convit-32", "patch_embedding_components")
    np.testing.assert_array_equal(np.array([float(r["value"]) for r in pc]).reshape(maps.patch_components.shape),
                                  maps.patch_components)


def test_report_names_a_bad_attention_file(tmp_path):
    from vitscope.reports import ReportInputError, build_report

    d = tmp_path / "att"
    d.mkdir()
    (d / "attention.npz").write_bytes(b"PK\x03\x04 torn")
    with pytest.raises(ReportInputError, match="attention.npz"):
        build_report([d], tmp_path / "r.html")
    np.savez(d / "attention.npz", images=np.zeros((1, 8, 8, 3)))  # a .npz, but not of vitscope attention
    with pytest.raises(ReportInputError, match=r"lacks \['query'"):
        build_report([d], tmp_path / "r.html")


def test_swin_windows_that_do_not_tile_the_map():
    """Swin pads a map its windows do not tile (10 x 10 and 5 x 5 maps, 4 x 4 windows): the query maps follow timm's
    own roll, pad and window_partition of a map of cell coordinates, and capture's stride is timm's reduction."""
    from timm.models.swin_transformer import SwinTransformer, window_partition

    torch.manual_seed(0)
    model = SwinTransformer(img_size=40, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 2), window_size=4,
                            num_classes=3).eval()
    x = _images(2, size=40)
    maps = vitscope.attention_maps(model, x, query=(3, 4))
    cap = _captured(model, x)
    reductions = {f"layers.{i}": f["reduction"] for i, f in enumerate(model.feature_info)}
    assert len(maps.query_maps) == 4 and [info.window_shift for info in cap.attention_layout] == [(0, 0), (2, 2)] * 2
    for a, info, m, (r0, c0) in zip(cap.attentions, cap.attention_layout, maps.query_maps, maps.query_cells):
        assert info.patch_size == reductions[info.name.rsplit(".blocks", 1)[0]]
        H, W = m.shape[-2:]
        ws, (sy, sx) = info.grid[0], info.window_shift
        assert (H, W) == (40 // info.patch_size,) * 2 and H % ws  # the windows do not tile the map
        coords = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij"), -1)[None]  # (1, H, W, 2)
        coords = torch.roll(coords, shifts=(-sy, -sx), dims=(1, 2))
        coords = torch.nn.functional.pad(coords, (0, 0, 0, -W % ws, 0, -H % ws), value=-1)  # timm pads after rolling
        coords = window_partition(coords, (ws, ws)).reshape(-1, ws * ws, 2)  # (windows, n, 2); -1: padding
        win, local = map(int, ((coords == torch.tensor([r0, c0])).all(-1)).nonzero()[0])
        want = np.zeros(m.shape, dtype=np.float32)  # (B, heads, H, W)
        per_image = a.reshape(2, coords.shape[0], *a.shape[1:])  # (B, windows, heads, n, n)
        for k, (r, c) in enumerate(coords[win].tolist()):
            if r >= 0 and c >= 0:
                want[:, :, r, c] = per_image[:, win, :, local, k].numpy()
        np.testing.assert_array_equal(m, want)  # the same float32 entries moved, none computed
