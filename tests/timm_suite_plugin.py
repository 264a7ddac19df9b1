"""pytest plugin: run timm's own ``tests/test_models.py``, unchanged, on vitscope's models only.

Usage (the test file comes from timm's source distribution of the installed version)::

    pip download --no-deps --no-binary :all: timm==$(python -c "import timm; print(timm.__version__)")
    tar xzf timm-*.tar.gz
    PYTHONPATH=tests pytest -p timm_suite_plugin timm-*/tests/test_models.py

Importing the plugin imports ``vitscope.models`` before timm's test module is collected, so timm's
module-level ``list_models()`` parametrizations include vitscope's models. Collection then keeps only
the items whose ``model_name`` is a vitscope model; ``VITSCOPE_TIMM_MODELS`` (a shell pattern, e.g.
``test_*``) narrows them further. Tests a model cannot meet by timm's name-based selection are marked
strict xfail with the reason (``KNOWN``).
"""
from __future__ import annotations

import fnmatch
import os

import pytest

import vitscope.models

_PATTERN = os.environ.get("VITSCOPE_TIMM_MODELS", "*")
NAMES = {n for n in vitscope.models.list_models() if fnmatch.fnmatch(n, _PATTERN)}
# Tests that a model cannot meet because of how timm's file selects by name, with the reason. Strict
# xfail: if timm's file changes so that one passes, the run fails and the entry must go.
KNOWN = {
    ("test_model_default_cfgs", "test_convit_32"): (
        "timm's NON_STD_FILTERS list test_vit* but not test_convit*, so this token-output ConViT gets the "
        "NCHW feature-map checks (its pool_size is None, as for timm's convit_*); vitscope's "
        "tests/test_timm_suite.py applies the non-std checks to it"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("model_name") if callspec is not None else None
        (keep if name in NAMES else drop).append(item)
        reason = KNOWN.get((getattr(item, "originalname", item.name), name))
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
