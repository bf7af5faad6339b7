"""Sampling speed in the app against the CLI, with a browser attached and watching.

1. `streamlit run app.py` with a fresh cache; headless Chromium (Debian's /usr/bin/chromium, driven
   by Playwright) opens the Sampling page, asks for `--masks` masks and presses Start / resume,
   then stays on the page, watching, until the run is done.
2. The same run (same spec, another fresh cache) with `python -m engine sample`.

masks/s of each comes from the run store's commit timestamps (`created` of the first and last
row), so model loading and start-up are excluded on both sides; `ratio` = app masks/s over CLI
masks/s (the target is at least 0.9). `server_cpu_s` is the CPU time the Streamlit server used
during the app's run, and `idle_cpu_fraction` its CPU use (fraction of one core) while the browser
sits on the finished run's Sampling page for `--idle-s` seconds.

Run: .venv/bin/python -m bench.app_speed [--masks 256] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common import emit, run_script
from engine.errors import WorkbenchError

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise WorkbenchError(f"streamlit did not become healthy at {url} within {timeout} s")


def _rate(cache: Path) -> tuple[int, float]:
    """(rows, masks/s between the first and last commit) of the only run store in `cache`."""
    dbs = list(cache.glob("*/run.sqlite"))
    if len(dbs) != 1:
        raise WorkbenchError(f"expected one run store in {cache}, found {len(dbs)}")
    con = sqlite3.connect(dbs[0])
    try:
        n, lo, hi = con.execute("SELECT COUNT(*), MIN(created), MAX(created) FROM samples").fetchone()
    finally:
        con.close()
    return n, (n - 1) / (hi - lo) if n > 1 and hi > lo else float("nan")


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def app_run(masks: int, threads: int, idle_s: float) -> dict:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="app-speed-") as tmp:
        cache = Path(tmp) / "cache"
        port = _free_port()
        env = {**os.environ, "LAYERPRUNE_CACHE": str(cache), "LAYERPRUNE_THREADS": str(threads),
               "OMP_NUM_THREADS": str(threads)}
        log = open(Path(tmp) / "streamlit.log", "wb")
        server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                                   "--server.headless", "true", "--server.address", "127.0.0.1"],
                                  cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(120_000)
                page.goto(url)
                page.locator("h1", has_text="Setup").wait_for()
                page.locator("[data-testid='stSidebarNav'] a", has_text="Sampling").first.click()
                page.locator("h1", has_text="Sampling").wait_for()
                field = page.get_by_label("masks in the run", exact=True)
                field.fill(str(masks))
                field.press("Enter")
                page.wait_for_timeout(1000)
                cpu0 = _cpu_seconds(server.pid)
                page.get_by_role("button", name="Start / resume").click()
                deadline = time.monotonic() + 3600
                while time.monotonic() < deadline:  # the browser stays on the page, watching
                    page.wait_for_timeout(2000)
                    if cache.exists() and any(cache.glob("*/run.sqlite")) and _rate(cache)[0] >= masks:
                        break
                cpu_run = _cpu_seconds(server.pid) - cpu0
                page.wait_for_timeout(5000)  # the page notices the end and stops polling
                cpu1 = _cpu_seconds(server.pid)
                page.wait_for_timeout(idle_s * 1000)
                idle = (_cpu_seconds(server.pid) - cpu1) / idle_s
                browser.close()
            n, rate = _rate(cache)
        finally:
            server.terminate()
            server.wait(timeout=30)
            log.close()
    return {"masks": n, "masks_per_s": rate, "server_cpu_s": cpu_run, "idle_cpu_fraction": idle}


def cli_run(masks: int, threads: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="cli-speed-") as tmp:
        cache = Path(tmp) / "cache"
        subprocess.run([sys.executable, "-m", "engine", "sample", "--masks", str(masks), "--threads", str(threads),
                        "--cache-dir", str(cache), "--json"], cwd=ROOT, check=True, capture_output=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        n, rate = _rate(cache)
    return {"masks": n, "masks_per_s": rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--masks", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads of both runs (default %(default)s)")
    p.add_argument("--idle-s", type=float, default=20.0, help="seconds the idle server's CPU is measured")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not Path(CHROMIUM).exists():
        raise WorkbenchError(f"{CHROMIUM} is missing: `apt-get install chromium` (bash .ci/run does it).")
    app = app_run(args.masks, args.threads, args.idle_s)
    cli = cli_run(args.masks, args.threads)
    ratio = app["masks_per_s"] / cli["masks_per_s"]
    result = {"ratio": round(ratio, 3), "app_masks_per_s": round(app["masks_per_s"], 3),
              "cli_masks_per_s": round(cli["masks_per_s"], 3), "masks": args.masks, "threads": args.threads,
              "server_cpu_s": round(app["server_cpu_s"], 1), "idle_cpu_fraction": round(app["idle_cpu_fraction"], 4)}
    emit([f"app (browser watching): {app['masks_per_s']:.2f} masks/s; CLI: {cli['masks_per_s']:.2f} masks/s; "
          f"ratio {ratio:.2f} ({args.masks} masks, {args.threads} thread(s))",
          f"Streamlit server CPU during the app's run: {app['server_cpu_s']:.1f} s; idle on the page: "
          f"{100 * app['idle_cpu_fraction']:.1f}% of a core"], result, args.json)


if __name__ == "__main__":
    run_script(main)
