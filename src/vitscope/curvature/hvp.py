"""Hessian-vector products of a model's loss over any subset of its parameters.

The Hessian is seen as a linear operator on flat vectors (all selected parameters concatenated in
``named_parameters`` order). Products use ``torch.func`` forward-over-reverse
(``jvp`` of ``grad`` of a ``functional_call``), with plain double backward as the fallback, or (the
default for a single batch) double backward through one retained first-order graph, which makes each
later product a single backward pass. The model
runs in an explicit mode (eval by default, so BatchNorm uses its running statistics) and with the
explicit attention path, because scaled-dot-product attention has no double backward; both are
restored after every product, as are the buffers (BatchNorm statistics in train mode).
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from vitscope.capture import explicit_attention

_logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
ParamSpec = None | Iterable[str] | Iterable[nn.Parameter] | Mapping[str, nn.Parameter]
Batch = tuple[torch.Tensor, torch.Tensor]
BACKENDS = ("auto", "func", "autograd", "cached")


def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy for hard labels ``(B,)`` or soft targets ``(B, C)`` (mixup / cutmix)."""
    if targets.dtype.is_floating_point and targets.dim() == outputs.dim():
        return torch.sum(-targets * F.log_softmax(outputs, dim=-1), dim=-1).mean()  # (B,) -> ()
    return F.cross_entropy(outputs, targets)


def l2_penalty(params: Iterable[torch.Tensor], weight_decay: float, style: str = "half_sq") -> torch.Tensor:
    """The L2 term added to the loss: ``half_sq``: wd/2 * sum ||p||^2; ``hdvw``: wd * sum ||p||.

    ``hdvw`` is the unsquared sum of norms that HDVW's code (``ops/norm.py``) added to its loss plots.
    """
    params = list(params)
    if style == "half_sq":
        return 0.5 * weight_decay * sum(p.pow(2).sum() for p in params)
    if style == "hdvw":
        return weight_decay * sum(torch.linalg.vector_norm(p) for p in params)
    raise ValueError(f"l2_style={style!r} is not one of ('half_sq', 'hdvw')")


def select_params(model: nn.Module, params: ParamSpec = None) -> dict[str, nn.Parameter]:
    """The parameters to differentiate, by name, in ``named_parameters`` order.

    ``params`` is None (every parameter with ``requires_grad``), names, Parameter objects, or a dict.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError(
                "the model has no trainable parameters (all requires_grad=False); unfreeze some with "
                "p.requires_grad_(True) or pass params=[names] explicitly"
            )
        return chosen
    if isinstance(params, Mapping):
        params = list(params.values())
    params = list(params)
    if not params:
        raise ValueError("params is empty: pass at least one parameter name or tensor, or None for all")
    by_id = {id(p): n for n, p in named.items()}
    wanted = set()
    for p in params:
        if isinstance(p, str):
            if p not in named:
                raise ValueError(f"model has no parameter named {p!r}; see model.named_parameters()")
            wanted.add(p)
        elif id(p) in by_id:
            wanted.add(by_id[id(p)])
        else:
            raise ValueError("a tensor in params is not a parameter of the model; pass model parameters")
    return {n: p for n, p in named.items() if n in wanted}


@contextlib.contextmanager
def analysis_mode(model: nn.Module, train: bool = False, explicit: bool = True) -> Iterator[nn.Module]:
    """Set the model's mode explicitly (and explicit attention), restore mode and buffers after."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()] if train else []
    try:
        model.train(train)
        with explicit_attention(model) if explicit else contextlib.nullcontext(model):
            yield model
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def as_batches(batch: Batch | Sequence[Batch]) -> list[Batch]:
    """One ``(inputs, targets)`` batch or a list of them, as a non-empty list."""
    if isinstance(batch, tuple | list) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return [(batch[0], batch[1])]
    batches = [(b[0], b[1]) for b in batch]
    if not batches:
        raise ValueError("no data: the batch list (or loader) is empty; pass at least one (inputs, targets)")
    return batches


class HessianOperator:
    """The Hessian of ``sum_b (n_b / N) loss_fn(model(x_b), y_b) + extra(params)`` as a linear operator.

    Args:
        model: any module; its parameters are read, never changed.
        loss_fn: ``(outputs, targets) -> scalar`` mean over the batch.
        batch: ``(inputs, targets)`` or a list of them (the full-data Hessian, weighted by batch size).
        params: the parameters to differentiate (default: every trainable parameter).
        extra: optional ``dict[name, tensor] -> scalar`` added once (e.g. an L2 term).
        train_mode: run the model in train mode (default eval: BatchNorm uses running statistics).
        backend: ``"func"`` (forward-over-reverse) or ``"autograd"`` (double backward); ``"func"``
            falls back to ``"autograd"`` once if torch.func cannot differentiate the model.
            ``"cached"`` is ``"autograd"`` with ``cache_graph=True``. ``"auto"`` (default) is
            ``"cached"`` for a single batch (many products on one batch: eigenvalues, densities) and
            ``"func"`` for a list of batches (memory independent of their number).
        cache_graph: with ``backend="autograd"``, keep each batch's first-order gradient graph after the
            first product (PyHessian's way: each later product is one backward pass, about 1.5-2x
            faster on CPU, at the memory of one retained graph per batch). The cache holds the
            weights of the first product; build a new operator after changing the weights.
        batch_index: index of each batch reported in errors (default 0, 1, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Batch | Sequence[Batch],
        params: ParamSpec = None,
        extra: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None,
        train_mode: bool = False,
        backend: str = "auto",
        batch_index: Sequence[int] | None = None,
        cache_graph: bool = False,
    ):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
        self.batches = as_batches(batch)
        if backend == "auto":
            backend = "cached" if len(self.batches) == 1 else "func"
        if backend == "cached":
            backend, cache_graph = "autograd", True
        self.model, self.loss_fn, self.extra = model, loss_fn, extra
        self.train_mode, self.backend = train_mode, backend
        self.params = select_params(model, params)
        self.names = list(self.params)
        self.shapes = [p.shape for p in self.params.values()]
        self.numels = [p.numel() for p in self.params.values()]
        self.dim = sum(self.numels)
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.batch_index = list(batch_index) if batch_index is not None else list(range(len(self.batches)))
        n = [len(x) for x, _ in self.batches]
        self.weights = [b / sum(n) for b in n]
        self.n_products = 0
        self.cache_graph = cache_graph
        self._graphs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._tangent: torch.Tensor | None = None

    # -- flat vectors <-> parameter dicts
    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, v.split(self.numels), self.shapes)}

    def flatten(self, tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
                dtype: torch.dtype | None = None) -> torch.Tensor:
        """One flat vector (in ``dtype``, default the tensors') written slice by slice: no intermediate."""
        ts = [tensors[n] for n in self.names] if isinstance(tensors, Mapping) else list(tensors)
        out = torch.empty(sum(t.numel() for t in ts), dtype=dtype or ts[0].dtype, device=ts[0].device)
        start = 0
        for t in ts:
            out[start:start + t.numel()].copy_(t.reshape(-1))
            start += t.numel()
        return out

    def primal(self) -> torch.Tensor:
        """The current parameter values as one flat vector."""
        return self.flatten({n: p.detach() for n, p in self.params.items()})

    # -- the product
    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``H @ v`` for a flat vector ``v`` of length ``dim``, computed in the parameters' dtype and
        returned in ``v``'s (so solvers may keep their vectors in float64)."""
        if v.shape != (self.dim,):
            raise ValueError(f"vector has shape {tuple(v.shape)}, expected ({self.dim},)")
        out_dtype = v.dtype if v.dtype.is_floating_point else self.dtype
        if v.dtype != self.dtype or v.device != self.device:
            if self._tangent is None:  # reused: converting into warm memory, not a fresh allocation
                self._tangent = torch.empty(self.dim, dtype=self.dtype, device=self.device)
            v = self._tangent.copy_(v)
        if self.cache_graph and len(self._graphs) == len(self.batches):
            out = self._matvec_autograd(v, out_dtype)  # backward passes through the retained graphs only
            self.n_products += 1
            return out
        with analysis_mode(self.model, self.train_mode):
            if self.backend == "func":
                try:
                    out = self._matvec_func(v, out_dtype)
                except (RuntimeError, NotImplementedError) as e:
                    if "non-finite loss" in str(e):
                        raise
                    _logger.warning("torch.func HVP failed (%s); falling back to double backward", e)
                    self.backend = "autograd"
                    out = self._matvec_autograd(v, out_dtype)
            else:
                out = self._matvec_autograd(v, out_dtype)
        self.n_products += 1
        return out

    def _batch_loss(self, p: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], i: int) -> torch.Tensor:
        x, y = self.batches[i]
        x, y = x.to(self.device), y.to(self.device)
        if x.dtype.is_floating_point and x.dtype != self.dtype:
            x = x.to(self.dtype)
        if y.dtype.is_floating_point and y.dtype != self.dtype:
            y = y.to(self.dtype)
        out = functional_call(self.model, (p, frozen), (x,), strict=False)
        loss = self.loss_fn(out, y)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn returned shape {tuple(loss.shape)}; it must return a scalar mean")
        return loss

    def _frozen(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.model.named_parameters() if n not in self.params}

    def _check(self, loss: torch.Tensor, i: int) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ValueError(
                f"non-finite loss ({value}) on batch {self.batch_index[i]}: check the inputs of that batch, "
                "the checkpoint, or lower the learning rate that produced these weights"
            )

    def _matvec_func(self, v: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        frozen = self._frozen()
        primals = {n: p.detach() for n, p in self.params.items()}
        tangents = self.unflatten(v)
        total: torch.Tensor | None = None
        for i, w in enumerate(self.weights):
            def f(p: dict[str, torch.Tensor], i: int = i, w: float = w) -> tuple[torch.Tensor, torch.Tensor]:
                loss = self._batch_loss(p, frozen, i)
                obj = w * loss + (self.extra(p) if (self.extra is not None and i == 0) else 0.0)
                return obj, loss.detach()

            _, hv, loss = torch.func.jvp(torch.func.grad(f, has_aux=True), (primals,), (tangents,), has_aux=True)
            self._check(loss, i)
            if total is None:
                total = self.flatten(hv, out_dtype)
            else:
                total.add_(self.flatten(hv))
        return total

    def _first_order(self, i: int, w: float, frozen: dict[str, torch.Tensor], create_graph: bool = True
                     ) -> tuple[list, list]:
        """(gradients, with their graph unless ``create_graph=False``; the leaf parameters) of batch ``i``'s
        weighted objective."""
        p = {n: t.detach().requires_grad_(True) for n, t in self.params.items()}
        with torch.enable_grad():
            loss = self._batch_loss(p, frozen, i)
            self._check(loss, i)
            obj = w * loss + (self.extra(p) if (self.extra is not None and i == 0) else 0.0)
            grads = torch.autograd.grad(obj, list(p.values()), create_graph=create_graph, allow_unused=True)
        return list(grads), list(p.values())

    def _matvec_autograd(self, v: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        frozen = self._frozen()
        total: torch.Tensor | None = None
        tangents = list(self.unflatten(v).values())
        for i, w in enumerate(self.weights):
            if self.cache_graph and i in self._graphs:
                grads, leaves = self._graphs[i]
            else:
                grads, leaves = self._first_order(i, w, frozen)
                if self.cache_graph:
                    self._graphs[i] = (grads, leaves)
            keep = [j for j, g in enumerate(grads) if g is not None and g.requires_grad]
            hv: Sequence[torch.Tensor | None] = [None] * len(leaves)
            if keep:
                with torch.enable_grad():
                    hv = torch.autograd.grad(
                        [grads[j] for j in keep], leaves, [tangents[j] for j in keep],
                        retain_graph=self.cache_graph, allow_unused=True,
                    )
            hv = [h if h is not None else torch.zeros_like(q) for h, q in zip(hv, leaves)]
            if total is None:
                total = self.flatten(hv, out_dtype)
            else:
                total.add_(self.flatten(hv))
        return total

    def gradient(self) -> torch.Tensor:
        """The objective's gradient as a flat vector (free after the first product with a cached graph;
        one forward and backward pass otherwise)."""
        total: torch.Tensor | None = None
        with analysis_mode(self.model, self.train_mode):
            frozen = self._frozen()
            for i, w in enumerate(self.weights):
                if self.cache_graph:
                    if i not in self._graphs:
                        self._graphs[i] = self._first_order(i, w, frozen)
                    grads, leaves = self._graphs[i]
                else:
                    grads, leaves = self._first_order(i, w, frozen, create_graph=False)
                part = self.flatten([g.detach() if g is not None else torch.zeros_like(q)
                                     for g, q in zip(grads, leaves)])
                total = part if total is None else total.add_(part)
        return total

    def loss(self) -> float:
        """The objective at the current weights (batch-size weighted mean loss + extra)."""
        with torch.no_grad(), analysis_mode(self.model, self.train_mode):
            frozen = self._frozen()
            p = {n: t.detach() for n, t in self.params.items()}
            total = 0.0
            for i, w in enumerate(self.weights):
                loss = self._batch_loss(p, frozen, i)
                self._check(loss, i)
                total += w * float(loss)
            if self.extra is not None:
                total += float(self.extra(p))
        return total


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Sequence[Batch],
    v: Mapping[str, torch.Tensor] | torch.Tensor,
    params: ParamSpec = None,
    **kwargs: Any,
) -> dict[str, torch.Tensor]:
    """One Hessian-vector product; ``v`` is a flat vector or a dict ``name -> tensor`` (result: a dict)."""
    op = HessianOperator(model, loss_fn, batch, params=params, **kwargs)
    flat = v if isinstance(v, torch.Tensor) else op.flatten(v)
    return op.unflatten(op.matvec(flat))
