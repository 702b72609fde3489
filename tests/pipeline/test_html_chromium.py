"""The HTML report renders in a real headless Chromium: every section laid out, every plot decoded.

Skipped (not failed) where no Chromium is installed; CI installs Debian's ``chromium`` package.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.report import write_report
from pipeline.report.html_page import SECTION_IDS
from tests.support.report import build_dataset

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine")

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]

# Test-only instrumentation appended to a copy of the page: after load, record each section's
# rendered height, so the dumped DOM tells whether the sections were really laid out.
MEASURE = """<script>
window.addEventListener('load', function () {
  var ids = %s;
  document.body.setAttribute('data-heights', ids.map(function (id) {
    var el = document.getElementById(id);
    return id + ':' + (el ? Math.round(el.getBoundingClientRect().height) : -1);
  }).join(','));
});
</script>"""


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="sftkit-chromium-") as profile:
        return subprocess.run(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="module")
def report(tmp_path_factory, bpe_tokenizer, bpe_tokenizer_path) -> Path:
    root = tmp_path_factory.mktemp("chromium")
    dataset = build_dataset(root / "prepared", bpe_tokenizer, bpe_tokenizer_path)
    return write_report(dataset.path, root / "report.html")


def test_report_renders_every_section_with_loaded_images(report, tmp_path):
    page = report.read_text(encoding="utf-8")
    measured = tmp_path / "measured.html"
    measured.write_text(page.replace("</body>", MEASURE % list(SECTION_IDS) + "</body>"), encoding="utf-8")
    result = chromium("--virtual-time-budget=5000", "--dump-dom", measured.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    images = re.search(r'data-images="(\d+)/(\d+)"', body)
    assert images, body
    assert images.group(1) == images.group(2) and int(images.group(2)) >= 4
    assert 'data-images-loaded="all"' in body
    heights = dict(item.split(":") for item in re.search(r'data-heights="([^"]+)"', body).group(1).split(","))
    for section in SECTION_IDS:
        assert int(heights[section]) > 40, f"section {section!r} has no height: {heights}"


def test_screenshot_shows_the_page(report, tmp_path):
    import matplotlib.image as mpimg

    shot = tmp_path / "report.png"
    result = chromium("--window-size=1280,5000", f"--screenshot={shot}", report.as_uri())
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    pixels = (mpimg.imread(shot)[..., :3] * 255).round().astype(np.int16)
    assert pixels.shape[:2] == (5000, 1280)

    def share_near(rgb: tuple[int, int, int]) -> float:
        return float((np.abs(pixels - np.array(rgb)).max(axis=-1) <= 6).mean())

    assert share_near((0x11, 0x18, 0x27)) > 0.01  # the dark header band
    assert share_near((0xC9, 0xF2, 0xD0)) > 0.0005  # trained-token highlight in the examples
    assert share_near((0xDC, 0x26, 0x26)) > 0.0005  # the rejected-reasons bar chart
    assert share_near((0x16, 0xA3, 0x4A)) > 0.0005  # the response-length histogram
