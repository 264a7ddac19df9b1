"""Centered Kernel Alignment (Kornblith et al. 2019) and minibatch CKA (Nguyen, Raghu & Kornblith 2021),
as used by RAGHU to compare ViT and CNN layers.

Unbiased HSIC_1 of Gram matrices K, L of n examples (K~ = K with a zeroed diagonal):

    HSIC_1 = [tr(K~ L~) + (1'K~1)(1'L~1) / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))

computed as ``<U(K), U(L)>_F / (n(n-3))`` with U the unbiased centring of Kornblith et al. (the two are
equal), so all layer pairs of a batch come from one matmul of flattened centred Grams. Minibatch CKA is
``sum_b HSIC(K_b, L_b) / sqrt(sum_b HSIC(K_b, K_b) * sum_b HSIC(L_b, L_b))``, with the 1/(n(n-3)) factor
kept per batch (the reference TF code drops it, which is only harmless when every batch has one size).
Everything is float64, except in ``vitscope.probe``, which builds the Grams of float32 features with a float32
matmul after centring them over the batch (CKA within about 1e-8 of float64, see ``linear_gram``). Features
are flattened per example: ViT tokens x channels, CNN C x H x W.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

from vitscope.measures._streaming import StreamingMeasure
from vitscope.measures._validate import as_float, as_list, check_tensor, memory_order, raise_non_finite

_logger = logging.getLogger(__name__)

Tensor = torch.Tensor

__all__ = ["cka", "hsic1", "MinibatchCKA"]


def _flatten(x: Any, name: str) -> Tensor:
    # Finiteness is checked on the (n, n) Gram (NaN/Inf in x always reach it): far cheaper than on x.
    x = check_tensor(x, name, what="(n, ...) features, one row per example", finite=False)
    if x.ndim < 2:
        raise ValueError(f"{name} must be (n, ...) features with one row per example, got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1).to(torch.float64)  # (n, D)


def _linear_gram(x: Tensor, name: str = "x", validate: bool = True) -> Tensor:
    gram = x @ x.T  # (n, n)
    if validate and not torch.isfinite(gram).all():
        raise_non_finite(name)
    return gram


def linear_gram(feat: Any, name: str = "x", validate: bool = True, float32: bool = False) -> Tensor:
    """Linear Gram ``X X^T`` (n, n), float64, of one layer's features (n, ...) flattened per example: the
    per-layer part of ``MinibatchCKA.update`` (see ``update_grams``); also the NaN/Inf check unless
    ``validate=False``.

    ``float32=True`` (``vitscope.probe``; ``vitscope.compare(gram_dtype="float32")``): float32 (or half)
    features are centred over the n examples and multiplied in float32 (autocast off, so never in bf16), the
    Gram symmetrized in float64. Centring leaves HSIC_1 unchanged (U-centring removes a common offset exactly,
    whatever the rounding of the mean) and keeps the Gram well conditioned: CKA then agrees with float64 to
    about 1e-8 in practice, even with large offsets shared by all examples (trained ViTs' massive activations)
    that cost a plain float32 Gram ~1e-3. Worst case (tests/test_compare.py checks it): each entry of the centred Gram K
    is off by at most eps ||x_i|| ||x_j|| with eps = gamma_(D+2) = (D+2)u / (1 - (D+2)u), u = 2^-24 (a
    float32 dot product of length D after one rounded subtraction per element; IEEE float32 matmul, i.e. not
    TF32), so ||E||_F <= eps tr(K); U-centring is an orthogonal projection of symmetric matrices (Szekely &
    Rizzo 2014), so ||U(E)||_F <= eps tr(K), and the CKA (a cosine between U-centred Grams) moves by at most
    asin(eps rho_K) + asin(eps rho_L), rho = tr(K) / ||U(K)||_F (over batches: the root sums of squares).
    Otherwise the Gram is float64.
    """
    if not float32:
        return _linear_gram(_flatten(feat, name), name, validate)
    x = check_tensor(feat, name, what="(n, ...) features, one row per example", finite=False)
    if x.ndim < 2:
        raise ValueError(f"{name} must be (n, ...) features with one row per example, got shape {tuple(x.shape)}")
    # (n, D), float32 (or float64 when given float64); features in memory order (a view of channels-last maps, no
    # copy): the Gram does not depend on their order
    flat = as_float(memory_order(x, keep_first=True).reshape(x.shape[0], -1))
    flat = flat - flat.mean(0, keepdim=True)
    with torch.autocast(flat.device.type, enabled=False):  # under --amp the matmul would otherwise run in bf16
        gram = (flat @ flat.T).to(torch.float64)  # (n, n)
    gram = (gram + gram.T) / 2  # the two triangles may round differently; the bound needs a symmetric error
    if validate and not torch.isfinite(gram).all():
        raise_non_finite(name)
    return gram


def _rbf_gram(x: Tensor, sigma: float, name: str = "x") -> Tensor:
    """RBF Gram with bandwidth ``sigma`` times the median pairwise distance (Kornblith et al. 2019)."""
    gram = _linear_gram(x, name)  # (n, n)
    sq_norms = gram.diagonal()
    sq_dist = (sq_norms[:, None] + sq_norms[None, :] - 2 * gram).clamp_min(0)  # (n, n)
    flat = sq_dist.flatten().sort().values
    m = flat.numel()
    median = (flat[(m - 1) // 2] + flat[m // 2]) / 2  # numpy's median (mean of the middle two)
    if median <= 0:
        raise ValueError("rbf kernel: the median squared distance between examples is 0; use kernel='linear'")
    return torch.exp(-sq_dist / (2 * sigma**2 * median))


def _center_unbiased(gram: Tensor) -> Tensor:
    """U(K): <U(K), U(L)>_F = n(n-3) HSIC_1(K, L). Works on (..., n, n)."""
    n = gram.shape[-1]
    k = gram.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    means = k.sum(-1) / (n - 2)  # (..., n); K symmetric
    means = means - means.sum(-1, keepdim=True) / (2 * (n - 1))
    u = k - means[..., :, None] - means[..., None, :]
    u.diagonal(dim1=-2, dim2=-1).zero_()
    return u


def _center_biased(gram: Tensor) -> Tensor:
    """H K H with H = I - 11'/n: <HKH, HLH>_F = (n-1)^2 HSIC_0(K, L)."""
    return gram - gram.mean(-1, keepdim=True) - gram.mean(-2, keepdim=True) + gram.mean((-1, -2), keepdim=True)


def hsic1(gram_x: Tensor, gram_y: Tensor) -> Tensor:
    """Unbiased HSIC_1 (Song et al. 2012) of two (n, n) Gram matrices, n > 3 (float64 scalar)."""
    n = gram_x.shape[-1]
    if n <= 3:
        raise ValueError(f"unbiased HSIC needs more than 3 examples, got n={n}")
    ux, uy = _center_unbiased(gram_x.double()), _center_unbiased(gram_y.double())
    return (ux * uy).sum((-1, -2)) / (n * (n - 3))


def cka(x: Tensor, y: Tensor, kernel: str = "linear", unbiased: bool = True, sigma: float = 1.0) -> Tensor:
    """CKA between two representations of the same n examples (Kornblith et al. 2019).

    ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with the unbiased HSIC_1 (default) or the biased HSIC_0.

    Args:
        x: (n, ...) features; flattened per example.
        y: (n, ...) features of the same examples (any width).
        kernel: ``"linear"`` or ``"rbf"``.
        unbiased: Unbiased HSIC_1 (needs n > 3) instead of HSIC_0.
        sigma: RBF bandwidth as a fraction of the median distance between examples.

    Returns:
        Scalar float64 tensor (1 for identical representations; invariant to orthogonal transforms and
        isotropic scaling).
    """
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf', got {kernel!r}")
    if kernel == "rbf" and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    fx, fy = _flatten(x, "x"), _flatten(y, "y")
    n = fx.shape[0]
    if fy.shape[0] != n:
        raise ValueError(
            f"x and y must hold the same examples: x has n={n}, y has n={fy.shape[0]} rows; "
            "pass features of the same inputs"
        )
    if n < (4 if unbiased else 2):
        raise ValueError(f"cka needs n > 3 examples with unbiased=True (n >= 2 otherwise), got n={n}")
    center = _center_unbiased if unbiased else _center_biased
    if kernel == "linear":
        kx, ky = center(_linear_gram(fx, "x")), center(_linear_gram(fy, "y"))  # (n, n)
    else:
        kx, ky = center(_rbf_gram(fx, sigma, "x")), center(_rbf_gram(fy, sigma, "y"))
    xy, xx, yy = (kx * ky).sum(), (kx * kx).sum(), (ky * ky).sum()
    for name, v in (("x", xx), ("y", yy)):
        if v <= 0:
            raise ValueError(f"{name} has zero HSIC with itself (constant across examples): CKA is undefined")
    return xy / torch.sqrt(xx * yy)


def _centred(grams: list[Tensor], n: int) -> Tensor:
    """(L, n*n): U(K) of each layer's Gram, flattened (all layers centred at once); empty for n <= 3."""
    if n <= 3 or not grams:
        return torch.empty(0)
    return _center_unbiased(torch.stack(grams)).flatten(1)  # (L, n*n)


class MinibatchCKA(StreamingMeasure):
    """Minibatch linear CKA between every layer of one list and every layer of another (RAGHU).

    ``update(feats_x, feats_y=None)`` takes one batch: a list of ``num_layers_x`` feature tensors (n, ...)
    and optionally ``num_layers_y`` tensors of a second model on the same n examples (None: compare the
    x layers with themselves). Per batch it keeps only the n x n Gram of each layer, accumulates the
    unbiased HSIC_1 of every pair with one matmul, and adds it to float64 sums (so batches of any size and
    ranks merge by summation). Batches with n <= 3 are skipped with a warning (HSIC_1 is undefined).
    ``compute()`` returns the (Lx, Ly) CKA matrix. ``num_layers_y=None`` means Ly = Lx; every update must
    then pass feats_y or every update must omit it.
    """

    def __init__(self, num_layers_x: int, num_layers_y: int | None = None) -> None:
        if not isinstance(num_layers_x, int) or num_layers_x < 1:
            raise ValueError(f"num_layers_x must be a positive int, got {num_layers_x!r}")
        if num_layers_y is not None and (not isinstance(num_layers_y, int) or num_layers_y < 1):
            raise ValueError(f"num_layers_y must be a positive int or None, got {num_layers_y!r}")
        self.num_layers_x = num_layers_x
        self.num_layers_y = num_layers_y
        super().__init__()

    def _options(self) -> dict[str, Any]:
        return {"num_layers_x": self.num_layers_x, "num_layers_y": self.num_layers_y}

    def reset(self) -> None:
        super().reset()
        self._cross: bool | None = None  # whether updates pass feats_y

    def _centred_grams(self, feats: list, name: str, n: int | None, validate: bool) -> tuple[Tensor, int]:
        grams = []
        for i, f in enumerate(feats):
            gram = linear_gram(f, f"{name}[{i}]", validate)  # (n, n)
            if n is None:
                n = gram.shape[0]
            if gram.shape[0] != n:
                raise ValueError(
                    f"{name}[{i}] has n={gram.shape[0]} examples but {name}[0]"
                    f"{'' if name == 'feats_x' else ' / feats_x'} has n={n}; every layer of a batch must hold "
                    "the same examples"
                )
            grams.append(gram)
        return _centred(grams, n), n

    def update(self, feats_x: list[Tensor], feats_y: list[Tensor] | None = None, *, validate: bool = True) -> None:
        """Add one batch of features: ``feats_x`` (and ``feats_y``) one (n, ...) tensor per layer.

        ``validate=False`` skips the NaN/Inf check of the Grams (shapes are always checked): for callers that
        checked the features already, such as ``vitscope.probe``."""
        xs, _ = as_list(feats_x, "feats_x")
        if len(xs) != self.num_layers_x:
            raise ValueError(f"feats_x has {len(xs)} layers but num_layers_x={self.num_layers_x}")
        ly = self.num_layers_y or self.num_layers_x
        ys = None
        if feats_y is not None:
            ys, _ = as_list(feats_y, "feats_y")
            if len(ys) != ly:
                raise ValueError(f"feats_y has {len(ys)} layers but num_layers_y={ly}")
        elif self.num_layers_y is not None and self.num_layers_y != self.num_layers_x:
            raise ValueError("feats_y is None but num_layers_y differs from num_layers_x; pass feats_y")
        self._check_cross(ys is not None)
        ux, n = self._centred_grams(xs, "feats_x", None, validate)
        uy = ux if ys is None else self._centred_grams(ys, "feats_y", n, validate)[0]
        self._cross = ys is not None
        self._add(ux, uy, n)

    def update_grams(self, grams: list[Tensor], grams_y: list[Tensor] | None = None) -> None:
        """Add one batch given as ``linear_gram`` results: one (n, n) Gram per x layer and, to compare two models
        (``vitscope.compare``), one per y layer of the same n examples (None: the x layers with themselves),
        centred here all at once. For callers that build the Grams layer by layer as the model runs
        (``vitscope.probe``, ``vitscope.compare``), so that no batch of activations is held whole."""
        ly = self.num_layers_y or self.num_layers_x
        if len(grams) != self.num_layers_x or (grams_y is None and ly != self.num_layers_x):
            raise ValueError(f"got {len(grams)} layers but MinibatchCKA compares {self.num_layers_x} layers with "
                             f"{ly}; pass one Gram per layer (and grams_y for the second model)")
        if grams_y is not None and len(grams_y) != ly:
            raise ValueError(f"grams_y has {len(grams_y)} layers but num_layers_y={ly}")
        n = grams[0].shape[-1]
        if any(g.shape != (n, n) for g in [*grams, *(grams_y or [])]):
            raise ValueError(f"every Gram must be ({n}, {n}) like the first: the layers of a batch hold the same "
                             "examples")
        self._check_cross(grams_y is not None)
        u = _centred(grams, n)
        uy = u if grams_y is None else _centred(grams_y, n)
        self._cross = grams_y is not None
        self._add(u, uy, n)

    def _check_cross(self, cross: bool) -> None:
        if self._cross is not None and cross != self._cross:
            raise ValueError(
                "MinibatchCKA: feats_y was " + ("given" if self._cross else "omitted") + " in earlier updates; pass "
                "it in every update or in none (call reset() to start over)"
            )

    def _add(self, ux: Tensor, uy: Tensor, n: int) -> None:
        ly = self.num_layers_y or self.num_layers_x
        zero = torch.zeros((), dtype=torch.float64, device=ux.device)
        if n <= 3:
            warnings.warn(
                f"MinibatchCKA: skipped a batch of n={n} examples (unbiased HSIC needs n > 3); use a larger "
                "batch or drop_last for tiny remainders", RuntimeWarning, stacklevel=3,
            )
            self._accumulate([{
                "hsic_xy": torch.zeros(self.num_layers_x, ly, dtype=torch.float64),
                "hsic_xx": torch.zeros(self.num_layers_x, dtype=torch.float64),
                "hsic_yy": torch.zeros(ly, dtype=torch.float64),
                "batches": zero.cpu(), "examples": zero.cpu(), "skipped": torch.tensor(float(n), dtype=torch.float64),
            }], True)
            return
        scale = 1.0 / (n * (n - 3))
        self._accumulate([{
            "hsic_xy": (ux @ uy.T) * scale,  # (Lx, Ly): all pairs at once
            "hsic_xx": (ux * ux).sum(1) * scale,  # (Lx,)
            "hsic_yy": (uy * uy).sum(1) * scale,  # (Ly,)
            "batches": zero + 1, "examples": zero + n, "skipped": zero,
        }], True)

    def _compute_layer(self, state: dict[str, Tensor]) -> Tensor:
        if state["batches"] == 0:
            raise ValueError("MinibatchCKA: no batch with more than 3 examples was seen; use batches of n > 3")
        xx, yy = state["hsic_xx"], state["hsic_yy"]
        for name, v in (("x", xx), ("y", yy)):
            bad = (v <= 0).nonzero().flatten().tolist()
            if bad:
                raise ValueError(
                    f"MinibatchCKA: layers {bad} of feats_{name} have zero HSIC with themselves (constant "
                    "features across examples): CKA is undefined; drop these layers"
                )
        return state["hsic_xy"] / torch.sqrt(xx[:, None] * yy[None, :])  # (Lx, Ly)

    @property
    def num_examples(self) -> int:
        """Examples used so far (skipped batches excluded)."""
        return 0 if self._states is None else int(self._states[0]["examples"])
