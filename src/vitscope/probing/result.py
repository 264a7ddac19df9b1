"""``ProbeResult``: the per-layer tables of a probe pass, as JSON, CSV, DataFrame or the report's figure."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitscope.io.atomic import atomic_write_json, json_safe, write_csv


@dataclass
class ProbeResult:
    """Per-layer tables of every measure, plus accuracy and NLL of the pass."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> list[dict[str, Any]]:
        return self.tables[name]

    def to_dict(self) -> dict[str, Any]:
        """``{measure: {"rows": [...], ...extras}}``: top-level keys are measure names.

        Non-finite values (e.g. the ratio of norms of a zero-initialised branch) become ``None``.
        """
        return json_safe({name: {"rows": rows, **self.extras.get(name, {})} for name, rows in self.tables.items()})

    def to_pandas(self) -> Any:
        """Tidy ``pandas.DataFrame``: one row per measure, layer, head (or curve index) and statistic
        (``vitscope.notebook.tidy_rows``); CKA's matrix as one row per pair of layers."""
        from vitscope.notebook import frame, tidy_rows

        return frame([r for name, content in self.to_dict().items() for r in tidy_rows(name, content["rows"])])

    def plot(self, measure: str | None = None) -> Any:
        """The report's figure of ``measure`` (default: the first the report draws) as a matplotlib ``Figure``."""
        from vitscope.notebook import report_figure

        return report_figure(str(self.meta.get("model") or "model"), measure, probe=self.to_dict())

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``results.json`` (+ ``meta.json``) and one CSV per measure into ``out_dir``, atomically."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "results.json", self.to_dict())
        atomic_write_json(out / "meta.json", json_safe(self.meta))
        for name, content in self.to_dict().items():
            write_csv(out / f"{name}.csv", content["rows"])
        return out


