"""The app in a real browser: Debian chromium driven by Playwright against `streamlit run app.py`.

Walks the whole flow on the demo model: sampling (live counter, cancel, resume), fit, contributions,
decide, export and summary, each started from its page as a background CLI job; checks that what
the pages show agrees with the export, that a reload finds every result, and that the idle server
costs under 5% of a core; computes the interaction heatmap on the Interactions page. Screenshots go to
tmp_path (sampling.png, prune.png, summary.png, interactions.png).
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
        yield url, cache, proc.pid
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


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_metric(page, label: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return _metric(page, label)
        except Exception:  # not drawn yet: a background job is still running  # noqa: BLE001
            page.wait_for_timeout(1000)
    raise AssertionError(f"metric {label!r} did not appear within {timeout} s")


def _number(page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_timeout(1500)


def test_the_whole_flow_in_a_browser(server, tmp_path):
    """Setup -> sample (live, then done) -> fit -> contributions -> decide -> export -> summary; the shown k,
    removed set and export agree; after a reload the stored results are shown without recomputing;
    the idle server uses under 5% of a core."""
    from playwright.sync_api import sync_playwright

    url, cache, server_pid = server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(url, timeout=60_000)
            page.locator("[data-testid='stApp']").wait_for(timeout=60_000)
            page.locator("h1", has_text="Setup").wait_for(timeout=60_000)

            _go(page, "Sampling")
            _number(page, "masks in the run", 4000)  # more than any machine evaluates here: still running
            page.get_by_role("button", name="Start / resume").click()
            first = _wait_count(page, 0, timeout=240)
            assert _wait_count(page, first, timeout=120) > first  # grows while the page is open
            page.get_by_role("button", name="Cancel").click()
            deadline = time.monotonic() + 120
            while _metric(page, "status") != "cancelled" and time.monotonic() < deadline:
                page.wait_for_timeout(1000)
            assert _metric(page, "status") == "cancelled"
            _number(page, "masks in the run", 48)  # resume: the first 48 masks of the same sample
            page.get_by_role("button", name="Start / resume").click()
            page.wait_for_timeout(3000)
            deadline = time.monotonic() + 300
            while _metric(page, "status") != "finished" and time.monotonic() < deadline:
                page.wait_for_timeout(1000)
            assert int(_metric(page, "samples")) >= 48
            page.locator(".js-plotly-plot .scatterlayer .point").first.wait_for(timeout=60_000)
            page.screenshot(path=str(tmp_path / "sampling.png"), full_page=True)

            _go(page, "Surrogate")
            page.get_by_role("button", name="Fit").click()
            assert float(_wait_metric(page, "held-out R²")) <= 1.0

            _go(page, "Shapley")
            page.get_by_role("button", name="Compute contributions").click()
            page.locator(".js-plotly-plot .bars").first.wait_for(timeout=300_000)

            _go(page, "Prune & export")
            _number(page, "layers to remove", 2)
            page.get_by_role("button", name="Decide").click()
            measured = float(_wait_metric(page, "measured, 2 removed"))
            chosen = page.get_by_text(re.compile(r"Chosen for k = 2: remove layers")).first.inner_text()
            removed = [int(x) for x in re.search(r"layers ([\d, ]+)", chosen).group(1).replace(" ", "").split(",") if x]
            assert len(removed) == 2
            out = tmp_path / "export"
            field = page.get_by_label("export folder (must be empty or new)", exact=True)
            field.fill(str(out))
            field.press("Enter")
            page.wait_for_timeout(1500)
            page.get_by_role("button", name="Export pruned model").click()
            page.get_by_text(re.compile(r"exported to .*reload check: passed")).wait_for(timeout=300_000)
            manifest = json.loads((out / "pruning_manifest.json").read_text())
            assert manifest["removed_layers"] == removed  # the export is the set on screen
            assert manifest["perplexities"]["calibration"]["after"] == pytest.approx(measured, rel=1e-3)
            page.screenshot(path=str(tmp_path / "prune.png"), full_page=True)

            _go(page, "Summary")
            page.get_by_role("button", name="Build summary").click()
            assert _wait_metric(page, "layers removed") == "2 of 16"
            page.screenshot(path=str(tmp_path / "summary.png"), full_page=True)
            assert not page.locator("[data-testid='stException']").count()

            _go(page, "Interactions")
            page.get_by_role("button", name="Compute interactions").click()
            page.locator(".js-plotly-plot .heatmaplayer").first.wait_for(timeout=240_000)  # the interaction map
            page.screenshot(path=str(tmp_path / "interactions.png"), full_page=True)
            assert not page.locator("[data-testid='stException']").count()

            shared = page.url  # the URL names the run and the settings on screen (engine.session)
            assert "run=" in shared and "k=2" in shared, shared
            page.goto(url)  # a new session without the link: it opens on the latest run with its stored settings
            page.locator("h1", has_text="Setup").wait_for(timeout=60_000)
            _go(page, "Prune & export")  # no input touched, no click: the stored decision is shown
            assert float(_wait_metric(page, "measured, 2 removed", timeout=60)) == pytest.approx(measured, rel=1e-6)
            _go(page, "Summary")
            assert _wait_metric(page, "layers removed") == "2 of 16"
            _go(page, "Shapley")
            page.locator(".js-plotly-plot .bars").first.wait_for(timeout=60_000)  # no Compute click
            _go(page, "Sampling")
            assert page.get_by_label("masks in the run", exact=True).input_value() == str(int(_metric(page, "samples")))
            tab = browser.new_page(viewport={"width": 1400, "height": 1000})  # a second tab on the shared link
            tab.set_default_timeout(60_000)
            tab.goto(shared, timeout=60_000)
            tab.locator("[data-testid='stApp']").wait_for(timeout=60_000)
            _go(tab, "Summary")
            assert _wait_metric(tab, "layers removed") == "2 of 16"
            tab.screenshot(path=str(tmp_path / "summary-new-tab.png"), full_page=True)
            tab.close()

            _go(page, "Sampling")
            page.wait_for_timeout(3000)
            cpu = _cpu_seconds(server_pid)
            page.wait_for_timeout(20_000)
            assert (_cpu_seconds(server_pid) - cpu) / 20 < 0.05  # idle on the Sampling page: under 5% of a core
        finally:
            browser.close()


def test_a_deep_link_as_the_servers_first_request_goes_through_the_app(server):
    """A fresh server whose first request is /summary (a shared link) still runs app.py's navigation: the
    sidebar lists the app's pages by title, not the files of pages/ (streamlit's legacy mode would run
    pages/summary.py alone, list `_ui` as a page and skip the restored session)."""
    from playwright.sync_api import sync_playwright

    url, _, _ = server
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/summary", timeout=60_000)
            page.locator("h1", has_text="Summary").first.wait_for(timeout=60_000)
            nav = page.locator("[data-testid='stSidebarNav'] a")
            nav.first.wait_for(timeout=30_000)
            titles = [t.strip().splitlines()[-1].strip() for t in nav.all_inner_texts()]  # after the icon
            assert "Setup" in titles and "Prune & export" in titles, titles
            assert not {"ui", "app", "setup"} & set(titles), titles
        finally:
            browser.close()
