"""Calibration of softmax confidences: NLL, top-1/5, Brier, ECE and the reliability diagram (HDVW).

HDVW (Park & Kim 2022) report NLL, Brier score and the expected calibration error over 10 equal-width
confidence bins, ``ECE = sum_b (n_b / N) |acc_b - conf_b|`` (Guo et al. 2017). Conventions here:

- Bins are ``[k/n, (k+1)/n)`` with the LAST bin closed on the right, so a confidence of exactly 1.0
  is counted in bin ``n - 1`` (torchmetrics sends it to a hidden extra bin and drops it).
- Brier score is the multi-class sum over classes, ``mean_i sum_c (p_ic - y_ic)^2`` (Brier 1950; HDVW's
  ``ops/tests.py``), in [0, 2].
- Signed ECE is ``sum_b (n_b / N) (conf_b - acc_b)``: positive means over-confident (HDVW's "ECE±").
- Adaptive ECE uses equal-mass bins: examples sorted by confidence (ties broken by correctness, so the
  result does not depend on the order of the data) and split like ``numpy.array_split``.
- Top-5 is top-``min(5, C)`` accuracy (1.0 for fewer than 5 classes).

``Calibration`` is a streaming measure (``vitscope.measures.StreamingMeasure``): its state is float64 sums
(per-bin counts, correct counts, confidence sums, NLL and Brier sums), so batches and ranks merge by summation
(``merge`` / ``sync``). Adaptive ECE needs the confidences themselves: up to ``max_stored`` (confidence,
correct) pairs are kept (16 bytes each); beyond that a uniform random subset of that size is kept (bottom-k
sampling on seeded random keys, which is also mergeable: ``sync`` gathers the ranks' subsets) and
``adaptive_ece_exact`` is reported False. ``max_stored=0`` keeps none (adaptive ECE is then None).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from vitscope.measures._streaming import StreamingMeasure

_logger = logging.getLogger(__name__)

__all__ = ["Calibration", "calibration"]


def _check_inputs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError("logits and targets must be torch tensors")
    if logits.ndim != 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a float tensor of shape (batch, num_classes), got {tuple(logits.shape)} "
            f"{logits.dtype}; pass raw model outputs, not predicted labels"
        )
    if targets.ndim != 1 or targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must be an integer tensor of shape (batch,), got {tuple(targets.shape)} {targets.dtype}"
        )
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"mismatched label count: {logits.shape[0]} rows of logits but {targets.shape[0]} targets"
        )
    num_classes = logits.shape[1]
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"targets must lie in [0, {num_classes - 1}] for {num_classes} classes, got range "
            f"[{int(targets.min())}, {int(targets.max())}]; is the model's head sized for this dataset?"
        )
    if not torch.isfinite(logits).all():
        raise ValueError("logits contain NaN or inf; check the model and its checkpoint")
    return logits.detach(), targets.detach().to(device=logits.device, dtype=torch.long)


class Calibration(StreamingMeasure):
    """Streaming calibration metrics (HDVW): ``update(logits, targets)`` per batch, then ``compute()``.

    Args:
        n_bins: number of equal-width confidence bins (and of equal-mass bins for adaptive ECE).
        max_stored: most (confidence, correct) pairs kept for adaptive ECE; ``None`` keeps all, 0 none.
        seed: seed of the random keys used to subsample beyond ``max_stored`` (give each rank its own).
    """

    def __init__(self, n_bins: int = 10, max_stored: int | None = 4_000_000, seed: int = 0) -> None:
        if int(n_bins) != n_bins or n_bins < 1:
            raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
        if max_stored is not None and max_stored < 0:
            raise ValueError(f"max_stored must be >= 0 or None, got {max_stored!r}")
        self.n_bins = int(n_bins)
        self.max_stored = max_stored
        self.seed = seed
        # Edges k / n_bins exactly (correctly rounded), not linspace's start + k * step.
        self.edges = torch.arange(self.n_bins + 1, dtype=torch.float64) / self.n_bins  # (n_bins + 1,)
        super().__init__()

    def reset(self) -> None:
        """Forget every update."""
        super().reset()
        self.n_seen_stored = 0  # examples offered to the adaptive-ECE store
        self._gen = torch.Generator().manual_seed(self.seed)
        # Stored (key, confidence, correct) chunks, compacted lazily (amortized linear cost).
        self._chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._n_chunked = 0

    def _options(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins, "max_stored": self.max_stored}

    @property
    def n(self) -> int:
        """Examples seen so far."""
        return 0 if self._states is None else int(self._states[0]["n"])

    @torch.no_grad()
    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: ``logits`` (B, C) raw outputs, ``targets`` (B,) class indices."""
        logits, targets = _check_inputs(logits, targets)
        if logits.shape[0] == 0:
            return
        logp = F.log_softmax(logits.double(), dim=1)  # (B, C)
        probs = logp.exp()  # (B, C)
        conf, pred = probs.max(dim=1)  # (B,), (B,)
        hit = pred == targets  # (B,)
        k = min(5, logits.shape[1])
        top5 = (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1)  # (B,)
        p_true = probs.gather(1, targets[:, None]).squeeze(1)  # (B,)
        brier = (probs * probs).sum(dim=1) - 2.0 * p_true + 1.0  # (B,) sum_c (p_c - y_c)^2

        # Bin k holds [edge_k, edge_{k+1}); confidences equal to 1.0 fall into the last bin.
        inner = self.edges[1:-1].to(conf.device)
        idx = torch.bucketize(conf, inner, right=True)  # (B,) in [0, n_bins - 1]
        self._accumulate([{
            "count": torch.bincount(idx, minlength=self.n_bins).double(),  # (n_bins,) examples per bin
            "correct": torch.bincount(idx, weights=hit.double(), minlength=self.n_bins),  # (n_bins,) top-1 hits
            "conf_sum": torch.bincount(idx, weights=conf, minlength=self.n_bins),  # (n_bins,) confidences
            "nll": -logp.gather(1, targets[:, None]).sum(),
            "brier": brier.sum(),
            "top5": top5.double().sum(),
            "n": torch.tensor(float(logits.shape[0]), dtype=torch.float64, device=logits.device),
        }], True)
        if self.max_stored != 0:
            self._store(conf.cpu(), hit.cpu())

    def _store(self, conf: torch.Tensor, hit: torch.Tensor) -> None:
        self.n_seen_stored += conf.numel()
        keys = torch.rand(conf.numel(), generator=self._gen, dtype=torch.float64)
        self._add_chunks([(keys, conf, hit)])

    def _add_chunks(self, chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        self._chunks += chunks
        self._n_chunked += sum(c[0].numel() for c in chunks)
        if self.max_stored is not None and self._n_chunked > 2 * self.max_stored:
            self._compact()

    def _compact(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Concatenate the chunks, keeping the ``max_stored`` smallest keys (a uniform random subset)."""
        if not self._chunks:
            empty = torch.empty(0, dtype=torch.float64)
            return empty, empty, torch.empty(0, dtype=torch.bool)
        keys, conf, hit = (torch.cat(parts) for parts in zip(*self._chunks))
        if self.max_stored is not None and keys.numel() > self.max_stored:
            keep = keys.topk(self.max_stored, largest=False).indices  # bottom-k sampling
            keys, conf, hit = keys[keep], conf[keep], hit[keep]
        self._chunks = [(keys, conf, hit)]
        self._n_chunked = keys.numel()
        return keys, conf, hit

    def state_dict(self) -> dict[str, Any]:
        """The additive sums (``StreamingMeasure.state_dict``) plus the adaptive-ECE store."""
        return {**super().state_dict(), "stored": (self.n_seen_stored, self._compact())}

    def merge(self, other: Calibration | dict[str, Any]) -> Calibration:
        """Add another instance's state (e.g. from another rank) into this one; returns self."""
        state = other.state_dict() if isinstance(other, Calibration) else other
        super().merge(state)
        seen, chunk = state.get("stored", (0, None))
        if chunk is not None and chunk[0].numel():
            self.n_seen_stored += seen
            self._add_chunks([chunk])
        return self

    def sync(self, group: Any = None) -> Calibration:
        """Sum the states over all ranks (``StreamingMeasure.sync``) and gather their adaptive-ECE stores (a rank
        that saw no batch takes part with zeros). No-op when ``torch.distributed`` is not initialized."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self._states is None and not self._synced:  # no batch here: zero sums on the backend's device
            device = (torch.device("cuda", torch.cuda.current_device())  # as the other ranks' (CUDA) sums
                      if "nccl" in str(dist.get_backend(group)) else torch.device("cpu"))
            zeros = torch.zeros(self.n_bins, dtype=torch.float64, device=device)
            scalar = torch.zeros((), dtype=torch.float64, device=device)
            self._accumulate([{"count": zeros, "correct": zeros, "conf_sum": zeros, "nll": scalar,
                               "brier": scalar, "top5": scalar, "n": scalar}], True)
        super().sync(group)
        if self.max_stored != 0:
            parts: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(parts, (self.n_seen_stored, self._compact()), group=group)
            self._chunks, self._n_chunked, self.n_seen_stored = [], 0, 0
            for seen, chunk in parts:
                self.n_seen_stored += seen
                self._add_chunks([chunk])
        return self

    def _adaptive_ece(self) -> tuple[float | None, int]:
        _, conf, hit = self._compact()
        m = conf.numel()
        if m == 0:  # nothing stored (max_stored=0)
            return None, 0
        order = torch.sort(hit.to(torch.uint8), stable=True).indices  # tie-break on correctness
        order = order[torch.sort(conf[order], stable=True).indices]  # (M,) by confidence
        conf, hit = conf[order], hit[order].double()
        total = 0.0
        for c_bin, h_bin in zip(torch.tensor_split(conf, self.n_bins), torch.tensor_split(hit, self.n_bins)):
            if c_bin.numel():
                total += abs(float(h_bin.sum()) - float(c_bin.sum()))
        return total / m, m

    def compute(self) -> dict[str, Any]:
        """The metrics so far, as a flat dict of floats plus the ``reliability`` table (one row per bin).

        Empty bins have ``accuracy`` and ``confidence`` None and contribute nothing to ECE.
        """
        if self.n == 0:
            raise ValueError("Calibration has no examples: call update(logits, targets) first")
        return super().compute()

    def _compute_layer(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        s = {k: v.cpu() for k, v in state.items()}
        n = float(s["n"])
        count = s["count"]  # (n_bins,) float64, whole numbers
        nonempty = count > 0
        acc_b = torch.where(nonempty, s["correct"] / count.clamp(min=1), torch.zeros_like(count))
        conf_b = torch.where(nonempty, s["conf_sum"] / count.clamp(min=1), torch.zeros_like(count))
        gap = conf_b - acc_b  # (n_bins,)
        weight = count / n
        adaptive_ece, n_stored = self._adaptive_ece()
        table = [
            {
                "bin": b,
                "lower": float(self.edges[b]),
                "upper": float(self.edges[b + 1]),
                "count": int(count[b]),
                "accuracy": float(acc_b[b]) if nonempty[b] else None,
                "confidence": float(conf_b[b]) if nonempty[b] else None,
            }
            for b in range(self.n_bins)
        ]
        return {
            "n": int(n),
            "nll": float(s["nll"]) / n,
            "top1": float(s["correct"].sum().round()) / n,
            "top5": float(s["top5"]) / n,
            "brier": float(s["brier"]) / n,
            "ece": float((weight * gap.abs()).sum()),
            "signed_ece": float((weight * gap).sum()),
            "mce": float(gap.abs()[nonempty].max()),
            "adaptive_ece": adaptive_ece,
            "adaptive_ece_exact": self.max_stored != 0 and self.n_seen_stored == n_stored,
            "mean_confidence": float(s["conf_sum"].sum()) / n,
            "n_bins": self.n_bins,
            "reliability": table,
        }


def calibration(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 10) -> dict[str, Any]:
    """Calibration metrics of one set of logits (B, C) against targets (B,); see ``Calibration``."""
    metric = Calibration(n_bins=n_bins, max_stored=None)
    metric.update(logits, targets)
    return metric.compute()
