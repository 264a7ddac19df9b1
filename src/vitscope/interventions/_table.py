"""Lesion and skip removal on the blocks of capture's table (``capture.table``), driven by its entries.

A table sub-layer names the module whose output is exactly the branch added to the stream (its drop path) and
the module carrying its skip path (None: the identity). So, with hooks only (restored on exit):

- removing a sub-layer (HDVW lesion) zeroes that branch module's output: ``post(skip(x) + 0)``, exactly the
  block with that branch removed;
- removing the skip (RAGHU) zeroes the skip module's output where there is one (a projection), else (the
  identity) makes the branch module return ``branch - x``, so the block adds ``x + (branch - x) = branch`` (to
  one rounding, at most 2u (|x| + |branch|) per element); a skip path that is no module and not the identity
  (Hiera's pooled skip without projection, MViTv2's pooled skip without projection) is refused by name.

A branch module serving several sub-layers (CaiT's one ``drop_path``) is told apart by its call order.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn

from vitscope.capture.table import Sub, submodule


def _nth(subs: Sequence[Sub], sub: Sub) -> int:
    """Which call of its branch module within one block's forward is ``sub``'s."""
    return sum(t.branch == sub.branch for t in subs[: list(subs).index(sub)])


@contextmanager
def _hooks(block: nn.Module, subs: Sequence[Sub], edits: dict[tuple[str, int], str]) -> Iterator[None]:
    """Hooks that, on the n-th call of a branch module (``edits[(path, n)]``), return zeros (``zero``) or the
    branch minus the sub-layer's input (``minus_input``); each sub-layer's input is read at its ``z_in`` tap."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    calls: dict[str, int] = {}
    inputs: dict[tuple[str, str], torch.Tensor] = {}
    by_call = {(s.branch, _nth(subs, s)): s for s in subs}

    def reset(_m, _args):
        calls.clear()
        inputs.clear()

    def tap(key):
        def pre(_m, args):
            inputs[key] = args[0]

        def post(_m, _args, out):
            inputs[key] = out[0] if isinstance(out, (tuple, list)) else out

        return pre if key[1] == "in" else post

    def on_branch(path):
        def hook(_m, _args, out):
            n = calls.get(path, 0)
            calls[path] = n + 1
            what = edits.get((path, n))
            if what == "zero":
                return torch.zeros_like(out)
            if what == "minus_input":
                x = inputs[by_call[(path, n)].z_in]
                return out - x.reshape(out.shape)  # (the stream's layout: Swin's (B, H*W, C) tokens are its map)
            return None

        return hook

    try:
        handles.append(block.register_forward_pre_hook(reset))
        for key in dict.fromkeys(by_call[k].z_in for k in edits if edits[k] == "minus_input"):
            m = submodule(block, key[0])
            handles.append(m.register_forward_pre_hook(tap(key)) if key[1] == "in"
                           else m.register_forward_hook(tap(key)))
        for path in dict.fromkeys(p for p, _ in edits):
            handles.append(submodule(block, path).register_forward_hook(on_branch(path)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def zero_branches(block: nn.Module, subs: Sequence[Sub], chosen: Sequence[Sub]) -> Iterator[None]:
    """Remove the ``chosen`` sub-layers of a table block: their branches add zero."""
    with _hooks(block, subs, {(s.branch, _nth(subs, s)): "zero" for s in chosen}):
        yield


def check_skips(block: nn.Module, subs: Sequence[Sub], name: str) -> None:
    """Refuse, by name, a block with a skip path that is neither a module nor the identity."""
    for s in subs:
        if s.skip_module(block) is None and not s.identity_skip(block):
            raise NotImplementedError(
                f"remove_skip: the skip path of {name} ({type(block).__name__}, sub-layer {s.name or name}) pools its "
                "input with no module to silence (capture/table.py); remove the whole block instead (lesion)")


@contextmanager
def drop_skips(block: nn.Module, subs: Sequence[Sub], name: str) -> Iterator[None]:
    """Remove the skip path of every sub-layer of a table block (RAGHU): each adds only its branch."""
    check_skips(block, subs, name)
    edits: dict[tuple[str, int], str] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    for s in subs:
        skip = s.skip_module(block)
        if skip is not None:
            handles.append(skip.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out)))
        else:
            edits[(s.branch, _nth(subs, s))] = "minus_input"
    try:
        with _hooks(block, subs, edits):
            yield
    finally:
        for h in handles:
            h.remove()
