"""Helpers shared by several test modules."""
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


def one_line_error(capsys, argv: list[str], *patterns: str) -> str:
    """``vitscope ARGV`` exits 2 with one stderr line (no traceback) containing every pattern; returns it."""
    from vitscope.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for pattern in patterns:
        assert pattern in err, err
    return err
