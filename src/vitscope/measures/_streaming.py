"""Streaming base class: additive per-layer states that merge across batches and ranks by summation.

torchmetrics-style ``update()`` / ``compute()`` / ``reset()``. Every state is a float64 sum (of values
and of counts), so the result over unequal batches equals the result over the whole set, and two
instances (or two ranks) combine by adding their states (``merge`` / ``sync``).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

_logger = logging.getLogger(__name__)

Tensor = torch.Tensor


class StreamingMeasure:
    """Base class for the streaming measures.

    ``update`` takes one layer's tensor or a list of tensors (one per layer, e.g. ``cap.attentions``);
    ``compute`` then returns one result or a list of results in the same order. Subclasses turn a batch
    into additive contributions (``_accumulate``) and the summed states into a result (``_compute_layer``).
    """

    def __init__(self) -> None:
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every update."""
        self._states: list[dict[str, Tensor]] | None = None
        self._stacks: dict[str, Tensor] = {}  # key -> (L, ...) sums; self._states[i][key] is a view of row i
        self._single: bool | None = None
        self._synced = False

    def _options(self) -> dict[str, Any]:
        """Constructor options that must agree for two instances to merge."""
        return {}

    @torch.no_grad()
    def _accumulate(self, contributions: Sequence[dict[str, Any]], single: bool) -> None:
        """Add per-layer contributions (dicts of tensors or Python numbers) to the float64 sums.

        A key with the same shape in every layer is summed for all layers at once (one stacked add), since a
        batch brings one contribution per layer and measure (hundreds of tiny adds otherwise).
        """
        if self._synced:
            raise RuntimeError(
                f"{type(self).__name__} was already synced across ranks; call reset() before new updates"
            )
        if self._states is None:
            self._start(contributions, single)
            return
        if len(contributions) != len(self._states) or single != self._single:
            before = "one tensor" if self._single else f"a list of {len(self._states)} layers"
            now = "one tensor" if single else f"a list of {len(contributions)} layers"
            raise ValueError(
                f"{type(self).__name__}.update got {now} but earlier updates got {before}; "
                "pass the same layers at every update (or call reset())"
            )
        for i, (state, contrib) in enumerate(zip(self._states, contributions)):
            if state.keys() != contrib.keys():
                raise ValueError(
                    f"{type(self).__name__}: layer {i} gave states {sorted(contrib)} but earlier updates gave "
                    f"{sorted(state)}; pass the same layers at every update (or call reset())"
                )
            for key, value in contrib.items():
                if state[key].shape != _shape(value):
                    raise ValueError(
                        f"{type(self).__name__}: layer {i} state {key!r} has shape {tuple(_shape(value))} but "
                        f"earlier updates gave {tuple(state[key].shape)}; every update must pass the same layers "
                        "with the same number of heads/tokens/channels"
                    )
        for key, stack in self._stacks.items():
            stack += _stacked([c[key] for c in contributions], stack.device)
        for state, contrib in zip(self._states, contributions):
            for key, value in contrib.items():
                if key not in self._stacks:
                    state[key] += _float64(value, state[key].device)

    def _start(self, contributions: Sequence[dict[str, Any]], single: bool) -> None:
        self._states = [{} for _ in contributions]
        self._stacks = {}
        for key in contributions[0]:
            if not all(key in c for c in contributions):
                continue
            values = [c[key] for c in contributions]
            devices = {v.device for v in values if isinstance(v, torch.Tensor)}
            if len({_shape(v) for v in values}) == 1 and len(devices) <= 1:
                stack = _stacked(values, devices.pop() if devices else None)  # (L, ...), new memory
                self._stacks[key] = stack
                for state, row in zip(self._states, stack.unbind(0)):
                    state[key] = row
        for state, contrib in zip(self._states, contributions):
            for key, value in contrib.items():
                if key not in self._stacks:
                    state[key] = _float64(value, None).clone()
        self._single = single

    def update_layers(self, contributions: Sequence[dict[str, Tensor]]) -> None:
        """Add one batch given as per-layer contributions (``layer_sums`` results, one per layer in order): for
        callers that reduce each layer as the model runs (``vitscope.probe``) instead of holding the batch."""
        self._accumulate(contributions, False)

    def _compute_layer(self, state: dict[str, Tensor]) -> Any:
        raise NotImplementedError

    def compute(self) -> Any:
        """The measure over everything seen so far: one result, or a list (one per layer)."""
        if self._states is None:
            raise ValueError(f"{type(self).__name__}.compute() called before any update(); feed at least one batch")
        out = [self._compute_layer(s) for s in self._states]
        return out[0] if self._single else out

    # ---------------------------------------------------------- merge / sync
    def state_dict(self) -> dict[str, Any]:
        """The additive states (copies): ``{"type", "options", "single", "layers": [{name: tensor}]}``."""
        return {
            "type": type(self).__name__,
            "options": self._options(),
            "single": self._single,
            "layers": [{k: v.clone() for k, v in s.items()} for s in (self._states or [])],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace the states by ``state`` (from ``state_dict``)."""
        self.reset()
        self.merge(state)

    def merge(self, other: StreamingMeasure | dict[str, Any]) -> StreamingMeasure:
        """Add the states of ``other`` (an instance of the same class or its ``state_dict()``); returns self."""
        state = other.state_dict() if isinstance(other, StreamingMeasure) else other
        if not isinstance(state, dict) or "layers" not in state:
            raise ValueError(f"merge expects a {type(self).__name__} or its state_dict(), got {type(other).__name__}")
        if state.get("type") != type(self).__name__ or state.get("options") != self._options():
            raise ValueError(
                f"cannot merge {state.get('type')} with options {state.get('options')} into {type(self).__name__} "
                f"with options {self._options()}; merge only instances built with the same arguments"
            )
        if state["single"] is None or not state["layers"]:
            return self
        self._accumulate(state["layers"], bool(state["single"]))
        return self

    def sync(self, group: Any = None) -> StreamingMeasure:
        """Sum the states over all ranks with ``torch.distributed.all_reduce`` (no-op when not initialized).

        Call once on every rank after the last update and before ``compute``; every rank must have seen at
        least one batch of the same layers.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self._synced:
            raise RuntimeError(f"{type(self).__name__}.sync() called twice; states would be summed twice")
        if self._states is None:
            raise ValueError(
                f"{type(self).__name__}.sync(): this rank saw no batch; give every rank at least one batch"
            )
        for state in self._states:
            for key in sorted(state):
                dist.all_reduce(state[key], op=dist.ReduceOp.SUM, group=group)
        self._synced = True
        return self


def _shape(value: Any) -> torch.Size:
    return value.shape if isinstance(value, torch.Tensor) else torch.Size([])


def _float64(value: Any, device: torch.device | None) -> Tensor:
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.float64 and (device is None or value.device == device):
            return value
        return value.to(device=device if device is not None else value.device, dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64, device=device)


def _stacked(values: Sequence[Any], device: torch.device | None) -> Tensor:
    """(L, ...) float64 from L tensors of one shape or L Python numbers."""
    if not any(isinstance(v, torch.Tensor) for v in values):
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    return torch.stack([_float64(v, device) for v in values])


def layer_option(value: Any, layout: Any, index: int, attr: str) -> Any:
    """``value`` when given, else ``layout[index].<attr>`` (``layout`` a LayerInfo or a list of them)."""
    if value is not None:
        return value
    if layout is None:
        return None
    info = layout[index] if isinstance(layout, (list, tuple)) else layout
    return getattr(info, attr, None)


def check_layout(layout: Any, n: int) -> None:
    """Check that a list ``layout`` has one entry per layer."""
    if isinstance(layout, (list, tuple)) and len(layout) != n:
        raise ValueError(
            f"layout has {len(layout)} entries but {n} layers were passed; pass the layout aligned with the "
            "tensors (cap.attention_layout with cap.attentions, cap.layout with cap.residuals/cap.branches)"
        )
