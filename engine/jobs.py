"""Background CLI jobs: how the app runs long work at the CLI's speed.

A job is one `python -m engine <command> ... --json` process started in its own session (it
survives a page rerun, a closed tab or a server restart), with its output in
``<run folder>/jobs/<name>.log`` and a record ``<name>.json`` (pid, argv, started) beside it.
The command stores its results as artifacts in the run store, so pages only read; progress is
the last ``{"event": "progress", ...}`` line the command wrote to stderr (tqdm is off with
--json), and the outcome is the command's final JSON line (``{"error": ...}`` on failure).

This is a process launcher, not a scheduler: one job per name and run at a time (a second
launch while one runs returns the running one), nothing queued. Contract:

* ``launch(run_dir, name, argv, env=None) -> JobState``: start unless one is running.
* ``state(run_dir, name) -> JobState | None``: running | finished | failed | cancelled, the
  last progress event and the result or error line.
* ``cancel(run_dir, name) -> bool``: SIGTERM to the job's process group (the CLI stops cleanly:
  sampling keeps every committed mask; other commands store nothing partial).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from engine.atomic import write_atomic
from engine.store import pid_alive

JOBS_DIR = "jobs"
TAIL_BYTES = 64 * 1024  # how much of the log end is read for progress and the result line


@dataclass(frozen=True)
class JobState:
    name: str
    status: str  # running | finished | failed | cancelled
    pid: int
    started: float
    argv: tuple[str, ...]
    progress: dict | None  # last {"event": "progress", "done": .., "total": .., ...} line
    result: dict | None  # the command's JSON result (finished) or {"error": ...} (failed)
    log: str  # path of the log

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def message(self) -> str | None:
        return (self.result or {}).get("error") if self.status == "failed" else None


def _paths(run_dir: Path, name: str) -> tuple[Path, Path]:
    folder = Path(run_dir) / JOBS_DIR
    return folder / f"{name}.json", folder / f"{name}.log"


def _tail_lines(path: Path, window: int | None = None) -> list[str]:
    """The lines at the end of the log: the last `window` bytes (default TAIL_BYTES), widened (doubling)
    until the last line is whole, so a result line longer than the window (an interaction map of many
    layers) is still read in full. A partial first line may remain; callers skip what is not JSON."""
    size = window or TAIL_BYTES
    try:
        with open(path, "rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            while True:
                start = max(0, end - size)
                fh.seek(start)
                data = fh.read()
                if start == 0 or b"\n" in data.rstrip(b"\n"):  # the last line starts inside the window
                    return data.decode(errors="replace").splitlines()
                size *= 2
    except OSError:
        return []


def _json_lines(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def state(run_dir, name: str) -> JobState | None:
    """The latest job called `name` in this run folder, or None if none was ever launched."""
    record_path, log = _paths(run_dir, name)
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    events = _json_lines(_tail_lines(log))
    progress = next((e for e in reversed(events) if e.get("event") == "progress"), None)
    final = next((e for e in reversed(events) if "event" not in e), None)
    if pid_alive(record["pid"]) and final is None:
        status = "running"
    elif record.get("cancelled"):
        status = "cancelled"
    elif final is not None and "error" not in final:
        status = "finished"
    else:
        status = "failed"
        if final is None:
            tail = "\n".join(_tail_lines(log)[-5:])
            final = {"error": f"the job ended without a result; the end of its log ({log}):\n{tail}"}
    return JobState(name, status, record["pid"], record["started"], tuple(record["argv"]), progress, final, str(log))


def launch(run_dir, name: str, argv: list[str], env: dict | None = None) -> JobState:
    """Start `argv` (a `python -m engine ... --json` command) as job `name`, unless one is running."""
    current = state(run_dir, name)
    if current is not None and current.running:
        return current
    record_path, log = _paths(run_dir, name)
    record_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, start_new_session=True)
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it when it exits (no zombie)
    write_atomic(record_path, json.dumps({"pid": proc.pid, "started": time.time(), "argv": list(argv)}))
    return state(run_dir, name)


def cancel(run_dir, name: str) -> bool:
    """SIGTERM the running job `name` (its whole process group); False if none is running."""
    current = state(run_dir, name)
    if current is None or not current.running:
        return False
    record_path, _ = _paths(run_dir, name)
    record = json.loads(record_path.read_text())
    write_atomic(record_path, json.dumps({**record, "cancelled": True}))  # a reader never sees half a record
    try:
        os.killpg(current.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    return True
