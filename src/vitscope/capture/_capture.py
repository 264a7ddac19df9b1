"""One capture API for attention maps and residual streams of ViTs, ConViTs, ResNets and AlterNets.

Hooks only observe (they return nothing), so tapping never changes the model's output; they are
removed on exit, also after an exception. Fused attention (``scaled_dot_product_attention``) never
materialises the attention map, so it is switched to timm's explicit path while capturing and restored
afterwards (METHODS.md, "Attention maps"). For ConViT's GPSA the gated, renormalised map is captured.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from vitscope.capture._layout import LayerInfo, first_tensor
from vitscope.capture._table_hooks import install_table
from vitscope.capture.geometry import (
    UNROLLED_TOKENS,
    WINDOW_GROUPS,
    dilated_coords,
    reduced_key_coords,
    window_step,
)
from vitscope.capture.sites import BlockSite, attention_kind, final_activation, find_blocks, stage_reductions
from vitscope.capture.table import sublayers, submodule


@contextlib.contextmanager
def explicit_attention(model: nn.Module) -> Iterator[nn.Module]:
    """Switch every module with a ``fused_attn`` flag to the explicit attention path; restore on exit.

    Needed to capture attention maps and for double backward (Hessian-vector products).
    """
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    try:
        for m, _ in saved:
            m.fused_attn = False
        yield model
    finally:
        for m, flag in saved:
            m.fused_attn = flag


@dataclass
class SubLayerRecord:
    """The stream around one sub-layer or block: ``z_out = shortcut + branch`` (+ activation for ResNets).

    A smoothing layer has no skip path: its shortcut is ``z_in`` and its branch ``z_out - z_in``. A record that
    is not ``x + f(x)`` (the stem, whose ``z_in`` is the image; a block vitscope cannot split) has ``branch``
    and ``shortcut`` None, so no ratio of norms, lesion or skip removal is ever computed on it. Tensors are
    tokens (B, N, D) or maps (B, C, H, W): channels-last blocks (Swin) are given channels-first (a view)."""

    info: LayerInfo
    z_in: torch.Tensor
    branch: torch.Tensor | None
    shortcut: torch.Tensor | None
    z_out: torch.Tensor

    @property
    def residual(self) -> bool:
        """Whether the record splits as ``z_out = shortcut + branch``."""
        return self.branch is not None


@dataclass
class Capture:
    """What one ``vitscope.capture`` context recorded; every forward inside the context appends."""

    attentions: list[torch.Tensor] = field(default_factory=list)
    attention_layout: list[LayerInfo] = field(default_factory=list)
    records: list[SubLayerRecord] = field(default_factory=list)

    @property
    def residual_records(self) -> list[SubLayerRecord]:
        """The records that split as ``z_out = shortcut + branch`` (every record but the stem and the blocks
        vitscope cannot split), depth order."""
        return [r for r in self.records if r.branch is not None]

    @property
    def residuals(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(stream entering, stream leaving) per residual sub-layer, depth order."""
        return [(r.z_in, r.z_out) for r in self.residual_records]

    @property
    def branches(self) -> list[torch.Tensor]:
        """Each residual sub-layer's branch output f(z), aligned with ``residuals``."""
        return [r.branch for r in self.residual_records]

    @property
    def shortcuts(self) -> list[torch.Tensor]:
        """Each residual sub-layer's skip-path output: z itself, or downsample(z) in a ResNet block."""
        return [r.shortcut for r in self.residual_records]

    @property
    def layout(self) -> list[LayerInfo]:
        """LayerInfo per residual sub-layer, aligned with ``residuals`` and ``branches``."""
        return [r.info for r in self.residual_records]

    @property
    def outputs(self) -> list[torch.Tensor]:
        """The representation after every recorded layer (stem first, then each sub-layer or block), in forward
        order: the layers of CKA, Fourier and variance."""
        return [r.z_out for r in self.records]

    @property
    def output_layout(self) -> list[LayerInfo]:
        """LayerInfo per entry of ``outputs`` (names are module paths; ``stem`` for the stem)."""
        return [r.info for r in self.records]

    def clear(self) -> None:
        """Drop everything recorded so far (e.g. between batches)."""
        self.attentions.clear()
        self.attention_layout.clear()
        self.records.clear()


def _name_filter(names: str | Sequence[str] | Callable[[str], bool] | None) -> Callable[[str], bool]:
    if names is None:
        return lambda _: True
    if callable(names):
        return names
    patterns = [names] if isinstance(names, str) else list(names)
    return lambda n: any(fnmatch.fnmatchcase(n, p) for p in patterns)


def _patch_size(model: nn.Module) -> tuple[int, int] | None:
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        return None
    return (ps, ps) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))


LAYERS = ("sublayers", "blocks")


def _channels_last(t: torch.Tensor, image_hw: tuple[int, int] | None) -> bool:
    """Whether a 4-D activation is (B, H, W, C) rather than (B, C, H, W): its dims 1-2, not 2-3, form a grid
    with the image's aspect ratio and an integer stride (Swin, MaxViT partitions, Hiera keep channels last)."""
    if t.ndim != 4 or image_hw is None:
        return False

    def grid_like(h: int, w: int) -> bool:
        return h * image_hw[1] == w * image_hw[0] and image_hw[0] % h == 0 and h > 0

    return not grid_like(t.shape[2], t.shape[3]) and grid_like(t.shape[1], t.shape[2])


class _Recorder:
    """Installs the hooks of one capture and turns hook calls into records."""

    def __init__(self, model: nn.Module, cap: Capture, keep: Callable[[str], bool], device, grad: bool,
                 attention: bool, streams: bool, on_record: Callable[[SubLayerRecord], None] | None = None,
                 layers: str = "sublayers"):
        self.model, self.cap, self.keep, self.device, self.grad = model, cap, keep, device, grad
        self.deliver = on_record or cap.records.append
        self.attention, self.streams, self.layers = attention, streams, layers
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.image_hw: tuple[int, int] | None = None
        self.image: torch.Tensor | None = None
        self.patch = _patch_size(model)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.block_hw: dict[int, tuple[int, int]] = {}
        self.block_grid: dict[int, tuple[int, int]] = {}  # token grid of a block whose input is a token sequence
        self.blocks = find_blocks(model)
        self.block_index = {b.name: i for i, b in enumerate(self.blocks)}
        self.reductions = stage_reductions(model, self.blocks)
        self.unrolled = isinstance(model, UNROLLED_TOKENS)  # tokens not row-major over the image (Hiera)

    # -- helpers --------------------------------------------------------------------------------
    def out(self, t: torch.Tensor) -> torch.Tensor:
        if _channels_last(t, self.image_hw):
            t = t.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W), a view
        if not self.grad:
            t = t.detach()
        return t.to(self.device) if self.device is not None else t

    def map_hw(self, t: torch.Tensor) -> tuple[int, ...] | None:
        """(h, w) of a feature map, channels-first or -last; None for tokens."""
        if t.ndim != 4:
            return None
        return tuple(t.shape[1:3]) if _channels_last(t, self.image_hw) else tuple(t.shape[-2:])

    def token_layout(self, n_tokens: int, block: int = -1) -> tuple[int, tuple[int, int] | None, int | None]:
        """(prefix tokens, grid, patch size) of a ViT token sequence from the input image size; a square grid whose
        side does not divide the image (PiT's overlapping patch embedding) takes its pixel step from timm's
        ``feature_info`` reduction of the stage holding ``block``."""
        if self.image_hw is None or self.unrolled:
            return 0, None, None
        if self.patch is not None:
            h, w = self.image_hw[0] // self.patch[0], self.image_hw[1] // self.patch[1]
            if h * w <= n_tokens <= h * w + 16:
                return n_tokens - h * w, (h, w), self.patch[0]
        H, W = self.image_hw
        prefixes = dict.fromkeys((int(getattr(self.model, "num_prefix_tokens", 0) or 0), 0, 1, 2))
        for p in prefixes:  # tokens of a grid with the image's aspect ratio and an integer stride
            n = n_tokens - p
            w = round((n * W / H) ** 0.5) if n > 0 else 0
            if w > 0 and n % w == 0 and (n // w) * W == w * H and H % (n // w) == 0:
                return p, (n // w, w), H // (n // w)
        reduction = self.reductions.get(block)
        for p in prefixes if reduction else ():
            side = math.isqrt(max(n_tokens - p, 0))
            if side > 1 and side * side == n_tokens - p:
                return p, (side, side), reduction
        return 0, None, None

    def hook(self, module: nn.Module, fn: Callable, pre: bool = False) -> None:
        if pre:
            self.handles.append(module.register_forward_pre_hook(fn))
        else:
            self.handles.append(module.register_forward_hook(fn))

    def emit(self, name: str, kind: str, block: int, parts: dict[str, torch.Tensor],
             num_heads: int | None = None, residual: bool = True) -> None:
        z_in, z_out = parts["z_in"], self.out(parts["z_out"])
        if z_out.ndim == 3:
            prefix, grid, patch = self.token_layout(z_out.shape[1], block)
        elif z_out.ndim == 4:  # a feature map: describe the map the block produces
            grid = (int(z_out.shape[-2]), int(z_out.shape[-1]))
            prefix = 0
            patch = self.image_hw[0] // grid[0] if self.image_hw else None
        else:
            prefix, grid, patch = 0, None, None
        stage = self.blocks[block].stage if 0 <= block < len(self.blocks) else None
        info = LayerInfo(name, kind, block, prefix, grid, patch, num_heads, stage)
        if not residual:
            self.deliver(SubLayerRecord(info, self.out(z_in), None, None, z_out))
            return
        shortcut = parts.get("shortcut", z_in)
        # the branch: recorded, else (the sum before a post-add activation, else the output) - shortcut
        branch = parts["branch"] if "branch" in parts else parts.get("sum", parts["z_out"]) - shortcut
        self.deliver(SubLayerRecord(info, self.out(z_in), self.out(branch), self.out(shortcut), z_out))

    # -- installation ---------------------------------------------------------------------------
    def install(self) -> None:
        def on_model_input(_m, args):
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.ndim == 4:
                self.image_hw = (int(x.shape[-2]), int(x.shape[-1]))
                self.image = x

        self.hook(self.model, on_model_input, pre=True)
        for i, site in enumerate(self.blocks):
            def on_block_input(_m, args, i=i):
                x = first_tensor(args)
                if isinstance(x, torch.Tensor) and x.ndim == 4:
                    hw = x.shape[1:3] if _channels_last(x, self.image_hw) else x.shape[-2:]
                    self.block_hw[i] = (int(hw[0]), int(hw[1]))
                elif isinstance(x, torch.Tensor) and x.ndim == 3:  # tokens: their grid, when they are one
                    prefix, grid, _ = self.token_layout(int(x.shape[1]), i)
                    if grid is not None and prefix == 0:
                        self.block_grid[i] = grid

            self.hook(site.module, on_block_input, pre=True)
        if self.streams:
            if self.blocks and self.keep("stem"):
                self._install_stem(self.blocks[0])
            for i, site in enumerate(self.blocks):
                if self.layers == "blocks" or site.family == "generic":
                    self._install_whole(i, site)
                else:
                    getattr(self, f"_install_{site.family}")(i, site)
        if self.attention:
            self._install_attention()

    def _install_transformer(self, i: int, site: BlockSite, attn_branch: nn.Module, mlp_branch: nn.Module,
                             attn_kind: str) -> None:
        b = site.module
        attn_name, mlp_name = f"{site.name}.attn", f"{site.name}.mlp"
        slot = self.pending.setdefault(site.name, {})
        heads = getattr(b.attn, "num_heads", None)

        def attn_in(_m, args):
            slot["a_in"] = args[0]

        def attn_out(_m, _args, out):
            slot["a_branch"] = out

        def mlp_in(_m, args):
            slot["m_in"] = args[0]
            if self.keep(attn_name):
                self.emit(attn_name, attn_kind, i, {"z_in": slot["a_in"], "branch": slot["a_branch"], "z_out": args[0]},
                          heads)

        def mlp_out(_m, _args, out):
            slot["m_branch"] = out

        def block_out(_m, _args, out):
            if self.keep(mlp_name):
                self.emit(mlp_name, "mlp", i, {"z_in": slot["m_in"], "branch": slot["m_branch"], "z_out": out})
            slot.clear()

        self.hook(b.norm1, attn_in, pre=True)
        self.hook(attn_branch, attn_out)
        self.hook(b.norm2, mlp_in, pre=True)
        self.hook(mlp_branch, mlp_out)
        self.hook(b, block_out)

    def _install_table(self, i: int, site: BlockSite) -> None:
        install_table(self, i, site)

    def _install_vit(self, i: int, site: BlockSite) -> None:
        b = site.module
        self._install_transformer(i, site, b.ls1, b.ls2, "msa")

    def _install_convit(self, i: int, site: BlockSite) -> None:
        b = site.module
        self._install_transformer(i, site, b.attn, b.mlp, "gpsa" if b.use_gpsa else "msa")

    def _install_block(self, i: int, site: BlockSite, kind: str, shortcut: nn.Module | None,
                       branch: nn.Module | None, pre_activation: nn.Module | None) -> None:
        """A block recorded whole: z_in at its input, z_out at its output, the skip path's output from
        ``shortcut`` (z_in when None), and the branch from ``branch``'s output or, for a block that
        activates after the add, as (input of ``pre_activation``) - shortcut, else as z_out - shortcut."""
        b = site.module
        slot = self.pending.setdefault(site.name, {})
        if not self.keep(site.name):
            return

        def block_in(_m, args):
            slot["z_in"] = first_tensor(args)

        def shortcut_out(_m, _args, out):
            slot["shortcut"] = out

        def branch_out(_m, _args, out):
            slot["branch"] = out

        def pre_act(_m, args):
            slot["sum"] = args[0].clone()  # the activation is usually in-place

        def block_out(_m, _args, out):
            z_in, out = slot.get("z_in"), first_tensor(out)  # MViTv2's blocks return (x, feat_size)
            sub = kind
            if kind == "conv" and isinstance(z_in, torch.Tensor) and z_in.ndim == 4 and out.ndim == 4 \
                    and out.shape[-2:] != z_in.shape[-2:]:
                sub = "downsample"  # a strided (subsampling) conv block: HDVW shades these apart
            self.emit(site.name, sub, i, {**slot, "z_out": out})
            slot.clear()

        self.hook(b, block_in, pre=True)
        if shortcut is not None:
            self.hook(shortcut, shortcut_out)
        if branch is not None:
            self.hook(branch, branch_out)
        if pre_activation is not None:
            self.hook(pre_activation, pre_act, pre=True)
        self.hook(b, block_out)

    def _install_resnet(self, i: int, site: BlockSite) -> None:
        b = site.module
        self._install_block(i, site, "conv", b.downsample, None, final_activation(b))

    def _install_vitscope(self, i: int, site: BlockSite) -> None:
        b = site.module
        self._install_block(i, site, type(b).vitscope_kind, b.shortcut, b.drop_path, None)

    def _install_stem(self, first: BlockSite) -> None:
        """The stem: the stream entering the first block, recorded with the image as its input."""
        def stem(_m, args):
            x = first_tensor(args)
            if x is not None and self.image is not None:
                self.emit("stem", "stem", -1, {"z_in": self.image, "z_out": x}, residual=False)

        self.hook(first.module, stem, pre=True)

    def _install_whole(self, i: int, site: BlockSite) -> None:
        """One record per block (``layers="blocks"``, or a block vitscope cannot split), named by its module
        path, of kind ``block`` (``smoothing`` for a smoothing layer). Residual when its family is known: a
        transformer block is ``x + g(x)`` (its two sub-layers composed), a ResNet block ``act(shortcut + f)``."""
        b = site.module
        subs = sublayers(b) if site.family == "table" else ()
        if site.family in ("vit", "convit") or subs and len(subs) > 1 and all(
                s.identity_skip(b) and s.post is None for s in subs):  # x + g(x), g its sub-layers composed
            self._install_block(i, site, "block", None, None, None)
        elif subs and len(subs) == 1:
            self._install_block(i, site, "block", subs[0].skip_module(b), None,
                                submodule(b, subs[0].post) if subs[0].post else None)
        elif site.family == "resnet":
            self._install_block(i, site, "block", b.downsample, None, final_activation(b))
        elif site.family == "vitscope":
            self._install_block(i, site, "block", b.shortcut, b.drop_path, None)
        elif site.family == "smoothing":
            self._install_smoothing(i, site)
        else:  # generic, or a table block whose skip paths do not compose into one (MaxViT downsampling)
            self._install_generic(i, site)

    def _install_generic(self, i: int, site: BlockSite) -> None:
        """A block recorded by its input and output only (no ``x + f(x)`` split claimed)."""
        if not self.keep(site.name):
            return
        slot = self.pending.setdefault(site.name, {})

        def block_in(_m, args):
            slot["z_in"] = first_tensor(args)

        def block_out(_m, _args, out):
            z_in, z_out = slot.pop("z_in", None), first_tensor(out)
            if isinstance(z_in, torch.Tensor) and isinstance(z_out, torch.Tensor):
                self.emit(site.name, "block", i, {"z_in": z_in, "z_out": z_out}, residual=False)

        self.hook(site.module, block_in, pre=True)
        self.hook(site.module, block_out)

    def _install_smoothing(self, i: int, site: BlockSite) -> None:
        """A spatial-smoothing layer (no skip path): recorded as ``z_out = z_in + (smooth(z_in) - z_in)``, i.e.
        shortcut = z_in and branch = the change the blur makes, so ``z_out = shortcut + branch`` holds."""
        self._install_block(i, site, "smoothing", None, None, None)

    def _install_attention(self) -> None:
        """Every ``*attn_drop`` module, as timm's ``AttentionExtract`` hooks them (fused attention is off): it
        receives the post-softmax map. Its kind says what the map is (``LayerInfo``): ``msa`` over a token grid
        (or within square windows: AlterNet, Swin), ``gpsa``, ``pooled`` (keys pooled or spatially reduced:
        fewer keys than queries), ``channel`` (XCiT's cross-covariance attention, over channels) or ``other``."""
        for name, drop in self.model.named_modules():
            if not fnmatch.fnmatchcase(name, "*attn_drop"):
                continue
            owner = name.rpartition(".")[0]
            m = self.model.get_submodule(owner) if owner else self.model
            if not self.keep(owner):
                continue
            block = self._enclosing_block(owner)
            kind = attention_kind(m)
            parts = owner.split(".")  # the owner's parent first, then up to the model
            ancestors = [self.model.get_submodule(".".join(parts[:k])) for k in range(len(parts) - 1, -1, -1)]

            def on_probs(_d, args, _out, name=owner, kind=kind, block=block, m=m, ancestors=ancestors):
                attn = args[0] if args and isinstance(args[0], torch.Tensor) else None
                if attn is None or attn.ndim < 3:
                    return
                if attn.ndim == 5 and isinstance(m, WINDOW_GROUPS):  # (B, windows, heads, n, n): Swin's layout
                    attn = attn.flatten(0, 1)  # (B windows, heads, n, n)
                info = self._attention_info(name, kind, block, m, attn, ancestors)
                self.cap.attentions.append(self.out_map(attn))
                self.cap.attention_layout.append(info)

            self.hook(drop, on_probs)

    def out_map(self, t: torch.Tensor) -> torch.Tensor:
        if not self.grad:
            t = t.detach()
        return t.to(self.device) if self.device is not None else t

    def _attention_info(self, name: str, kind: str, block: int, m: nn.Module, attn: torch.Tensor,
                        ancestors: list[nn.Module]) -> LayerInfo:
        heads = getattr(m, "num_heads", None) or (int(attn.shape[1]) if attn.ndim == 4 else None)
        stage = self.blocks[block].stage if 0 <= block < len(self.blocks) else None
        if kind in ("channel", "mixed") or attn.ndim != 4:
            return LayerInfo(name, kind if kind in ("channel", "mixed") else "other", block, 0, None, None, heads,
                             stage)
        n_q, n_k = int(attn.shape[-2]), int(attn.shape[-1])
        batch = int(self.image.shape[0]) if self.image is not None else None
        if n_q != n_k:  # pooled or spatially reduced keys: placed where capture's geometry table knows them
            prefix, grid, patch = self.token_layout(n_q, block) if batch == attn.shape[0] else (0, None, None)
            keys = reduced_key_coords(m, grid, n_k) if grid is not None and prefix == 0 else None
            if keys is None:
                return LayerInfo(name, "pooled", block, 0, None, None, heads, stage)
            return LayerInfo(name, "pooled", block, 0, grid, patch, heads, stage, key_grid=keys[0], key_coords=keys[1])
        if batch is not None and attn.shape[0] == batch:
            prefix, grid, patch = self.token_layout(n_k, block)
            if grid is not None:
                return LayerInfo(name, kind, block, prefix, grid, patch, heads, stage)
        side = int(round(n_k ** 0.5))
        windows = attn.shape[0] // batch if batch and attn.shape[0] % batch == 0 else 0
        map_hw, stride = self._windowed_map(windows, n_k, block) if windows > 1 else (None, None)
        stride = stride or self._stride_of(block)
        if windows > 1 and side * side == n_k and stride:
            parent = ancestors[0]
            step = window_step(ancestors, (side, side), map_hw) if map_hw else None
            if step is not None:  # dilated windows (MaxViT grid attention, MobileViT): tokens `step` cells apart
                coords = dilated_coords((side, side), step)
                return LayerInfo(name, kind, block, 0, (side, side), stride, heads, stage, query_coords=coords,
                                 key_coords=coords)
            if map_hw is None and window_step(ancestors, (side, side), (side, side)) is not None:
                return LayerInfo(name, "other", block, 0, None, None, heads, stage)
            # square windows of a feature map (AlterNet, Swin, MaxViT block attention): distances within a window
            # are those on the map; a shifted window's wrapped-around pairs are masked (probability ~0)
            shift = getattr(parent, "shift_size", 0) or 0
            shift = (int(shift), int(shift)) if isinstance(shift, int) else (int(shift[0]), int(shift[1]))
            return LayerInfo(name, kind, block, 0, (side, side), stride, heads, stage, shift)
        return LayerInfo(name, "other", block, 0, None, None, heads, stage)

    def _windowed_map(self, windows: int, n_k: int, block: int) -> tuple[tuple[int, int] | None, int | None]:
        """(map size, pixels per map cell) of the map that ``windows`` windows of ``n_k`` tokens partition: the
        block's input map (or token grid: Twins) when its windows, padded at the bottom and right as timm's Swin and
        Twins pad a map their windows do not tile, number ``windows``; else a map of ``windows * n_k`` cells with
        the image's aspect ratio and an integer stride (the windows of one image tile it); else (None, None)."""
        if self.image_hw is None:
            return None, None
        H, W = self.image_hw
        side = math.isqrt(n_k)
        hw = self.block_hw.get(block) or self.block_grid.get(block)  # the block's input map, or its token grid
        if hw is not None and side * side == n_k:
            h, w = hw
            if -(-h // side) * -(-w // side) == windows:
                return (h, w), H // h
        cells = windows * n_k
        h = round((cells * H / W) ** 0.5)
        if h <= 0 or cells % h or H % h or (cells // h) * H != W * h:
            return None, None
        return (h, cells // h), H // h

    def _enclosing_block(self, name: str) -> int:
        best = -1
        for b_name, i in self.block_index.items():
            if name.startswith(b_name + ".") and (best < 0 or len(b_name) > len(self.blocks[best].name)):
                best = i
        return best

    def _stride_of(self, block: int) -> int | None:
        """Pixels per feature-map cell at the input of ``block`` (for windowed attention in CNN stages)."""
        if block not in self.block_hw or self.image_hw is None:
            return None
        return self.image_hw[0] // self.block_hw[block][0]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.pending.clear()


@contextlib.contextmanager
def capture(
    model: nn.Module,
    attention: bool = True,
    residual: bool = True,
    branches: bool = True,
    names: str | Sequence[str] | Callable[[str], bool] | None = None,
    device: torch.device | str | None = None,
    grad: bool = False,
    on_record: Callable[[SubLayerRecord], None] | None = None,
    layers: str = "sublayers",
) -> Iterator[Capture]:
    """Record attention maps and residual streams of every forward pass run inside the context.

    Args:
        model: Any timm ViT/DeiT, ConViT or ResNet, or a vitscope model.
        attention: Record post-softmax attention maps (B, H, N, N); fused attention is switched off meanwhile.
        residual: Record the stream entering and leaving every sub-layer or block, and the stem's output
            (the stream entering the first block, kind ``stem``, name ``stem``) first.
        branches: Record each sub-layer's branch output f(z) (recorded together with ``residual``).
        names: fnmatch pattern(s) or a predicate on layer names (``blocks.3.attn``, ``layer2.1``, ``stem``);
            it selects attention layers by their module path too (``blocks.3.attn``).
        device: Where captured tensors go (default: where they were computed).
        grad: Keep the autograd graph (default: tensors are detached).
        on_record: Called with each sub-layer's record as the forward produces it, instead of keeping it in
            ``Capture.records`` (which then stays empty): streams a batch without holding its activations.
        layers: ``sublayers`` (default): each known residual block split into its sub-layers (a transformer
            block's attention and MLP, a ResNet block whole), other blocks whole (kind ``block``);
            ``blocks``: one record per block, named by its module path (``blocks.3``, ``layers.1.blocks.0``),
            kind ``block``: the granularity of Raghu et al.'s CKA.

    Yields:
        A :class:`Capture` filled as the model runs.

    Raises:
        ValueError: residual streams were asked for but the model has no block vitscope knows.
    """
    if layers not in LAYERS:
        raise ValueError(f"layers must be one of {', '.join(LAYERS)}, got {layers!r}")
    cap = Capture()
    streams = residual or branches
    recorder = _Recorder(model, cap, _name_filter(names), device, grad, attention, streams, on_record, layers)
    if streams and not recorder.blocks:
        raise ValueError(
            f"vitscope.capture found no residual block it knows in {type(model).__name__}: supported are timm "
            "ViT/DeiT, ConViT and ResNet blocks and vitscope's models; pass residual=False, branches=False "
            "to capture attention only"
        )
    stack = contextlib.ExitStack()
    try:
        if attention:
            stack.enter_context(explicit_attention(model))
        recorder.install()
        yield cap
    finally:
        recorder.remove()
        stack.close()
