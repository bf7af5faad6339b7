"""The app in a real browser: Debian chromium driven by Playwright against `streamlit run app.py`.

Starts a sampling run on the demo model from the Sampling page, checks the sample counter grows
while the page is open, cancels it, then finds the contributions chart on the Shapley page.
Screenshots go to tmp_path (sampling.png, shapley.png).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine.config import DEMO_MODEL_DIR

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (.ci/run installs chromium)"),
    pytest.mark.skipif(not (DEMO_MODEL_DIR / "config.json").is_file(), reason="demo model not built yet"),
    pytest.mark.timeout(600),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"streamlit not healthy after {timeout} s")


@pytest.fixture
def server(tmp_path):
    """URL of `streamlit run app.py` with its own cache; stops it and any sampling it launched."""
    cache = tmp_path / "cache"
    port = _free_port()
    env = {**os.environ, "LAYERPRUNE_CACHE": str(cache), "LAYERPRUNE_THREADS": "1", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc, timeout=120)
        yield url, cache
    finally:
        for launcher in cache.glob("*/jobs/*.json"):  # the CLI jobs this app started
            try:
                os.killpg(json.loads(launcher.read_text())["pid"], signal.SIGTERM)
            except (ProcessLookupError, ValueError, KeyError, OSError):
                pass
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def _metric(page, label: str) -> str:
    box = page.locator("[data-testid='stMetric']").filter(
        has=page.locator("[data-testid='stMetricLabel']", has_text=re.compile(f"^{re.escape(label)}$")))
    return box.locator("[data-testid='stMetricValue']").first.inner_text(timeout=10_000).strip()


def _wait_count(page, above: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            n = int(_metric(page, "samples"))
            if n > above:
                return n
        except Exception:  # the fragment may be mid-redraw, or not shown yet  # noqa: BLE001
            pass
        page.wait_for_timeout(1000)
    raise AssertionError(f"sample counter did not pass {above} within {timeout} s")


def _go(page, title: str) -> None:
    page.locator("[data-testid='stSidebarNav'] a", has_text=title).first.click(timeout=30_000)
    page.locator("h1", has_text=title).first.wait_for(timeout=60_000)


def test_sampling_live_and_shapley_chart(server, tmp_path):
    from playwright.sync_api import sync_playwright

    url, cache = server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url, timeout=60_000)
            page.locator("[data-testid='stApp']").wait_for(timeout=60_000)
            page.locator("h1", has_text="Setup").wait_for(timeout=60_000)

            _go(page, "Sampling")
            masks = page.get_by_label("masks in the run", exact=True)
            masks.fill("4000")  # more than any machine evaluates during the test: it is still running when read
            masks.press("Enter")
            page.wait_for_timeout(1500)
            page.get_by_role("button", name="Start / resume").click()
            first = _wait_count(page, 0, timeout=240)
            second = _wait_count(page, first, timeout=120)  # grows while the page is open
            assert second > first
            page.locator(".js-plotly-plot .scatterlayer .point").first.wait_for(timeout=60_000)  # live scatter
            page.screenshot(path=str(tmp_path / "sampling.png"), full_page=True)
            page.get_by_role("button", name="Cancel").click()
            deadline = time.monotonic() + 120
            while _metric(page, "status") not in ("cancelled", "finished") and time.monotonic() < deadline:
                page.wait_for_timeout(1000)
            assert _metric(page, "status") in ("cancelled", "finished")

            _go(page, "Shapley")
            page.get_by_role("button", name="Compute contributions").click()
            chart = page.locator("[data-testid='stPlotlyChart']").first
            chart.wait_for(timeout=240_000)
            page.locator(".js-plotly-plot .bars").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "shapley.png"), full_page=True)
            assert not page.locator("[data-testid='stException']").count()
        finally:
            browser.close()
