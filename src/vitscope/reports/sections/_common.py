"""What every report section shares: the figure item, the section, and small helpers over result rows."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from matplotlib.figure import Figure

from vitscope.reports.captions import Caption

MSA_KINDS = ("msa", "gpsa")
TRAIN_PROBE_LABELS = {
    "attention_entropy": "attention entropy (nats)",
    "attention_distance": "mean attention distance (pixels)",
    "nonlocality": "nonlocality (patches)",
    "gpsa_gates": "gate sigmoid(λ)",
}


class _Missing(Exception):
    """The data of a figure is present but holds no finite value: the figure is skipped with a note."""


@dataclass
class FigureItem:
    key: str
    caption: Caption
    figure: Figure
    rows: list[dict[str, Any]]
    note: str = ""


@dataclass
class Section:
    title: str
    slug: str
    path: str = ""
    files: list[str] = field(default_factory=list)
    items: list[FigureItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def slug(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "model"


def _mean(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return sum(v) / len(v) if v else None


def _heads(row: dict[str, Any]) -> list[float | None]:
    h = row.get("heads")
    return list(h) if isinstance(h, list) and h else [row.get("value")]


def _check_values(rows: list[dict[str, Any]], key: str = "value") -> None:
    if rows and all(r.get(key) is None for r in rows):
        raise _Missing(f"every {key!r} is missing (non-finite in the probe output)")
