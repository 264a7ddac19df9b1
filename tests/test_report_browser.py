"""vitscope report in a real browser: headless Chromium loads the page from disk with networking disabled,
every embedded figure decodes (the page's own load script checks naturalWidth > 0), no script error, and a
screenshot renders. A page with one corrupted image must fail the same check."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import vitscope
from vitscope.reports import build_report

CHROMIUM = next((p for p in (os.environ.get("VITSCOPE_CHROMIUM"), shutil.which("chromium"),
                             shutil.which("chromium-browser"), shutil.which("google-chrome")) if p), None)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium found (install it: apt-get install -y chromium, or set VITSCOPE_CHROMIUM)")


def _chromium(tmp_path: Path, page: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--enable-logging=stderr", "--v=0",
            f"--user-data-dir={tmp_path / 'chromium-profile'}", *extra, page.resolve().as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def _body(dom: str) -> dict[str, str]:
    tag = re.search(r"<body([^>]*)>", dom)
    assert tag, f"no <body> in the dumped DOM: {dom[:300]!r}"
    return dict(re.findall(r'(data-[a-z-]+)="([^"]*)"', tag.group(1)))


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(TensorDataset(torch.rand(10, 3, 32, 32, generator=g), torch.randint(0, 10, (10,), generator=g)),
                        batch_size=5)
    result = vitscope.probe(vitscope.create_model("test_vit_cb").eval(), loader,
                            ["attention_entropy", "attention_distance", "cka", "fourier"], progress=False)
    result.meta["model_name"] = "test_vit_cb"
    result.save(root / "probe")
    (root / "curv").mkdir()
    eigenvalues = [[-0.5, 1.0, 3.0], [0.2, 2.0]]
    (root / "curv" / "hessian.json").write_text(json.dumps({"model": "m", "eigenvalues": eigenvalues}))
    (root / "curv" / "landscape.json").write_text(json.dumps({"x": [-1, 0, 1], "y": [-1, 0, 1],
                                                              "loss": [[3, 2, 3], [2, 1, 2], [3, 2, 3]]}))
    return build_report([root / "probe", root / "curv"], root / "out" / "report.html")


def test_every_figure_loads_in_chromium(page, tmp_path):
    n_img = page.read_text().count("<img")
    assert n_img == 7  # entropy, distance, CKA, fourier, fourier curves, hessian, landscape
    run = _chromium(tmp_path, page, "--dump-dom")
    assert run.returncode == 0, run.stderr[-2000:]
    body = _body(run.stdout)
    assert body.get("data-images-ok") == "true", body
    assert body["data-images"] == str(n_img) and body["data-broken-images"] == "0"
    assert "Uncaught" not in run.stderr and "ERR_FILE_NOT_FOUND" not in run.stderr


def test_a_broken_image_is_caught(page, tmp_path):
    """The check can fail: corrupt one embedded PNG and the page reports exactly one broken image."""
    html = page.read_text()
    start = html.index("base64,") + len("base64,")
    broken = tmp_path / "broken.html"
    broken.write_text(html[:start] + "AAAA" + html[start + 400:])
    body = _body(_chromium(tmp_path, broken, "--dump-dom").stdout)
    assert body.get("data-images-ok") == "false" and body["data-broken-images"] == "1", body


def test_screenshot_renders(page, tmp_path):
    shot = tmp_path / "shot.png"
    run = _chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1280,4000", "--hide-scrollbars")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1280, 4000)
    assert len(data) > 50_000  # figures rendered, not a blank page
