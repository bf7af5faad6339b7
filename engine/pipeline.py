"""The workbench's stages as resumable steps: what the CLI and the app call.

Each stage is one function taking frozen specs (and a cache dir) and returning a frozen
result record with a ``to_json()`` dict; all orchestration lives here, the CLI only parses.
Stages so far:

* ``open_run(spec, cache_dir)``: load model + calibration windows, compute the run id,
  open (or create) the run store. Shared by every stage that works on a run.
* ``sample(spec, cache_dir)``: draw ``sample_masks(spec.sampling, L)``, skip the masks the
  store already holds, evaluate the rest (prefix sharing), committing each one as it
  finishes. Stops cleanly on a cancel request (checked between masks) or Ctrl-C; what was
  evaluated stays, and running it again resumes.
* ``info(model_spec, data_spec)``: what the model is and its perplexity on the data.
* ``status(cache_dir)``: one dict per run store.

Later stages (fit, shapley, prune, run) follow the same pattern: ``run = open_run(...)``
(or ``RunStore.open`` when the model is not needed), read ``run.store.table()``, write
their results with ``run.store.put_artifact(name, ...)``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine import method
from engine.config import DataSpec, EvalSpec, ModelSpec, RunSpec, SurrogateSpec
from engine.baselines import run_baseline
from engine.data import Windows, make_windows
from engine.errors import EstimationError, WorkbenchError
from engine.evaluate import MaskEvaluator, scores
from engine.models import LoadedModel, load_model
from engine.prune import check_export_folder
from engine.sampling import masks_to_strings, sample_masks
from engine.store import RunStore, list_runs


def package_versions() -> dict[str, str]:
    """Versions recorded in each run's meta (results depend on them)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "numpy", "engine"):
        try:
            out[name] = md.version(name) if name != "engine" else __import__("engine").__version__
        except md.PackageNotFoundError:
            continue
    return out


def set_threads(n: int) -> None:
    """CPU threads for torch. On an oversubscribed machine fewer threads can be much faster
    (measured: 16-layer demo model, 2 cores at load ~9: 1 thread 8x faster than 2)."""
    import torch

    torch.set_num_threads(n)


@dataclass
class OpenRun:
    """A run ready for work: the loaded model, its windows and the run store."""

    spec: RunSpec
    lm: LoadedModel
    windows: Windows
    run_id: str
    store: RunStore

    @property
    def n_layers(self) -> int:
        return self.lm.n_layers


def open_run(spec: RunSpec, cache_dir=None) -> OpenRun:
    """Load model and windows, derive the run id (model identity, data hash, sampling), open the store."""
    lm = load_model(spec.model)
    windows = make_windows(lm.tokenizer, spec.data)
    # Check the sampling settings against L before anything is written to the cache.
    sample_masks(dataclasses.replace(spec.sampling, n_masks=0), lm.n_layers)
    run_id = spec.run_id(lm.identity, windows.data_hash)
    meta = {
        "spec": dataclasses.asdict(spec),
        "model": spec.model.name,
        "model_identity": lm.identity,
        "family": lm.family,
        "data": spec.data.source,
        "data_hash": windows.data_hash,
        "n_layers": lm.n_layers,
        "versions": package_versions(),
    }
    store = RunStore.open(cache_dir, run_id, meta)
    return OpenRun(spec=spec, lm=lm, windows=windows, run_id=run_id, store=store)


@dataclass(frozen=True)
class SampleResult:
    run_id: str
    store: str  # path of the run's database
    evaluated: int  # masks evaluated by this call
    total: int  # masks in the run's sample now stored (of `target`)
    target: int  # masks asked for (spec.sampling.n_masks)
    seconds: float  # wall time of this call, model loading included
    n_layers: int
    ppl_full: float | None
    nonfinite: int  # masks evaluated by this call whose perplexity was NaN/inf
    stopped: str | None  # None (done) | "cancelled" (cancel request) | "interrupted" (Ctrl-C)
    layer_calls: int = 0  # decoder-layer calls this call made (prefix sharing: fewer than kept layers)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


class _Progress:
    """tqdm bar with ETA on stderr, or (json_mode) one JSON progress line a second on stderr."""

    def __init__(self, total: int, enabled: bool, json_mode: bool):
        self.total, self.done, self.json_mode = total, 0, json_mode
        self.enabled = enabled and total > 0
        self.t0 = self.last = time.monotonic()
        self.bar = None
        if self.enabled and not json_mode:
            from tqdm import tqdm

            self.bar = tqdm(total=total, file=sys.stderr, unit="mask", desc="sampling", dynamic_ncols=True)

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
            rate = self.done / max(now - self.t0, 1e-9)
            eta = (self.total - self.done) / rate
            line = {"event": "progress", "done": self.done, "total": self.total, "eta_s": round(eta, 1)}
            print(json.dumps(line), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


FIRST_CHUNK = 64


def _chunks(n: int, first: int | None):
    """(lo, hi) slices of sizes first, 2*first, 4*first, ...; one slice when first is None."""
    lo, size = 0, first or n
    while lo < n:
        yield lo, min(n, lo + size)
        lo, size = lo + size, size * 2


def sample(
    spec: RunSpec,
    cache_dir=None,
    progress: bool = True,
    json_mode: bool = False,
    first_chunk: int | None = FIRST_CHUNK,
    run: OpenRun | None = None,
    evaluation: EvalSpec = EvalSpec(),
) -> SampleResult:
    """Evaluate the run's first ``spec.sampling.n_masks`` masks that the store does not hold yet.

    Masks go to the evaluator in chunks of doubling size (64, 128, 256, ... in sample order).
    Inside a chunk the evaluator walks the masks' prefix trie, i.e. in lexicographic order of
    kept layers, so a run stopped mid-chunk holds a *biased* part of that chunk; chunking
    bounds this: what is stored is always the sample's first masks plus part of one chunk.
    The price is lost prefix sharing between chunks (measured with
    evaluate.count_prefix_computations, 2,048 stratified masks: L=16 6,854 layer calls in one
    batch vs 9,561 chunked vs 22,592 without sharing; L=32 26,759 vs 30,323 vs 49,161).
    ``first_chunk=None`` evaluates all masks as one batch. Pass ``run`` (from `open_run`) to
    reuse a loaded model instead of loading it again; ``evaluation`` sets the evaluator's
    windows per layer call, torch.compile and ``single_pass`` (= ``first_chunk=None``); the
    numbers are the same either way.
    """
    t0 = time.monotonic()
    if evaluation.single_pass:
        first_chunk = None
    run = run or open_run(spec, cache_dir)
    store = run.store
    masks = sample_masks(spec.sampling, run.n_layers)  # (n, L)
    strings = masks_to_strings(masks)
    done = store.done_masks()
    todo = [i for i, s in enumerate(strings) if s not in done]
    ppl_full = store.meta().get("ppl_full")
    evaluated = nonfinite = 0
    stopped = None
    evaluator = None
    if todo or ppl_full is None:
        try:
            with store.writer(target=len(strings)) as writer:
                evaluator = MaskEvaluator(run.lm, run.windows, batch_size=evaluation.batch_size,
                                          compile=evaluation.compile)
                if ppl_full is None:
                    ppl_full = float(evaluator.ppl_full)
                    store.set_meta(ppl_full=ppl_full)
                bar = _Progress(len(todo), progress, json_mode)
                try:
                    for lo, hi in _chunks(len(todo), first_chunk):
                        part = todo[lo:hi]
                        for index, ppl, seconds in evaluator.iter_perplexities(masks[part]):
                            score, flag = scores(np.array([ppl], dtype=float), ppl_full)
                            writer.add(strings[part[index]], float(ppl), float(score[0]), bool(flag[0]), float(seconds))
                            evaluated += 1
                            nonfinite += int(flag[0])
                            bar.update()
                            if writer.cancel_requested():
                                writer.cancelled = True
                                stopped = "cancelled"
                                break
                        if stopped:
                            break
                finally:
                    bar.close()
        except KeyboardInterrupt:
            stopped = "interrupted"  # the writer recorded it; every committed row stays
    total = len(set(strings) & store.done_masks())
    return SampleResult(
        run_id=run.run_id,
        store=str(store.path),
        evaluated=evaluated,
        total=total,
        target=len(strings),
        seconds=round(time.monotonic() - t0, 3),
        n_layers=run.n_layers,
        ppl_full=ppl_full,
        nonfinite=nonfinite,
        stopped=stopped,
        layer_calls=evaluator.layer_calls if evaluator is not None else 0,
    )


def info(model_spec: ModelSpec, data_spec: DataSpec) -> dict:
    """Model family, size, class, dtype, device, identity and its perplexity on the data's windows."""
    lm = load_model(model_spec)
    windows = make_windows(lm.tokenizer, data_spec)
    ppl = float(MaskEvaluator(lm, windows).ppl_full)
    return {
        "model": model_spec.name,
        "family": lm.family,
        "model_class": type(lm.model).__name__,
        "n_layers": lm.n_layers,
        "n_params": lm.n_params,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "device": str(lm.device),
        "identity": lm.identity,
        "data": data_spec.source,
        "data_hash": windows.data_hash,
        "n_windows": int(windows.input_ids.shape[0]),
        "seq_len": int(windows.input_ids.shape[1]),
        "ppl": ppl,
    }


def status(cache_dir=None) -> list[dict]:
    """One dict per run store under cache_dir (see store.RunSummary), most recent first."""
    root = Path(cache_dir) if cache_dir is not None else None
    return [dataclasses.asdict(s) for s in list_runs(root)]


# ---------------------------------------------------------------- stage 2: the method (engine.method)


def _samples_run(spec: RunSpec, cache_dir) -> OpenRun:
    """Open an existing run for the analysis stages; refuse to create an empty one by accident."""
    run = open_run(spec, cache_dir)
    if run.store.count() == 0:
        raise EstimationError(
            f"run {run.run_id} has no evaluated masks yet. Run `python -m engine sample` with the same "
            "model, data and sampling options first (or `python -m engine run`, which samples too)."
        )
    return run


def fit(spec: RunSpec, surrogate: SurrogateSpec, cache_dir=None, compare_kinds: tuple[str, ...] = ()) -> dict:
    """Fit the surrogate on the run's samples; held-out diagnostics and learning curve."""
    run = _samples_run(spec, cache_dir)
    f = method.fit(run, surrogate, curve=True, compare_kinds=compare_kinds)
    return {"run_id": run.run_id, **method.fit_headline(f), **f.summary}


def contributions(spec: RunSpec, surrogate: SurrogateSpec, estimator: str, cache_dir=None,
                  n_masks: int = 80_000, n_permutations: int = 2_000) -> dict:
    """Per-layer contributions (one per layer, in layer order) with error bars and the ranking."""
    run = _samples_run(spec, cache_dir)
    f = method.fit(run, surrogate, curve=False)
    c = method.contributions(run, f, estimator, n_masks=n_masks, n_permutations=n_permutations, seed=surrogate.seed)
    out = c.to_dict()
    return {
        "run_id": run.run_id,
        "estimator": c.estimator,
        "contributions": out["values"],
        "stderr": out["stderr"],
        "ranking": [int(i) for i in np.argsort(c.values, kind="stable")],  # least important first
        "n_evaluations": c.n_evaluations,
        "efficiency": out["details"].get("efficiency"),
        "r2": method.fit_headline(f).get("r2"),
    }


def prune(spec: RunSpec, surrogate: SurrogateSpec, estimator: str, remove: int, out_dir=None,
          overwrite: bool = False, eval_data: tuple[str, ...] = (), cache_dir=None, run: OpenRun | None = None,
          sample_result: SampleResult | None = None) -> dict:
    """fit -> contributions -> decide (k = 1..remove) -> export (if out_dir) on the run's samples."""
    t0 = time.monotonic()
    if out_dir is not None:
        check_export_folder(out_dir, overwrite)  # before any model is loaded
    run = run or _samples_run(spec, cache_dir)
    evaluated = sample_result.evaluated if sample_result else 0
    result = method.run_method(run, evaluated, surrogate, estimator, remove, out_dir, overwrite, eval_data, t0)
    return result.to_json()


def run_all(spec: RunSpec, surrogate: SurrogateSpec, estimator: str, remove: int, out_dir=None,
            overwrite: bool = False, eval_data: tuple[str, ...] = (), cache_dir=None, progress: bool = True,
            json_mode: bool = False, evaluation: EvalSpec = EvalSpec(single_pass=True)) -> dict:
    """The whole method in one resumable command: sample -> fit -> contributions -> decide -> export.

    Sampling is one pass by default (EvalSpec.single_pass): nothing is fitted before every mask
    is in, so the order masks are stored in does not matter and the fewest layer calls win."""
    t0 = time.monotonic()
    if out_dir is not None:
        check_export_folder(out_dir, overwrite)  # fail before minutes of sampling, not after
    run = open_run(spec, cache_dir)
    sampled = sample(spec, cache_dir, progress=progress, json_mode=json_mode, run=run, evaluation=evaluation)
    if sampled.stopped:
        raise WorkbenchError(
            f"sampling was {sampled.stopped} after {sampled.total}/{sampled.target} masks; everything evaluated is "
            "kept in the run store. Run the same command again to resume."
        )
    result = prune(spec, surrogate, estimator, remove, out_dir, overwrite, eval_data, cache_dir, run, sampled)
    result["seconds"] = round(time.monotonic() - t0, 3)
    result["stage_seconds"] = {"sample": sampled.seconds, **result["stage_seconds"]}
    return result


def baseline(model_spec: ModelSpec, data_spec: DataSpec, name: str, k_max: int | None = None, seed: int = 0) -> dict:
    """One static criterion on the calibration windows: per-layer scores and removal order."""
    lm = load_model(model_spec)
    windows = make_windows(lm.tokenizer, data_spec)
    result = run_baseline(name, lm, windows, k_max=k_max, seed=seed)
    return {"model": model_spec.name, "data": data_spec.source, "n_layers": lm.n_layers, **result.to_json()}
