"""The curvature figures (``vitscope.reports.render``), written atomically; their JSON goes through
``vitscope.io.atomic.atomic_write_json``."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def save_figure(fig: Any, path: str | Path) -> Path:
    """The figure as PNG (``vitscope.reports.render.save``: atomic), cropped to its content."""
    from vitscope.reports.render import save

    return save(fig, path, dpi=120, bbox_inches="tight")


def plot_spectrum(result: Any, title: str = "") -> Any:
    """Eigenvalue density (KDE) per group, one panel each, with the negative fraction and every value."""
    from vitscope.reports.render import figure

    groups = list(result.eigenvalues)
    fig = figure((5, 0.4 + 2.6 * len(groups)), layout=None)
    axes = fig.subplots(len(groups), 1, squeeze=False)
    for ax, g in zip(axes[:, 0], groups):
        ax.plot(result.grid[g], result.density[g], label=f"{g}: negative {100 * result.negative_fraction[g]:.1f}%")
        ax.plot(result.eigenvalues[g].ravel(), np.zeros(result.eigenvalues[g].size), "|", color="k", alpha=0.5)
        ax.axvline(0.0, color="gray", lw=0.8, ls="--")
        ax.set_ylabel("density")
        ax.legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("Hessian eigenvalue")
    axes[0, 0].set_title(title or "Hessian eigenvalue spectrum")
    fig.tight_layout()
    return fig


def plot_landscape(result: Any, title: str = "") -> Any:
    """1-D loss (and accuracy) curve, or 2-D loss contour."""
    from vitscope.reports.render import figure

    fig = figure((5, 4), layout=None)
    ax = fig.subplots()
    loss = np.where(np.isfinite(result.loss), result.loss, np.nan)
    if result.y is None:
        ax.plot(result.x, loss, "o-", ms=3, label="loss")
        ax.set_xlabel("direction 1")
        ax.set_ylabel("loss")
        if result.accuracy is not None:
            ax2 = ax.twinx()
            ax2.plot(result.x, result.accuracy, "s--", ms=3, color="tab:orange", label="accuracy")
            ax2.set_ylabel("accuracy")
    else:
        cs = ax.contour(result.x, result.y, loss, levels=20)
        ax.clabel(cs, fontsize=6)
        ax.plot([0], [0], "k+")
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
        ax.set_aspect("equal")
    ax.set_title(title or "loss landscape")
    return fig
