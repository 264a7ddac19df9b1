"""Every number and the output path checked before any work, for every command (one table, one pass).

``check_args(args)`` runs in ``vitscope.cli.main`` right after parsing: every float an option holds (argparse takes
``nan`` and ``inf``) must be finite, each option in ``RULES`` must be in its range (and an integer where it must
be), and ``--out`` must be a place this process can write (tried, not guessed: a temporary directory is made and
removed there). A violation is one ``CLIError`` line naming the option, what it must be and what it got.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitscope.cli import CLIError

__all__ = ["Number", "RULES", "check_args", "check_numbers", "check_writable"]


@dataclass(frozen=True)
class Number:
    """A numeric option's range: ``low`` / ``high`` bounds (``None``: unbounded), open or closed, integer or not."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def admits(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.integer and not float(value).is_integer():
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else f"{x:g}"

        if self.integer and self.low == 1 and not self.low_open and self.high is None:
            return "a positive integer"  # the wording of the commands' own checks
        kind = "an integer" if self.integer else "a finite number"
        if self.low is not None and self.high is not None:
            return (f"{kind} in {'(' if self.low_open else '['}{num(self.low)}, {num(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{kind} {'>' if self.low_open else '>='} {num(self.low)}"
        if self.high is not None:
            return f"{kind} {'<' if self.high_open else '<='} {num(self.high)}"
        return kind


POSITIVE_INT = Number(low=1, integer=True)
COUNT = Number(low=0, integer=True)
POSITIVE = Number(low=0, low_open=True)
NON_NEGATIVE = Number(low=0)
FRACTION = Number(low=0, high=1)  # [0, 1]
SEED = Number(low=0, high=2**32 - 1, integer=True)  # numpy's seeds

# Options of every command that has them (add_model_options and its kin).
COMMON: dict[str, Number] = {
    "batch_size": POSITIVE_INT, "workers": COUNT, "img_size": POSITIVE_INT, "seed": SEED,
    "crop_pct": Number(low=0, high=1, low_open=True), "max_batches": POSITIVE_INT, "batches": POSITIVE_INT,
}

# Per command (they override COMMON's entry of the same name).
RULES: dict[str, dict[str, Number]] = {
    "hessian": {"k": POSITIVE_INT, "tol": Number(low=0, high=1, low_open=True, high_open=True),
                "max_iter": POSITIVE_INT, "weight_decay": NON_NEGATIVE, "mixup": NON_NEGATIVE,
                "cutmix": NON_NEGATIVE, "memory_budget": POSITIVE_INT},
    "landscape": {"steps": Number(low=2, integer=True), "span": POSITIVE, "weight_decay": NON_NEGATIVE},
    "robustness": {"eps": NON_NEGATIVE, "pgd_steps": POSITIVE_INT, "pgd_alpha": POSITIVE, "freqs": FRACTION,
                   "freq_eps": POSITIVE, "freq_width": Number(low=0, high=1, low_open=True),
                   "severities": Number(low=1, high=5, integer=True), "n_bins": POSITIVE_INT,
                   "occlusion_fraction": Number(low=0, high=1, low_open=True)},
    "attention": {"num_images": POSITIVE_INT, "discard_ratio": Number(low=0, high=1, high_open=True),
                  "query": COUNT},
    "compare": {"ridge": POSITIVE},
    "probe": {"ridge": POSITIVE},
    "demo": {"threads": POSITIVE_INT},
    "report": {"workers": POSITIVE_INT},
    "reproduce": {"seeds": POSITIVE_INT, "epochs": POSITIVE_INT, "max_examples": POSITIVE_INT},
    "train": {"resume_epoch": COUNT},
}

# Commands whose --out is a file (its folder must be writable); for the others it is a directory.
_OUT_IS_FILE = {"report"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_numbers(args: argparse.Namespace, rules: dict[str, Number]) -> None:
    """Every float option finite; each option in ``rules`` (set, not None) within its range; else a CLIError."""
    for name, value in vars(args).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise CLIError(f"{_flag(name)} must be a finite number, got {v}")
    for name, rule in rules.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if not rule.admits(v):
                shown = ",".join(str(x) for x in value) if isinstance(value, (list, tuple)) else value
                raise CLIError(f"{_flag(name)} must be {rule.describe()}"
                               f"{' (each of them)' if isinstance(value, (list, tuple)) else ''}, got {shown}")


def check_writable(out: str | os.PathLike, is_file: bool = False, flag: str = "--out") -> Path:
    """``out`` (a directory, or with ``is_file`` a file) can be created and written by this process: a
    temporary directory is made and removed in its nearest existing folder. Returns the path."""
    path = Path(out).expanduser()
    if is_file and path.is_dir():
        raise CLIError(f"{flag} {out} is a directory; {flag} names the file to write")
    if not is_file and path.exists() and not path.is_dir():
        raise CLIError(f"{flag} {out} is an existing file; {flag} names an output directory: choose another path")
    folder = (path.parent if is_file else path).absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise CLIError(f"{flag} {out}: {folder} is a file, so no directory can be made under it; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".vitscope-write-test-", dir=folder))
    except OSError as err:
        raise CLIError(f"{flag} {out}: cannot write under {folder} ({err.strerror or type(err).__name__}); choose "
                       "a writable path") from None
    return path


def check_args(args: argparse.Namespace) -> None:
    """The checks of this module for the parsed ``args`` of ``args.command``, before the command runs."""
    command = getattr(args, "command", None) or ""
    check_numbers(args, {**COMMON, **RULES.get(command, {})})
    out = getattr(args, "out", None) or (getattr(args, "resume", None) if command == "train" else None)
    if isinstance(out, str) and out:
        check_writable(out, is_file=command in _OUT_IS_FILE)
