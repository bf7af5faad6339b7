"""Progress on stderr: the sampling bar (`_Progress`), a stage's steps in words (`StepProgress`) and
healing's loss lines (`_HealProgress`); with json_mode one JSON line at most every second."""

from __future__ import annotations

import json
import sys
import time


class _Progress:
    """tqdm bar with ETA on stderr, or (json_mode) one JSON progress line a second on stderr."""

    def __init__(self, total: int, enabled: bool, json_mode: bool):
        self.total, self.done, self.json_mode = total, 0, json_mode
        self.requested = enabled
        self.enabled = enabled and total > 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        self._start_bar()

    def _start_bar(self) -> None:
        if self.enabled and not self.json_mode and self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, file=sys.stderr, unit="mask", desc="sampling", dynamic_ncols=True)

    def grow(self, n: int) -> None:
        """n more steps (completions planned after the bar started)."""
        if n <= 0:
            return
        self.total += n
        self.enabled = self.requested and self.total > 0
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()
        self._start_bar()

    def update(self) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.monotonic()
        if now - self.last >= 1.0 or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)  # units (or steps) per second since the step (stage) began
            eta = (self.total - self.done) / rate
            line = {"event": "progress", "done": self.done, "total": self.total, "eta_s": round(eta, 1)}
            print(json.dumps(line), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class StepProgress:
    """Progress of a long stage in words, step / total and an ETA: with `json_mode` one JSON line
    {"event": "progress", "stage", "done", "total", "eta_s", "step"} at most every second on stderr (what
    the app's job panel shows), else the same in words on stderr; nothing when disabled."""

    def __init__(self, stage: str, enabled: bool = True, json_mode: bool = False, every: float = 1.0):
        self.stage, self.enabled, self.json_mode, self.every = stage, enabled, json_mode, every
        self.total = self.done = 0
        self.words = ""
        self.t0 = self.last = time.monotonic()

    def begin(self, total: int, words: str) -> None:
        """A new step of `total` units described by `words` (e.g. "measuring 312 candidate sets on 4 windows")."""
        self.total, self.done, self.words = int(total), 0, words
        self.t0 = time.monotonic()
        self.emit(force=True)

    def at(self, done: int, total: int, words: str) -> None:
        """Step `done` of `total` of a stage made of unequal steps (ETA from the stage's own pace)."""
        if done == 0:
            self.t0 = time.monotonic()
        self.total, self.done, self.words = int(total), int(done), words
        self.emit(force=True)

    def tick(self, n: int = 1) -> None:
        self.done += n
        self.emit(force=self.done >= self.total)

    def emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < self.every):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        eta = (self.total - self.done) / rate if self.done and rate > 0 else None
        left = self.total - self.done
        words = f"{self.words}, {left} left" + (f", about {_about(eta)}" if eta is not None and left else "")
        if self.json_mode:
            line = {"event": "progress", "stage": self.stage, "done": self.done, "total": self.total,
                    "eta_s": None if eta is None else round(eta, 1), "step": words}
            print(json.dumps(line), file=sys.stderr, flush=True)
        else:
            print(f"{self.stage}: {words} ({self.done}/{self.total})", file=sys.stderr, flush=True)


def _about(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min"


class _HealProgress:
    """A line every few seconds on stderr: step, loss, ETA (json_mode: {"event": "progress", ...})."""

    def __init__(self, enabled: bool, json_mode: bool):
        self.enabled, self.json_mode = enabled, json_mode
        self.t0 = self.last = time.monotonic()
        self.first_step = None

    def __call__(self, step: int, steps: int, loss: float, lr: float) -> None:
        if self.first_step is None:  # the ETA from the training steps' own pace, not the sampling before them
            self.first_step = step  # steps after this one, over the time since it: no sampling time inside
            self.t0 = time.monotonic()
        now = time.monotonic()
        if not self.enabled or (now - self.last < (1.0 if self.json_mode else 3.0) and step != steps):
            return
        self.last = now
        rate = (step - self.first_step) / max(now - self.t0, 1e-9)
        eta = (steps - step) / rate if rate > 0 else None
        if self.json_mode:
            line = json.dumps({"event": "progress", "stage": "heal", "done": step, "total": steps,
                               "loss": round(loss, 4), "lr": lr, "eta_s": None if eta is None else round(eta, 1)})
        else:
            line = (f"healing: step {step}/{steps}  loss {loss:.4f}  lr {lr:.2e}  elapsed {now - self.t0:.0f}s  "
                    f"eta {eta:.0f}s")
        print(line, file=sys.stderr, flush=True)
