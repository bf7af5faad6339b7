"""Mask evaluation on Ray workers: one actor per device (or group of devices), whole trie subtrees per task.

`open_evaluator(lm, windows, evaluation)` is what `pipeline.sample` uses: a plain `MaskEvaluator`
when `evaluation.workers <= 1` and no `ray_address` is given (Ray is then never imported), else a
`RayEvaluator` with the same public surface (`ppl_full`, `iter_perplexities`, `perplexities`,
`iter_window_losses`, `window_losses`, `full_window_losses`, `layer_calls`, `leaves`, `work`), so the run store, resume, cancel and the app's live view do not change: only the
driver (the process that called `pipeline.sample`) writes the store.

Contract of `RayEvaluator`:
* Cluster: `ray_address=None` starts a local Ray instance (all CPUs/GPUs of this machine, no
  dashboard) and shuts it down on `close()`; `ray_address="host:port"` (or "auto") joins an
  existing cluster and leaves it running. If Ray is already initialised in this process (tests,
  notebooks), that instance is used and left running.
* Workers: `workers` actors (`MaskWorker`), each loading the model once from `lm.spec` (the same
  ModelSpec the driver used: a hub id, or a folder that must exist at the same path on every node)
  and checking that its model identity equals the driver's. Devices: ModelSpec.device "cpu" ->
  CPU actors with cpus/workers threads each; "cuda"/"cuda:N" -> one GPU per actor; "auto" -> the
  cluster's GPUs divided among the actors (gpus // workers each, at least 1), loaded with
  accelerate's device_map="auto" over the actor's GPUs (models larger than one GPU).
* Work: the pending masks are split into whole subtrees of their prefix trie
  (`mask_order.split_subtrees`, about `tasks_per_worker` x workers groups, at least one per
  `masks_per_task` masks), so prefix sharing stays inside a worker. Each subtree is one actor task;
  at most `in_flight` tasks wait on each actor; the driver collects finished tasks with `ray.wait`
  and yields their rows at once, then gives that actor the next subtree (largest first).
* Faults: an actor that dies is restarted by Ray (`max_restarts`) and its running task retried
  (`max_task_retries`); once an actor is dead for good, its unfinished subtrees go back to the
  queue for the others. If every actor is dead, `WorkerError`. An exception inside a task (a bug,
  out of memory) is raised in the driver, not retried.
* Driver: `pipeline.sample` opens the run with `driver_model(spec)` (no weights: meta device) when
  workers evaluate, so the driver holds no copy; `ppl_full` comes from a worker.
* Stopping: leaving `iter_perplexities` early (cancel, Ctrl-C) cancels the queued tasks; `close()`
  kills the actors. Results are a set of (index, ppl, per-window losses, seconds) equal to one
  process's up to float rounding (same model files, dtype and device type); their order is
  completion order. Each row carries its per-window summed NLL (W floats), so multi-fidelity runs,
  window bootstraps and ties work on runs sampled by workers as on one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.config import EvalSpec, ModelSpec
from engine.data import Windows
from engine.errors import WorkbenchError
from engine.evaluate import MaskEvaluator
from engine.mask_order import check_masks, in_mask_order, split_subtrees
from engine.models import LoadedModel

TEST_DELAY_ENV = "LAYERPRUNE_TEST_TASK_DELAY_S"  # seconds each task sleeps first (tests only)
PROJECT_ROOT = str(Path(__file__).resolve().parents[1])  # put on the workers' PYTHONPATH


class WorkerError(WorkbenchError):
    """The Ray workers could not be started or all of them died."""


@dataclass(frozen=True)
class TaskResult:
    """What one subtree task sends back: rows indexed into the task's own mask array."""

    rows: list  # [(local index, ppl, nll float64[W], seconds)]
    layer_calls: int
    pid: int  # the actor process that evaluated it (tests use it to see restarts)
    seconds: float = 0.0  # wall time the actor spent in the task (its busy time)
    leaves: int = 0  # final norm + head + loss runs the task made (one per distinct mask)


def evaluator_options(evaluation: EvalSpec) -> dict:
    """MaskEvaluator keyword arguments implied by an EvalSpec (the same in every process)."""
    options = dict(batch_size=evaluation.batch_size, compile=evaluation.compile)
    if evaluation.batch_masks:
        options["batch_masks"] = True
    return options


class MaskWorker:
    """Ray actor body: loads the model once, evaluates whole subtrees. Runs in the worker process."""

    def __init__(self, spec: ModelSpec, input_ids: torch.Tensor, options: dict, threads: int):
        t0 = time.monotonic()
        from engine.models import load_model

        torch.set_num_threads(max(1, threads))
        self.lm = load_model(spec)
        self.evaluator = MaskEvaluator(self.lm, input_ids, **options)
        self.startup_seconds = time.monotonic() - t0  # model load + the evaluator's recording forward

    def describe(self) -> dict:
        nll, tokens = self.evaluator.full_window_losses()
        return {"identity": self.lm.identity, "device": str(self.lm.device), "pid": os.getpid(),
                "threads": torch.get_num_threads(), "ppl_full": self.evaluator.ppl_full,
                "full_window_nll": nll, "window_tokens": tokens, "startup_seconds": self.startup_seconds}

    def evaluate(self, masks: np.ndarray) -> TaskResult:
        """All masks of one subtree (bool[k, L]); rows in trie order."""
        t0, before, leaves = time.perf_counter(), self.evaluator.layer_calls, self.evaluator.leaves
        if TEST_DELAY_ENV in os.environ:  # fault-injection hook for tests (kill the driver mid-run)
            time.sleep(float(os.environ[TEST_DELAY_ENV]))
        rows = [(int(i), float(p), nll, float(s)) for i, p, nll, _, s in self.evaluator.iter_window_losses(masks)]
        return TaskResult(rows=rows, layer_calls=self.evaluator.layer_calls - before, pid=os.getpid(),
                          seconds=time.perf_counter() - t0, leaves=self.evaluator.leaves - leaves)


def _worker_device(device: str) -> str:
    """The device string a worker loads with: Ray restricts each actor's visible GPUs."""
    if device.startswith("cuda"):
        return "cuda"
    return device


class RayEvaluator:
    """MaskEvaluator's interface over `workers` Ray actors (see the module docstring).

    tasks_per_worker / masks_per_task: how finely the trie is split (more tasks: better balance and
    a livelier store, a little more recomputed prefix); in_flight: tasks queued per actor;
    max_restarts: Ray restarts of a dead actor (and retries of its task); threads: torch threads
    per actor (None: its share of the cluster's CPUs, 1 on GPU actors).
    """

    def __init__(self, lm: LoadedModel, windows: Windows | torch.Tensor, evaluation: EvalSpec = EvalSpec(),
                 tasks_per_worker: int = 8, masks_per_task: int = 64, in_flight: int = 2,
                 max_restarts: int = 1, startup_timeout_s: float = 600.0, threads: int | None = None):
        import ray

        self._ray = ray
        self.n_layers = lm.n_layers
        self.workers = max(1, evaluation.workers)
        self.tasks_per_worker, self.masks_per_task, self.in_flight = tasks_per_worker, masks_per_task, in_flight
        self.layer_calls = 0
        self.leaves = 0  # final norm + head + loss runs, summed over finished tasks
        ids = windows.input_ids if isinstance(windows, Windows) else windows
        self._shape = tuple(ids.shape)  # (W, T): for `work`
        self.requeued = 0  # subtrees sent again after their actor died for good
        self.pids: set[int] = set()  # actor processes that returned results
        self.busy_seconds = 0.0  # sum over finished tasks of the time an actor spent in them
        self._started_ray = False
        if not ray.is_initialized():
            env = {"PYTHONPATH": os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)}
            env.update({k: os.environ[k] for k in (TEST_DELAY_ENV,) if k in os.environ})
            ray.init(address=evaluation.ray_address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, runtime_env={"env_vars": env})
            self._started_ray = True
        try:
            self._start_actors(lm, windows, evaluation, max_restarts, startup_timeout_s, threads)
        except BaseException:
            self.close()
            raise

    def _start_actors(self, lm, windows, evaluation, max_restarts, timeout_s, threads) -> None:
        ray = self._ray
        spec = lm.spec or ModelSpec()
        if lm.spec is None or lm.identity == "memory":
            raise WorkerError("Ray workers load the model themselves: pass a model loaded with load_model "
                              "(a folder or hub id), not one built in memory")
        resources = ray.cluster_resources()
        cpus, gpus = float(resources.get("CPU", 1.0)), int(resources.get("GPU", 0))
        if spec.device == "cpu":
            per = {"num_cpus": cpus / self.workers}
        elif spec.device == "auto" and gpus:
            per = {"num_cpus": min(1.0, cpus / self.workers), "num_gpus": max(1, gpus // self.workers)}
        elif spec.device == "auto":
            per = {"num_cpus": cpus / self.workers}
        else:  # cuda, cuda:N: one GPU per actor
            if gpus < self.workers:
                raise WorkerError(f"--workers {self.workers} with --device {spec.device} needs {self.workers} GPUs; "
                                  f"the Ray cluster has {gpus}")
            per = {"num_cpus": min(1.0, cpus / self.workers), "num_gpus": 1}
        if threads is None:  # CPU actors: their share of the cluster's CPUs; GPU actors: 1 (the GPU computes)
            threads = max(1, int(per["num_cpus"])) if "num_gpus" not in per else 1
        worker_spec = dataclasses.replace(spec, device=_worker_device(spec.device))
        ids = windows.input_ids if isinstance(windows, Windows) else windows
        actor_cls = ray.remote(max_restarts=max_restarts, max_task_retries=max_restarts, **per)(MaskWorker)
        self.actors = [actor_cls.remote(worker_spec, ids.cpu(), evaluator_options(evaluation), threads)
                       for _ in range(self.workers)]
        self._alive = [True] * self.workers
        ready, missing = ray.wait([a.describe.remote() for a in self.actors], num_returns=self.workers,
                                  timeout=timeout_s)
        if missing:
            raise WorkerError(f"only {len(ready)} of {self.workers} Ray workers started within {timeout_s:.0f} s "
                              f"(resources asked per worker: {per}; cluster: {resources})")
        try:
            self.info = ray.get(ready)
        except ray.exceptions.RayError as e:
            raise WorkerError(f"a Ray worker failed to load the model: {e}") from e
        bad = [i["identity"] for i in self.info if i["identity"] != lm.identity]
        if bad:
            raise WorkerError(f"a worker loaded a different model ({bad[0]}) than the driver ({lm.identity}); "
                              "every node needs the same model files at the same path")
        self.ppl_full = float(self.info[0]["ppl_full"])

    # ------------------------------------------------------------ public (MaskEvaluator's surface)

    def _check(self, masks) -> np.ndarray:
        return check_masks(masks, self.n_layers)

    def iter_perplexities(self, masks) -> Iterator[tuple[int, float, float]]:
        """Yield (index into masks, perplexity, seconds) as subtrees finish; every index exactly once."""
        for i, ppl, _, _, seconds in self.iter_window_losses(masks):
            yield i, ppl, seconds

    def full_window_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """(nll float64[W], tokens int64[W]) of the unmodified model, as a worker measured them."""
        return (np.asarray(self.info[0]["full_window_nll"], dtype=np.float64).copy(),
                np.asarray(self.info[0]["window_tokens"], dtype=np.int64).copy())

    def window_losses(self, masks) -> tuple[np.ndarray, np.ndarray]:
        """(nll float64[n, W], tokens int64[n, W]) in the order of `masks`."""
        m = self._check(masks)
        nll = np.full((len(m), self._shape[0]), np.nan)
        tokens = np.zeros((len(m), self._shape[0]), dtype=np.int64)
        for i, _, v, t, _ in self.iter_window_losses(m):
            nll[i], tokens[i] = v, t
        return nll, tokens

    def iter_window_losses(self, masks) -> Iterator[tuple[int, float, np.ndarray, np.ndarray, float]]:
        """Yield (index into masks, perplexity, nll float64[W], tokens int64[W], seconds) as subtrees
        finish (MaskEvaluator.iter_window_losses's rows); every index exactly once."""
        ray = self._ray
        tokens = np.asarray(self.info[0]["window_tokens"], dtype=np.int64)
        m = self._check(masks)
        parts = max(self.tasks_per_worker * self.workers, -(-len(m) // self.masks_per_task))
        pending = deque(sorted(split_subtrees(m, parts), key=len, reverse=True))  # largest first
        inflight: dict = {}  # ObjectRef -> (actor index, subtree indices)

        def fill() -> None:
            for a in range(len(self.actors)):
                while self._alive[a] and pending and sum(x[0] == a for x in inflight.values()) < self.in_flight:
                    group = pending.popleft()
                    inflight[self.actors[a].evaluate.remote(m[group])] = (a, group)

        try:
            fill()
            while inflight:
                (ref,), _ = ray.wait(list(inflight), num_returns=1)
                a, group = inflight.pop(ref)
                try:
                    out: TaskResult = ray.get(ref)
                except ray.exceptions.ActorDiedError as e:  # dead for good (restarts used up or killed)
                    self._alive[a] = False
                    self._requeue(group, pending, e)
                    fill()
                    continue
                except ray.exceptions.ActorUnavailableError as e:  # unreachable for now: try elsewhere
                    self._requeue(group, pending, e)
                    fill()
                    continue
                except ray.exceptions.RayTaskError as e:
                    raise e.as_instanceof_cause() from None
                self.layer_calls += out.layer_calls
                self.leaves += out.leaves
                self.busy_seconds += out.seconds
                self.pids.add(out.pid)
                for local, ppl, nll, seconds in out.rows:
                    yield group[local], ppl, np.asarray(nll, dtype=np.float64), tokens, seconds
                fill()
        finally:
            for ref in inflight:
                ray.cancel(ref)

    @property
    def work(self) -> int:
        """Token-layer calls of the finished tasks: fidelity.work(layer_calls, leaves, W, T), as MaskEvaluator.work."""
        from engine.fidelity import work

        return work(self.layer_calls, self.leaves, *self._shape)

    def _requeue(self, group, pending: deque, cause: Exception) -> None:
        if not any(self._alive):
            raise WorkerError(f"every Ray worker died; last error: {cause}") from cause
        pending.appendleft(group)
        self.requeued += 1

    def perplexities(self, masks) -> np.ndarray:
        """float[n] in the order of `masks`; NaN/inf kept in place."""
        return in_mask_order(self, masks)

    def close(self) -> None:
        """Kill the actors; shut Ray down if this evaluator started it. Safe to call twice."""
        for actor in getattr(self, "actors", []):
            with contextlib.suppress(Exception):
                self._ray.kill(actor)
        self.actors = []
        if self._started_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._started_ray = False

    def __enter__(self) -> "RayEvaluator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def driver_model(spec: ModelSpec) -> LoadedModel:
    """The model as the driver needs it when workers evaluate: identity, tokenizer, layer count, and
    no weights (built on the meta device; nothing is read but config, tokenizer and the identity's
    file hashes), so a model that fills the GPUs is loaded only by the workers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from engine.models import _load_error, _resolve, wrap_model

    source, identity, local_only = _resolve(spec)
    common = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code, local_files_only=local_only)
    try:
        config = AutoConfig.from_pretrained(source, **common)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(spec, source, local_only, e) from e
    return wrap_model(model, tokenizer, spec, identity)


def uses_ray(evaluation: EvalSpec) -> bool:
    return evaluation.workers > 1 or bool(evaluation.ray_address)


@contextlib.contextmanager
def open_evaluator(lm: LoadedModel, windows: Windows | torch.Tensor, evaluation: EvalSpec = EvalSpec()):
    """The evaluator `evaluation` asks for: in-process MaskEvaluator, or RayEvaluator (closed on exit)."""
    if not uses_ray(evaluation):
        yield MaskEvaluator(lm, windows, **evaluator_options(evaluation))
        return
    t0 = time.monotonic()
    with RayEvaluator(lm, windows, evaluation) as ev:
        ev.startup_seconds = time.monotonic() - t0
        yield ev
