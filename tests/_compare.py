"""Shared test helper: nested results (dicts, lists, numbers) equal to float round-off."""
from __future__ import annotations

import pytest


def assert_close_tree(a, b, path: str = "") -> None:
    """Nested dicts/lists/tuples equal, floats to rel 1e-6 (abs 1e-9), everything else exactly; ``path``
    names the first difference."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_close_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-6, abs=1e-9), path
    else:
        assert a == b, path
