"""report.html of `ncguard audit` is self-contained and renders in a real browser (headless Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from ncguard.audit import AuditOptions, run_audit


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when missing and root, else the test is skipped."""
    path = find_chromium()
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"], capture_output=True, timeout=900)
        path = find_chromium()
    if path is None:
        pytest.skip("headless Chromium is not installed and could not be installed here (apt-get install chromium)")
    return path


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


@pytest.fixture(scope="module")
def report(digits_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit-report") / "out"
    run_audit(digits_model_path, ["digits:test", "digits:train"], out, AuditOptions(shard_rows=500, quiet=True))
    return out / "report.html"


def test_report_is_self_contained(report):
    text = report.read_text()
    parser = _Collect()
    parser.feed(text)
    tags = parser.tags
    images = [attrs for tag, attrs in tags if tag == "img"]
    assert len(images) >= 2 + 20  # histogram, per-class plot, and the most-OOD thumbnails
    assert all(attrs["src"].startswith("data:image/png;base64,") for attrs in images)
    assert not [tag for tag, _ in tags if tag in ("script", "link", "iframe")]
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:|//)", text)
    for heading in ("Drift against the reference", "OOD score histogram", "Per class", "Most out-of-distribution rows"):
        assert heading in text


def test_report_renders_in_headless_chromium(report, chromium, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,2400", f"--screenshot={shot}", report.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert shot.is_file(), result.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (2400, 1200)
    not_white = (pixels < 240).any(axis=2)
    assert not_white.mean() > 0.03  # text, tables, plots: not a blank page
    colours = np.unique(pixels.reshape(-1, 3)[::7], axis=0)
    assert len(colours) > 100  # antialiased text and plots, not a flat error page
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 110) & (pixels[..., 2] < 110)
    assert red.sum() > 500  # the audited-rows bars of the histogram (#c04040) were drawn
    shutil.copy(shot, report.parent / "report-screenshot.png")
