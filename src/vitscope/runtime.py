"""Process-level settings: the device and autocast resolvers, and fast CPU analysis.

``resolve_device`` (a name such as ``auto`` or ``cuda:1``), ``model_device`` (where a model lives) and
``autocast`` (mixed precision or none) are the package's one way to choose where and how it computes.

Capturing activations allocates and frees many tensors of a few MiB per batch. glibc's malloc returns
such blocks to the operating system on free (``mmap``/trim), so every batch pays fresh page faults: on
the project's CPU that made the probe pass 1.55-1.6x a plain forward instead of 1.3x
(``benchmarks/README.md``, "Probe pass"). PyTorch's CPU performance guide recommends an allocator that
keeps freed memory (jemalloc, tcmalloc); ``keep_freed_memory`` is the glibc equivalent, set at run time.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
import warnings

import torch

_logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc malloc.h
_TRIM_THRESHOLD = 2**31 - 1  # keep up to 2 GiB of freed memory at the top of the heap
_MMAP_THRESHOLD = 32 * 2**20  # blocks below 32 MiB (glibc's maximum) come from the reusable heap
_ENV_KEYS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    Process-wide and permanent (glibc offers no way to read the old setting back): resident memory
    stays near its peak instead of shrinking between batches. The ``vitscope`` command line calls this
    at start; in a library session call it yourself when CPU speed matters. Does nothing (and returns
    False) off glibc, when the user already set ``MALLOC_*_THRESHOLD_`` variables, or when
    ``VITSCOPE_KEEP_FREED_MEMORY=0``.

    Returns:
        True when the setting was applied.
    """
    if os.environ.get("VITSCOPE_KEEP_FREED_MEMORY", "1") == "0" or any(k in os.environ for k in _ENV_KEYS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))
    if not ok:
        _logger.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    return ok


def resolve_device(name: str | torch.device | None = "auto", what: str = "device") -> torch.device:
    """The one device resolver: ``auto`` or None is CUDA when available, else CPU; a CUDA device that is not
    there (or not a device at all) is a one-line ``ValueError`` naming ``what`` (e.g. ``--device``)."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{what} {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {name}: torch sees no CUDA device here; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"{what} {name!r}: vitscope runs on cpu or cuda")
    return device


def model_device(model: torch.nn.Module, device: str | torch.device | None = None, move: bool = False) -> torch.device:
    """``device`` when given (``move``: the model is moved there), else the device of the model's first parameter
    (CPU for a model without parameters)."""
    if device is not None:
        device = torch.device(device)
        if move:
            model.to(device)
        return device
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
"""``--amp`` / a run's ``amp`` name -> the dtype ``torch.autocast`` runs in (None: full precision)."""


def amp_name(dtype_name: str) -> str:
    """timm's ``--amp-dtype`` spelling (``bfloat16``, ``float16``) -> vitscope's ``amp`` name (``bf16``, ``fp16``)."""
    return next(k for k, v in AMP_DTYPES.items() if v is not None and str(v) == f"torch.{dtype_name}")


def autocast(device: torch.device | str, amp_dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device``'s type in ``amp_dtype``, or a no-op context for None (full precision)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=amp_dtype)


def check_autocast(device: torch.device | str, amp_dtype: torch.dtype | None) -> None:
    """A one-line ``ValueError`` when this torch cannot autocast to ``amp_dtype`` on ``device`` (float16 on the
    CPU before torch 2.3 or so: ``torch.autocast`` then warns and runs in float32, which would be recorded wrong).

    Tested by what autocast does: a matmul (autocast's lower-precision list on every device) must come out in
    ``amp_dtype``."""
    if amp_dtype is None:
        return
    device = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "not supported, disabling autocast" warning
        with torch.autocast(device.type, dtype=amp_dtype):
            one = torch.ones(1, 1, device=device)  # (1, 1)
            got = torch.mm(one, one).dtype
    if got != amp_dtype:
        name = str(amp_dtype).removeprefix("torch.")
        raise ValueError(f"torch {torch.__version__} cannot autocast to {name} on {device.type}; use bfloat16 "
                         f"(--amp bf16) or a CUDA device")
