"""Capture's hooks on the blocks of its table (``capture.table``): the records of each sub-layer."""
from __future__ import annotations

import torch

from vitscope.capture._layout import first_tensor
from vitscope.capture.sites import BlockSite
from vitscope.capture.table import sublayers, submodule


def _as_grid(t: torch.Tensor, hw: tuple[int, int] | None) -> torch.Tensor:
    """Tokens (B, h*w, C) of a block that takes an (h, w) map, as that map channels-last (B, h, w, C), a view."""
    if t.ndim == 3 and hw is not None and t.shape[1] == hw[0] * hw[1]:
        return t.reshape(t.shape[0], hw[0], hw[1], t.shape[2])
    return t


def install_table(rec, i: int, site: BlockSite) -> None:
    """A block of capture's table (``capture.table``): each sub-layer's stream read at its taps, its branch the
    output of its drop path (the exact term added, told apart by call order where one module serves several
    sub-layers), its skip path the sum minus the branch; records are emitted in order when the block returns.
    Token streams of a block that takes a map (Swin: (B, H*W, C) between its sub-layers) are given as that map."""
    b, subs = site.module, sublayers(site.module)
    slot: dict = rec.pending.setdefault(site.name, {})
    calls: dict[str, list[torch.Tensor]] = {}

    def reset(_m, _args):
        slot.clear()
        calls.clear()

    rec.hook(b, reset, pre=True)  # first: runs before the block's own input tap
    taps = list(dict.fromkeys([t for s in subs for t in (s.z_in, s.z_out)] + [(s.post, "sum") for s in subs
                                                                               if s.post]))
    for path, where in taps:
        def tap_in(_m, args, key=(path, where)):
            x = first_tensor(args)
            slot[key] = x.clone() if key[1] == "sum" else x  # clone: a post-add activation may be in-place

        def tap_out(_m, _args, out, key=(path, where)):
            slot[key] = first_tensor(out)

        rec.hook(submodule(b, path), tap_out if where == "out" else tap_in, pre=where != "out")
    for path in dict.fromkeys(s.branch for s in subs):
        rec.hook(submodule(b, path), lambda _m, _a, out, p=path: calls.setdefault(p, []).append(out))

    def block_out(_m, _args, _out):
        hw = rec.block_hw.get(i)
        for k, s in enumerate(subs):
            name = f"{site.name}.{s.name}" if s.name else site.name
            if not rec.keep(name):
                continue
            nth = sum(t.branch == s.branch for t in subs[:k])
            if s.z_in not in slot or s.z_out not in slot or len(calls.get(s.branch, ())) <= nth:
                raise RuntimeError(f"capture: {type(b).__name__} at {name} did not run the modules capture's "
                                   "table names for it (capture/table.py); its entry does not match this forward")
            total = slot[(s.post, "sum")] if s.post else slot[s.z_out]
            branch = calls[s.branch][nth]
            branch = branch.reshape(total.shape) if branch.shape != total.shape else branch
            z_in = slot[s.z_in]
            same = s.identity_skip(b) and z_in.numel() == total.numel()  # the skip path is z_in itself
            shortcut = z_in.reshape(total.shape) if same else total - branch
            parts = {"z_in": z_in, "branch": branch, "shortcut": shortcut, "z_out": slot[s.z_out]}
            parts = {key: _as_grid(t, hw) for key, t in parts.items()}
            z_in, z_out = parts["z_in"], parts["z_out"]
            kind = "downsample" if s.kind == "conv" and rec.map_hw(z_in) != rec.map_hw(z_out) else s.kind
            heads = getattr(submodule(b, s.name), "num_heads", None) if s.kind in ("msa", "channel") else None
            rec.emit(name, kind, i, parts, heads)
        reset(None, None)

    rec.hook(b, block_out)

