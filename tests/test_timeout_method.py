"""pytest.ini's timeout method: a hung test fails alone, the run goes on to its summary, and tests
that spawn processes still stop them (their `finally` blocks and fixture teardowns run).

Each test runs pytest in a child process with this repository's pytest.ini on a generated test
file and a 2 s `--timeout`; with `timeout_method = thread` the child would end at the first
timeout with no summary line (issue 27), and these assertions would fail.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HUNG_AND_QUICK = """
import time

def test_hangs():
    time.sleep(60)

def test_quick():
    assert 1 + 1 == 2
"""

SPAWNING = """
import os, subprocess, sys, time
import pytest

PIDS = os.environ["PIDS_DIR"]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


def _note(name, pid):
    with open(os.path.join(PIDS, name), "w") as fh:
        fh.write(str(pid))


@pytest.fixture
def child():
    p = subprocess.Popen(SLEEPER)
    _note("fixture", p.pid)
    yield p
    p.kill()
    p.wait()


def test_hangs_holding_a_child_in_try_finally():
    p = subprocess.Popen(SLEEPER)
    _note("finally", p.pid)
    try:
        time.sleep(60)
    finally:
        p.kill()
        p.wait()


def test_hangs_holding_a_child_from_a_fixture(child):
    time.sleep(60)


def test_quick():
    pass
"""


def _pytest(tmp_path: Path, source: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, float]:
    (tmp_path / "test_generated.py").write_text(source)
    cmd = [sys.executable, "-m", "pytest", "-c", str(ROOT / "pytest.ini"), "--rootdir", str(tmp_path),
           "-p", "no:cacheprovider", "--timeout", "2", str(tmp_path / "test_generated.py")]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    return proc, time.monotonic() - t0


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in state.lower()


def test_pytest_ini_uses_the_signal_method():
    assert "timeout_method = signal" in (ROOT / "pytest.ini").read_text()


def test_a_hung_test_fails_alone_and_the_summary_is_printed(tmp_path):
    proc, seconds = _pytest(tmp_path, HUNG_AND_QUICK)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # failures, not an aborted process
    assert "1 failed, 1 passed" in out, out
    assert "Timeout" in out and "test_hangs" in out, out
    assert seconds < 60, f"the hung test was not cut at its timeout ({seconds:.0f} s)"


def test_spawned_processes_are_stopped_when_a_test_times_out(tmp_path):
    pids = tmp_path / "pids"
    pids.mkdir()
    proc, _ = _pytest(tmp_path, SPAWNING, env={"PIDS_DIR": str(pids)})
    out = proc.stdout + proc.stderr
    assert "2 failed, 1 passed" in out, out
    noted = {p.name: int(p.read_text()) for p in pids.iterdir()}
    assert set(noted) == {"finally", "fixture"}, noted
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in noted.values()):
        time.sleep(0.1)
    assert not [name for name, pid in noted.items() if _alive(pid)], "a child outlived its timed-out test"
