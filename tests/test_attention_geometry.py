"""Pixel geometry of pooled-key and dilated-window attention (capture/geometry.py): mean attention distance and
nonlocality against numpy from explicit pixel positions of every query and key.

Positions are written out independently of capture: a spatially reduced key (PVTv2, Twins-PCPVT: an s x s
stride-s convolution) sits at the centre of the pixels it covers; PVTv2's linear mode pools to 7 x 7 with
PyTorch's adaptive bins [floor(i n / 7), ceil((i + 1) n / 7)); MaxViT's block and grid windows are located by
applying timm's own ``window_partition`` / ``grid_partition`` to a map of pixel centres.
"""
import numpy as np
import pytest
import timm
import torch
from timm.models import maxxvit

import vitscope
from vitscope import measures as M

TINY = dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
U32, U64 = 2.0**-24, 2.0**-53  # unit roundoff of float32 and float64


def _rtol(a) -> float:
    """Library vs numpy on float32 maps a (B', H, Nq, Nk), every term >= 0. The library sums the B' maps in float32
    (B' - 1 roundings a entry, the measures' documented design), then weights them in float64; numpy weights the
    float32 values exactly in float64. Positions are small multiples of 1/2 cell or pixel, so cdist's squares,
    sums and products are exact and sqrt correctly rounded on both sides; the pixel scale and the products add u,
    the sums over Nq Nk terms and the B' Nq means (Nq Nk + B' Nq + 6) u64 a side."""
    b, _, nq, nk = a.shape
    return (b - 1) * U32 + 2 * (nq * nk + b * nq + 6) * U64


def _centres(n: int, px: float) -> np.ndarray:  # pixel centres of n cells of px pixels
    return (np.arange(n) + 0.5) * px


def _grid_points(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:  # row-major (len(rows) * len(cols), 2)
    return np.stack(np.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)


def _pooled_positions(model, info, side):
    """Query and key pixel positions of a PVTv2 / Twins GSA map, from the module's reduction."""
    h, w = info.grid
    px = side / h
    q = _grid_points(_centres(h, px), _centres(w, px))
    attn = model.get_submodule(info.name)
    pool = getattr(attn, "pool", None)
    if pool is not None:  # PVTv2 linear: adaptive average pooling to 7 x 7
        o = 7
        starts = np.floor(np.arange(o) * h / o)
        ends = np.ceil((np.arange(o) + 1) * h / o)
        k1 = (starts + ends) / 2 * px
        return q, _grid_points(k1, k1)
    s = attn.sr.stride[0]  # s x s stride-s convolution: key i covers pixels [i s px, (i + 1) s px)
    k1 = (np.arange(h // s) * s + s / 2) * px
    return q, _grid_points(k1, k1)


def _numpy_distance(attn: np.ndarray, q: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Per head: mean over maps and queries of sum_j A_ij |q_i - k_j| (pixels). attn (B, H, Nq, Nk)."""
    d = np.sqrt(((q[:, None, :] - k[None, :, :]) ** 2).sum(-1))  # (Nq, Nk)
    return (attn * d).sum(-1).mean(axis=(0, 2))


@pytest.mark.parametrize("name,kwargs", [("pvt_v2_b0", TINY), ("pvt_v2_b0", {**TINY, "linear": True}),
                                         ("twins_pcpvt_small", TINY)], ids=["pvt_sr", "pvt_linear", "twins_gsa"])
def test_pooled_key_distance_equals_numpy_from_pixel_positions(name, kwargs):
    torch.manual_seed(0)
    side = 64
    model = timm.create_model(name, **kwargs).eval()
    with torch.no_grad(), vitscope.capture(model, residual=False, branches=False) as cap:
        model(torch.randn(2, 3, side, side))
    pooled = [i for i, info in enumerate(cap.attention_layout) if info.kind == "pooled"]
    assert len(pooled) >= 2 and all(cap.attention_layout[i].has_key_positions for i in pooled)
    dist = M.AttentionDistance(num_prefix_tokens=0)
    dist.update([cap.attentions[i] for i in pooled], [cap.attention_layout[i] for i in pooled])
    nonloc = M.Nonlocality()
    nonloc.update([cap.attentions[i] for i in pooled], [cap.attention_layout[i] for i in pooled])
    for i, got, got_nl in zip(pooled, dist.compute(), nonloc.compute()):
        info, a = cap.attention_layout[i], cap.attentions[i].double().numpy()
        q, k = _pooled_positions(model, info, side)
        want = _numpy_distance(a, q, k)
        np.testing.assert_allclose(got.numpy(), want, rtol=_rtol(a), atol=0)
        px = side / info.grid[0]  # nonlocality: the distance of the batch-mean map in cells (patch units)
        np.testing.assert_allclose(got_nl.numpy(), _numpy_distance(a.mean(0, keepdims=True), q, k) / px,
                                   rtol=_rtol(a) + 2 * U64, atol=0)


def test_maxvit_block_and_grid_windows_distance_equals_numpy_from_timm_partitions():
    torch.manual_seed(0)
    side, B = 64, 2
    model = timm.create_model("test_maxvit", img_size=side).eval()
    with torch.no_grad(), vitscope.capture(model, residual=False, branches=False) as cap:
        model(torch.randn(B, 3, side, side))
    checked = {"block": 0, "grid": 0}
    dist = M.AttentionDistance(num_prefix_tokens=0)
    dist.update(cap.attentions, cap.attention_layout)
    for a, info, got in zip(cap.attentions, cap.attention_layout, dist.compute()):
        part = model.get_submodule(info.name.rpartition(".")[0])
        windows = a.shape[0] // B
        if windows == 1:
            continue  # one window per image: the whole map, a plain token grid
        g = part.partition_size
        H = W = int(round((windows * g[0] * g[1]) ** 0.5))  # the map the windows tile
        px = side / H
        centres = torch.from_numpy(_grid_points(_centres(H, px), _centres(W, px))).view(1, H, W, 2)
        fn = maxxvit.window_partition if part.partition_block else maxxvit.grid_partition
        pos = fn(centres, g).reshape(windows, g[0] * g[1], 2).numpy()  # (windows, tokens, 2) pixel centres
        rtol = _rtol(a)
        a = a.double().numpy().reshape(B, windows, *a.shape[1:])  # (B, windows, heads, n, n)
        d = np.sqrt(((pos[:, :, None] - pos[:, None, :]) ** 2).sum(-1))  # (windows, n, n)
        want = (a * d[None, :, None]).sum(-1).mean(axis=(0, 1, 3))  # (heads,)
        np.testing.assert_allclose(got.numpy(), want, rtol=rtol, atol=0)
        checked["block" if part.partition_block else "grid"] += 1
    assert checked["block"] >= 2 and checked["grid"] >= 2


def test_mobilevit_unfolded_attention_distance_equals_numpy():
    """MobileViT's transformer runs on the map unfolded into p x p patches: token (i, j) of the sequence for patch
    pixel (u, v) is map cell (i p + u, j p + v), so a sequence's tokens lie p cells apart."""
    torch.manual_seed(0)
    side, B = 64, 2
    model = timm.create_model("mobilevit_xxs").eval()
    with torch.no_grad(), vitscope.capture(model, residual=False, branches=False) as cap:
        model(torch.randn(B, 3, side, side))
    dist = M.AttentionDistance(num_prefix_tokens=0)
    dist.update(cap.attentions, cap.attention_layout)
    assert len(cap.attentions) >= 3
    for a, info, got in zip(cap.attentions, cap.attention_layout, dist.compute()):
        blk = model.get_submodule(info.name.split(".transformer.")[0])
        p = blk.patch_size[0]
        n = int(round(a.shape[-1] ** 0.5))  # patches per side
        px = side / (n * p)  # pixels per map cell
        pos = np.array([[(i * p + u + 0.5) * px, (j * p + v + 0.5) * px] for i in range(n) for j in range(n)
                        for u in [0] for v in [0]])  # one sequence's tokens; the (u, v) offset cancels
        want = _numpy_distance(a.double().numpy(), pos, pos)
        np.testing.assert_allclose(got.numpy(), want, rtol=_rtol(a), atol=0)


def test_pit_token_grids_distance_equals_numpy_from_conv_receptive_centres():
    """PiT's 16 px patches at stride 8 give grids whose side does not divide the image; a token's pixel centre is
    the centre of its receptive field through the patch convolution and each stage's pooling convolution."""
    torch.manual_seed(0)
    side = 64
    model = timm.create_model("pit_ti_224", img_size=side).eval()
    with torch.no_grad(), vitscope.capture(model, residual=False, branches=False) as cap:
        model(torch.randn(2, 3, side, side))
    assert all(i.has_positions for i in cap.attention_layout)
    dist = M.AttentionDistance()
    dist.update(cap.attentions, cap.attention_layout)

    def conv_centre(conv, centre_in):  # output index -> centre, through one convolution (per axis)
        k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
        return lambda i: centre_in(i * s - p + (k - 1) / 2)

    centres = {0: conv_centre(model.patch_embed.conv, lambda x: x + 0.5)}  # pixel x covers [x, x + 1)
    for k in (1, 2):
        centres[k] = conv_centre(model.transformers[k].pool.conv, centres[k - 1])
    for a, info, got in zip(cap.attentions, cap.attention_layout, dist.compute()):
        stage = int(info.name.split(".")[1])
        h = info.grid[0]
        c = np.array([centres[stage](i) for i in range(h)])
        pos = _grid_points(c, c)
        p = info.num_prefix_tokens
        want = _numpy_distance(a.double().numpy()[:, :, p:, p:], pos, pos)  # class token dropped, no renormalizing
        np.testing.assert_allclose(got.numpy(), want, rtol=_rtol(a[:, :, p:, p:]), atol=0)


def test_hiera_tokens_claim_no_grid_and_spatial_measures_name_them():
    """Hiera's tokens are unrolled by mask unit, not row-major: capture claims no grid for them, and Fourier and
    feature variance name those layers not applicable (CKA, which flattens, still runs)."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = timm.create_model("hiera_tiny_224", embed_dim=16, num_heads=1, stages=(1, 2, 1, 1), img_size=64).eval()
    with torch.no_grad(), vitscope.capture(model) as cap:
        model(torch.randn(2, 3, 64, 64))
    assert cap.records and all(r.info.grid is None for r in cap.records if r.z_out.ndim == 3)
    ds = TensorDataset(torch.randn(4, 3, 64, 64), torch.zeros(4, dtype=torch.long))
    res = vitscope.probe(model, DataLoader(ds, batch_size=4), ["cka", "fourier"], progress=False)
    assert res["cka"] and not res["fourier"]
    assert set(res.meta["not_applicable"]["fourier"]) >= {r.info.name for r in cap.records if r.info.kind != "stem"}


def _twins_windows(t: torch.Tensor, ws: int) -> torch.Tensor:
    """(1, H, W, C) -> (windows, ws * ws, C): Twins' own LocallyGroupedAttn partition (pad bottom and right,
    then reshape/transpose), written out here from timm's forward."""
    _, H, W, C = t.shape
    t = torch.nn.functional.pad(t, (0, 0, 0, -W % ws, 0, -H % ws), value=-1.0)  # -1: a padding position
    _, Hp, Wp, _ = t.shape
    t = t.reshape(1, Hp // ws, ws, Wp // ws, ws, C).transpose(2, 3)
    return t.reshape(Hp // ws * (Wp // ws), ws * ws, C)


def test_twins_local_windows_that_do_not_tile_the_map():
    """Twins' locally-grouped attention (maps (B, windows, heads, n, n), windows padded at the bottom and right on a
    14 x 14 and a 7 x 7 map with 4 x 4 windows): capture records timm's own maps as (B windows, heads, n, n) with the
    token map's stride; the distance equals numpy's over the windows' pixel centres (padding positions where Twins
    puts them), and the query maps place each row where Twins' partition puts its keys."""
    from timm.models.twins import LocallyGroupedAttn, Twins
    from timm.utils import AttentionExtract

    torch.manual_seed(0)
    side, B = 56, 2
    model = Twins(img_size=side, patch_size=4, num_classes=3, embed_dims=(16, 32), num_heads=(1, 2),
                  mlp_ratios=(2, 2), depths=(2, 2), sr_ratios=(2, 1), wss=(4, 4)).eval()
    x = torch.randn(B, 3, side, side)
    with torch.no_grad(), vitscope.capture(model, residual=False, branches=False) as cap:
        model(x)
    with torch.no_grad(), vitscope.explicit_attention(model):
        timm_maps = AttentionExtract(model, method="hook")(x)
    maps = vitscope.attention_maps(model, x, query=(5, 9), embeddings=False)
    dist = M.AttentionDistance(num_prefix_tokens=0)
    dist.update(cap.attentions, cap.attention_layout)
    local = [i for i, info in enumerate(cap.attention_layout)
             if isinstance(model.get_submodule(info.name), LocallyGroupedAttn)]
    assert len(local) == 2
    for i, got in zip(range(len(cap.attentions)), dist.compute()):
        if i not in local:
            continue
        a, info = cap.attentions[i], cap.attention_layout[i]
        ws = model.get_submodule(info.name).ws
        H = side // info.patch_size
        assert (info.kind, info.grid, info.patch_size) == ("msa", (ws, ws), 4 * 2 ** local.index(i)) and H % ws
        ref = timm_maps[info.name + ".attn_drop"]  # (B, windows, heads, n, n)
        assert torch.equal(a, ref.flatten(0, 1))  # the same tensor, windows row-major per image
        # pixel centres of the map padded to Hp: padding cells continue the grid (Twins attends to them there)
        px, Hp = side / H, -(-H // ws) * ws
        padded = torch.from_numpy(_grid_points(_centres(Hp, px), _centres(Hp, px))).view(1, Hp, Hp, 2)
        pos = _twins_windows(padded, ws).numpy()  # (windows, n, 2)
        n_win = pos.shape[0]
        d = np.sqrt(((pos[:, :, None] - pos[:, None, :]) ** 2).sum(-1))  # (windows, n, n)
        a32 = a.numpy().reshape(B, n_win, *a.shape[1:])  # (B, windows, heads, n, n)
        want = (a32.astype(np.float64) * d[None, :, None]).sum(-1).mean(axis=(0, 1, 3))  # (heads,)
        np.testing.assert_allclose(got.numpy(), want, rtol=_rtol(a), atol=0)
        # query maps: the query's row, each key placed at the map cell Twins' partition gives it
        m = maps.query_maps[maps.layers.index(info.name)]  # (B, heads, H, W)
        r0, c0 = maps.query_cells[maps.layers.index(info.name)]
        coords = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(H), indexing="ij"), -1)[None].double()
        cells = _twins_windows(coords, ws).long()  # (windows, n, 2) map cells, -1 padding
        win, q = map(int, (cells == torch.tensor([r0, c0])).all(-1).nonzero()[0])
        want_map = np.zeros(m.shape, dtype=np.float32)
        for k, (r, c) in enumerate(cells[win].tolist()):
            if r >= 0:
                want_map[:, :, r, c] = a32[:, win, :, q, k]
        np.testing.assert_array_equal(m, want_map)  # the captured float32 entries moved, none computed
