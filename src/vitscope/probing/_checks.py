"""Deferred device-side checks of a probe pass: flags read on the host every few batches, not per layer."""
from __future__ import annotations

import warnings

import torch

from vitscope.capture import Capture
from vitscope.measures._validate import check_attention, memory_order, raise_non_finite


class _DeviceChecks:
    """The probe's checks (NaN/Inf, probability rows, zero norms), kept on the model's device and read once.

    Each check is a 0-d bool tensor (True: failed) with the message it raises; ``end_batch`` folds a batch's
    checks into the first failure so far (device scalars, constant memory), and ``raise_first`` reads them with
    one device-to-host transfer for the whole pass. On a GPU a check read per tensor (``if not finite(t)``) would
    wait for the queue to drain several times per sub-layer and expose the kernel-launch latency in between;
    here no value crosses to the host within the pass. Messages hold ``{b}`` for the batch number.
    """

    def __init__(self) -> None:
        self.flags: list[torch.Tensor] = []
        self.messages: list[tuple[str, str]] = []  # (kind, template): kind "non_finite" or "value"
        self.layouts: list[tuple[int, list[tuple[str, str]]]] = []  # (first batch, messages) when they change
        self.first: torch.Tensor | None = None  # (3,) int64: found, batch, index into that batch's messages
        self.warn: dict[str, torch.Tensor] = {}  # warning -> device bool (raised in any batch)

    def fail_if(self, flag: torch.Tensor, template: str, kind: str = "value") -> None:
        self.flags.append(flag)
        self.messages.append((kind, template))

    def non_finite_if(self, flag: torch.Tensor, template: str) -> None:
        self.fail_if(flag, template, "non_finite")

    def warn_if(self, flag: torch.Tensor, message: str) -> None:
        self.warn[message] = flag if message not in self.warn else self.warn[message] | flag

    def end_batch(self, b: int) -> None:
        if not self.flags:
            return
        if not self.layouts or self.layouts[-1][1] != self.messages:
            self.layouts.append((b, self.messages))
        bad = torch.stack(self.flags)  # (K,) bool
        now = torch.stack([bad.any().long(), torch.full_like(bad, b, dtype=torch.long)[0],
                           bad.to(torch.uint8).argmax().long()])  # (3,) found, batch, first index
        self.first = now if self.first is None else torch.where(self.first[0].bool(), self.first, now)
        self.flags, self.messages = [], []

    def raise_failed(self) -> None:
        """Raise the first failed check so far, if any (one host sync): called every ``_CHECK_EVERY`` batches, so
        a long pass over bad data stops early."""
        if self.first is not None:
            found, b, k = self.first.tolist()
            if found:
                self._raise(b, k)

    def _raise(self, b: int, k: int) -> None:
        kind, template = next(m for first, m in reversed(self.layouts) if first <= b)[k]
        message = template.replace("{b}", str(b))
        if kind == "non_finite":
            raise_non_finite(message)
        raise ValueError(message)

    def raise_first(self) -> None:
        """Raise the first failed check (in pass order); emit the warnings that fired. One host sync."""
        warn = list(self.warn)
        parts = [self.first.cpu()] if self.first is not None else []
        if warn:
            parts.append(torch.stack([self.warn[w] for w in warn]).long().cpu())
        if not parts:
            return
        values = torch.cat([p.flatten() for p in parts]).tolist()
        if self.first is not None:
            found, b, k = values[:3]
            values = values[3:]
            if found:
                self._raise(b, k)
        for message, fired in zip(warn, values):
            if fired:
                warnings.warn(message, RuntimeWarning, stacklevel=4)  # the caller of probe




def _check_attentions(cap: Capture, checks: _DeviceChecks) -> None:
    """Check every captured attention map once (finite, rows are probabilities), so the four attention
    measures can skip their own scans (``validate=False``): the checks stay on the device (``_DeviceChecks``),
    and maps are clamped at 0 in place (a no-op for softmax outputs; round-off below 0, as ``check_attention``).
    """
    for i, (attn, info) in enumerate(zip(cap.attentions, cap.attention_layout)):
        name = f"batch {{b}}: the attention map of {info.name}"
        a = check_attention(attn, name, validate=False, square=False)  # (B, H, N, M); half precision upcast
        tol = 1e-3 if a.dtype in (torch.float32, torch.float64) else 1e-2
        rows = a.sum(-1)  # (B, H, N); NaN/Inf anywhere in a row shows here
        checks.non_finite_if(~torch.isfinite(rows).all(), name)
        dev, low = (rows - 1).abs().amax(), a.amin()
        checks.fail_if((dev > tol) | (low < -tol),
                       f"{name} rows must be probabilities summing to 1 (max deviation above {tol:g} or an entry "
                       f"below {-tol:g}); pass post-softmax attention maps, not logits")
        # in place (the forward is done with the map; no new memory) unless the map is not a plain dense tensor
        cap.attentions[i] = a.clamp_min_(0) if a is not attn or a.is_contiguous() else a.clamp_min(0)




def _not_finite(t: torch.Tensor) -> torch.Tensor:
    """0-d bool on t's device: whether t holds a NaN or Inf (min and max of one pass: NaN propagates, an Inf
    is the min or the max; exact, unlike a sum, which large finite values can overflow). Read in memory order:
    min and max do not depend on it, and a strided scan of a channels-last map costs ~9x more."""
    low, high = torch.aminmax(memory_order(t))
    return ~(torch.isfinite(low) & torch.isfinite(high))


def _same(t: torch.Tensor) -> tuple:
    """What identifies a captured tensor's values (detached copies of one tensor are distinct objects)."""
    return t.data_ptr(), t.dtype, tuple(t.shape), t.stride()


