"""The one orchestrator: every stage as a resumable step over a run store.

The CLI, the app's pages and the benchmarks call these functions and nothing below them, so
the same specs give the same numbers everywhere. Each function takes frozen specs
(engine.config), returns a JSON-able dict (the CLI's ``--json`` line) and stores what it
computed in the run's store:

* ``open_run(spec, cache_dir)``: load model and calibration windows, derive the run id,
  open (or create) the run store.
* ``sample(spec, cache_dir)``: evaluate the run's first ``n_masks`` masks that the store lacks,
  committing each as it finishes; cancel and Ctrl-C stop cleanly, a rerun resumes.
* ``fit`` / ``contributions`` / ``decide`` / ``export`` / ``prune`` / ``run_all``: stage 2
  (engine.method's pure functions) on the run's samples. Results are artifacts keyed by the
  spec that produced them (``fit:<hash>``, ``contributions:<hash>``, ``decisions:<hash>``;
  `artifact_name`), each holding its ``spec`` and the ``n_masks`` it saw, so a result for one
  spec never replaces another's and a reader can tell a stale result (fewer masks than the
  store now holds) from a current one. ``stored(run, stage, method_spec)`` reads them.
* ``info``, ``baseline``, ``measure``, ``status``; ``sampling_progress(run)``: rounds, fidelity and
  work of every stored row (the app's Sampling page).

Imports of torch-backed modules are inside the functions: ``python -m engine status`` and
``--help`` import this module without loading torch, scikit-learn or scipy.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine import atomic, validate
from engine.config import (INTERACTION_FOLDS, INTERACTION_SURROGATE, DataSpec, EvalSpec, MethodSpec, ModelSpec,
                           RunSpec, stable_hash)
from engine.errors import EstimationError, InputError, WorkbenchError
from engine.store import RunStore, list_runs


def set_threads(n: int | None) -> None:
    """CPU threads for torch (None: torch's choice). On an oversubscribed machine fewer threads
    can be much faster; bench/README.md has the figures."""
    if n:
        import torch

        torch.set_num_threads(int(n))


@dataclass
class OpenRun:
    """A run ready for work: the loaded model, its windows and the run store."""

    spec: RunSpec
    lm: object  # models.LoadedModel
    windows: object  # data.Windows
    run_id: str
    store: RunStore

    @property
    def n_layers(self) -> int:
        return self.lm.n_layers


def load(spec: RunSpec, evaluation: EvalSpec = EvalSpec(), weights: bool = True) -> tuple:
    """(LoadedModel, Windows) of a spec; checks the sampling settings against L. Writes nothing.
    weights=False: the model without weights (distributed.driver_model), for a driver whose Ray
    workers load the model themselves."""
    from engine.sampling import sample_masks

    validate.check_run(spec)  # every option against the model's config, before any weight is loaded
    lm, windows = _load(spec, evaluation, weights)
    sample_masks(dataclasses.replace(spec.sampling, n_masks=0), lm.n_layers)
    return lm, windows


def check_sampling(sampling, n_layers: int) -> None:
    """SamplingError unless `sampling` can draw masks for an n_layers model (no model needed)."""
    from engine.sampling import sample_masks

    sample_masks(dataclasses.replace(sampling, n_masks=0), n_layers)


def open_run(spec: RunSpec, cache_dir=None, evaluation: EvalSpec = EvalSpec(), create: bool = True,
             loaded: tuple | None = None) -> OpenRun:
    """Load model and windows (or take `loaded` from `load`), derive the run id (model identity,
    data hash, sampling), open the store.

    `create=False` (what the app's pages use to look) never writes to the cache: a run that was
    never sampled raises EstimationError instead of appearing as an empty run."""
    from engine.prune import package_versions

    validate.check_cache_dir(cache_dir)
    lm, windows = loaded or load(spec, evaluation)
    run_id = spec.run_id(lm.identity, windows.data_hash)
    if not create and not RunStore(cache_dir, run_id).exists():
        raise EstimationError(f"run {run_id} has no evaluated masks yet: start sampling first (Sampling page, or "
                              "`python -m engine sample` with the same settings).")
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
    leaves: int = 0  # final norm + head + loss runs this call made (one per distinct mask and window set)
    work: int = 0  # token-layer calls this call made (engine.fidelity.work; the full model's forward not counted)
    completed: int = 0  # partial rows this call completed on every window (multi-fidelity)
    partial: int = 0  # rows of the run evaluated on some windows only, now
    work_total: int = 0  # token-layer calls spent on every stored row of the run (store column `work`)
    rounds: dict = dataclasses.field(default_factory=dict)  # {round: {"masks": rows, "active": rows}} stored now

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


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

    Rounds and fidelity (`SamplingSpec.rounds`, `first_windows`, `complete`; `_round_plans`):
    the masks come in rounds (one round, the design's masks, unless rounds > 1); each round's new
    masks are evaluated on `first_windows` windows each (all windows when 0; which ones:
    `fidelity.first_windows`, drawn per mask), then, with
    multi-fidelity, the partial rows `fidelity.plan_completion` picks are completed on their
    missing windows (`_complete_round`). Active round plans and completion plans are stored as
    artifacts before they are evaluated, so a stopped run resumes them with the same masks.
    """
    from engine.distributed import uses_ray
    from engine.sampling import masks_to_strings

    t0 = time.monotonic()
    if evaluation.single_pass:
        first_chunk = None
    if spec.sampling.multi_fidelity and uses_ray(evaluation):
        # Each set of windows would need its own actors (one model copy each); workers evaluate every window.
        raise WorkbenchError("--first-windows evaluates masks on a few windows each, which Ray workers do not do "
                             "yet (they evaluate every window): sample multi-fidelity runs with --workers 1.")
    if run is None:  # with Ray workers the driver needs no weights: the workers load the model
        run = open_run(spec, cache_dir, evaluation, loaded=load(spec, evaluation, weights=False)
                       if uses_ray(evaluation) else None)
    store = run.store
    ppl_full = store.meta().get("ppl_full")
    if ppl_full is not None:
        validate.check_full_perplexity(run.lm, run.windows, ppl_full)  # a run stored by an older version
    target = spec.sampling.n_masks
    state = _SampleState()
    evaluators = _Evaluators(run, evaluation)
    done = store.done_masks()
    if len(done) < target or ppl_full is None or _completion_pending(run):
        try:
            with store.writer(target=target) as writer, evaluators:
                ppl_full = _store_full_model(run, evaluators)
                bar = _Progress(max(0, target - len(done)), progress, json_mode)
                try:
                    for r, masks, source in _round_plans(run, target, evaluators):
                        state.planned.update(masks_to_strings(masks))
                        if _evaluate_round(run, writer, evaluators, r, masks, source, ppl_full, first_chunk, bar,
                                           state) or _complete_round(run, writer, evaluators, r, bar, state):
                            break
                finally:
                    bar.close()
        except KeyboardInterrupt:
            state.stopped = "interrupted"  # the writer recorded it; every committed row stays
    summary = store.summary()
    return SampleResult(
        run_id=run.run_id,
        store=str(store.path),
        evaluated=state.evaluated,
        total=len(state.planned & store.done_masks()) if state.planned else min(target, len(done)),
        target=target,
        seconds=round(time.monotonic() - t0, 3),
        n_layers=run.n_layers,
        ppl_full=ppl_full,
        nonfinite=state.nonfinite,
        stopped=state.stopped,
        layer_calls=evaluators.layer_calls,
        leaves=evaluators.leaves,
        work=evaluators.work,
        completed=state.completed,
        partial=summary.partial,
        work_total=summary.work,
        rounds=summary.rounds or {},
    )


@dataclass
class _SampleState:
    """What one `sample` call did so far (its result's counters)."""

    evaluated: int = 0
    nonfinite: int = 0
    completed: int = 0
    stopped: str | None = None
    planned: set = dataclasses.field(default_factory=set)  # mask strings of the rounds reached


class _Evaluators:
    """The run's evaluators, one per set of calibration windows (all of them; each mask's first
    windows; the missing windows of partial rows), opened on first use and closed together. Counters sum over
    them: `layer_calls`, `leaves`, `work` (token-layer calls, engine.fidelity.work)."""

    def __init__(self, run: OpenRun, evaluation: EvalSpec):
        import contextlib

        self.run, self.evaluation = run, evaluation
        self.n_windows = int(run.windows.input_ids.shape[0])
        self._stack = contextlib.ExitStack()
        self._open: dict[tuple[int, ...], object] = {}

    def __enter__(self) -> "_Evaluators":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def on(self, windows: tuple[int, ...]):
        """The evaluator over these window indices (a MaskEvaluator or RayEvaluator)."""
        from engine.distributed import open_evaluator

        if windows not in self._open:
            ids = self.run.windows if len(windows) == self.n_windows else self.run.windows.input_ids[list(windows)]
            self._open[windows] = self._stack.enter_context(open_evaluator(self.run.lm, ids, self.evaluation))
        return self._open[windows]

    @property
    def all(self):
        return self.on(tuple(range(self.n_windows)))

    def _sum(self, name: str) -> int:
        return int(sum(getattr(ev, name, 0) for ev in self._open.values()))

    layer_calls = property(lambda self: self._sum("layer_calls"))
    leaves = property(lambda self: self._sum("leaves"))
    work = property(lambda self: self._sum("work"))

    def rows(self, windows: tuple[int, ...], masks):
        """Yield (index into masks, ppl, nll float[W], tokens int[W], seconds, work) per mask, the per-
        window losses scattered into all W windows (tokens 0, nll NaN where not evaluated; None and
        None from an evaluator without per-window losses) and `work` the token-layer calls
        spent since the previous row (prefix sharing: a row pays for the trie nodes it needed first)."""
        ev = self.on(windows)
        cols = list(windows)
        before = ev.work
        if hasattr(ev, "iter_window_losses"):
            rows = ev.iter_window_losses(masks)
        else:
            rows = ((i, p, None, None, t) for i, p, t in ev.iter_perplexities(masks))
        for i, ppl, nll, tokens, seconds in rows:
            spent, before = ev.work - before, ev.work
            if nll is not None:
                nll_w = np.full(self.n_windows, np.nan)  # (W,)
                tok_w = np.zeros(self.n_windows, dtype=np.int64)  # (W,)
                nll_w[cols], tok_w[cols] = nll, tokens
                nll, tokens = nll_w, tok_w
            yield i, ppl, nll, tokens, seconds, spent


def _store_full_model(run: OpenRun, evaluators: _Evaluators) -> float:
    """ppl_full (and the full model's per-window losses) from the store, measured on all windows once."""
    meta = run.store.meta()
    ppl_full = meta.get("ppl_full")
    if ppl_full is None:
        ppl_full = float(evaluators.all.ppl_full)
        validate.check_full_perplexity(run.lm, run.windows, ppl_full)  # before any mask
        run.store.set_meta(ppl_full=ppl_full)
    # Per-window losses (schema 2) where the evaluator gives them (MaskEvaluator and Ray workers do).
    if "window_losses_full" not in meta and hasattr(evaluators.all, "full_window_losses"):
        full_nll, full_tokens = evaluators.all.full_window_losses()
        run.store.set_meta(window_losses_full={"nll": full_nll.tolist(), "tokens": full_tokens.tolist()})
    return float(ppl_full)


def _full_losses(store: RunStore) -> tuple[np.ndarray, np.ndarray]:
    """(nll float[W], tokens int[W]) of the unmodified model, from meta."""
    full = store.meta()["window_losses_full"]
    return np.asarray(full["nll"], dtype=np.float64), np.asarray(full["tokens"], dtype=np.int64)


def _round_plans(run: OpenRun, n_masks: int, evaluators: _Evaluators):
    """Yield (round, masks bool[n, L], source str[n]) for the rounds that make up the run's first
    `n_masks` masks, each planned only when the previous one is evaluated (and completed).

    rounds == 1: one round, the design's first n_masks masks (`sampling.sample_masks`, prefix-stable).
    rounds == R > 1: round r's plan is the artifact ``round:<r>`` when stored, else
    `active.plan_round` with the ensemble (`method.committee`, seeded by the sampling seed) fitted
    on the rows stored so far, stored before it is evaluated. Sizes: `active.round_sizes(n_masks,
    R)`; when a finished run is extended (more masks), one more round takes the rest."""
    from engine import active
    from engine.sampling import sample_masks, strings_to_masks

    sampling, L = run.spec.sampling, run.n_layers
    if not sampling.active:
        masks = sample_masks(sampling, L)  # (n, L)
        yield 0, masks, np.array(["design"] * len(masks))
        return
    sizes = active.round_sizes(n_masks, sampling.rounds)
    planned = np.zeros((0, L), dtype=bool)
    design_used, total, r = 0, 0, 0
    while total < n_masks:
        plan = run.store.get_artifact(f"round:{r}")
        if plan is None:
            size = min(sizes[r] if r < len(sizes) else n_masks, n_masks - total)
            predict = None if r == 0 else _committee(run)
            plan = active.plan_round(sampling, L, r, size, planned, predict, sampling.explore, design_used).to_dict()
            run.store.put_artifact(f"round:{r}", plan)
        masks = strings_to_masks(plan["masks"]).reshape(-1, L)  # (n, L)
        if len(masks) == 0:
            return  # the design has no masks left
        keep = min(len(masks), n_masks - total)
        yield r, masks[:keep], np.asarray(plan["source"])[:keep]
        planned = np.vstack([planned, masks])
        design_used, total, r = plan["design_used"], total + keep, r + 1


def _committee(run: OpenRun):
    """member_predict for the next active round, or None while the run has too few rows to fit."""
    from engine import method as method_lib
    from engine.config import SurrogateSpec

    s = samples(run, require=False)
    if s is None or s.n < method_lib.MIN_MASKS:
        return None
    return method_lib.committee(s, SurrogateSpec(seed=run.spec.sampling.seed))


def _evaluate_round(run, writer, evaluators: _Evaluators, r: int, masks, source, ppl_full: float,
                    first_chunk, bar, state: _SampleState) -> bool:
    """Evaluate the round's masks the store lacks on their `first_windows` windows (`fidelity.first_windows`;
    all when 0), in doubling chunks (each chunk one batch per window set), committing each row; True when
    stopped by a cancel request."""
    from engine.evaluate import scores
    from engine.fidelity import first_windows, subset_scores
    from engine.sampling import masks_to_strings

    strings = masks_to_strings(masks)
    done = run.store.done_masks()
    todo = [i for i, s in enumerate(strings) if s not in done]
    sampling = run.spec.sampling
    first = first_windows(strings, evaluators.n_windows, sampling.first_windows, sampling.seed)  # per mask
    full = _full_losses(run.store) if todo and hasattr(evaluators.all, "iter_window_losses") else None
    for lo, hi in _chunks(len(todo), first_chunk):
        groups: dict[tuple[int, ...], list[int]] = {}  # first windows -> masks (one prefix-shared batch each)
        for i in todo[lo:hi]:
            groups.setdefault(first[i], []).append(i)
        for windows, part in groups.items():
            for index, ppl, nll, tokens, seconds, work in evaluators.rows(windows, masks[part]):
                if nll is None:
                    score, flag = scores(np.array([ppl], dtype=float), ppl_full)
                else:  # over the evaluated windows (= ppl_full / ppl when every window is evaluated)
                    score, flag = subset_scores(nll[None], tokens[None], *full)
                i = part[index]
                writer.add(strings[i], float(ppl), float(score[0]), bool(flag[0]), float(seconds), window_nll=nll,
                           window_tokens=tokens, round=r, source=str(source[i]), work=work)
                state.evaluated += 1
                state.nonfinite += int(flag[0])
                bar.update()
                if _cancelled(writer, state):
                    return True
    return False


def _complete_round(run, writer, evaluators: _Evaluators, r: int, bar, state: _SampleState) -> bool:
    """Multi-fidelity: complete the partial rows `fidelity.plan_completion` picks (share
    `sampling.complete` of the rows of rounds <= r complete) on their missing windows. The plan is
    the artifact ``complete:<round>:<rows of rounds <= round>`` (stored before the first completion,
    so a resumed run completes the same rows; an extended run plans again). True when stopped by a
    cancel request."""
    from engine import fidelity
    from engine.sampling import masks_to_strings

    sampling = run.spec.sampling
    if not sampling.multi_fidelity:
        return False
    table = run.store.table()
    if table.window_tokens is None:
        return False  # rows without per-window losses (a migrated version-1 store) cannot be completed
    mine = np.flatnonzero(table.round <= r)  # rows a resumed run of a later round also holds are left out
    name = f"complete:{r}:{len(mine)}"
    plan = run.store.get_artifact(name)
    if plan is None:
        est = fidelity.estimate_full(table.window_nll[mine], table.window_tokens[mine], *_full_losses(run.store))
        rows = mine[fidelity.plan_completion(est, table.masks[mine], sampling.complete, seed=[sampling.seed, r])]
        plan = {"round": r, "masks": masks_to_strings(table.masks[rows])}
        run.store.put_artifact(name, plan)
    strings = masks_to_strings(table.masks)
    where = {s: i for i, s in enumerate(strings)}
    have = fidelity.evaluated(table.window_tokens)  # (n, W)
    todo = [where[s] for s in plan["masks"] if not have[where[s]].all()]
    bar.grow(len(todo))
    groups: dict[tuple[int, ...], list[int]] = {}  # missing windows -> rows
    for i in todo:
        groups.setdefault(tuple(int(j) for j in np.flatnonzero(~have[i])), []).append(i)
    for windows, rows in groups.items():
        for index, _, nll, tokens, seconds, work in evaluators.rows(windows, table.masks[rows]):
            writer.complete(strings[rows[index]], nll, tokens, seconds, work)
            state.completed += 1
            bar.update()
            if _cancelled(writer, state):
                return True
    return False


def _cancelled(writer, state: _SampleState) -> bool:
    if writer.cancel_requested():
        writer.cancelled = True
        state.stopped = "cancelled"
        return True
    return False


def _completion_pending(run: OpenRun) -> bool:
    """True when a multi-fidelity run has a round whose completion was not planned yet, or whose
    completion plan still names partial rows (a run stopped while completing)."""
    from engine import fidelity
    from engine.sampling import masks_to_strings

    if not run.spec.sampling.multi_fidelity:
        return False
    table = run.store.table()
    if table.window_tokens is None or len(table.rowid) == 0:
        return False
    partial = set(np.asarray(masks_to_strings(table.masks))[~fidelity.evaluated(table.window_tokens).all(axis=1)])
    for r in np.unique(table.round):
        plan = run.store.get_artifact(f"complete:{r}:{int((table.round <= r).sum())}")
        if plan is None or partial & set(plan["masks"]):
            return True
    return False


def sampling_progress(run) -> dict:
    """Rounds, fidelity and work of every stored row, for the app's Sampling page (no model needed).

    `run`: an OpenRun or a RunStore. Returns a JSON-able dict:
    * ``rows``: columns, one entry per stored row in rowid (storage) order: ``rowid``, ``mask``,
      ``kept``, ``round``, ``source`` (design | active), ``windows`` (calibration windows evaluated;
      None for rows stored without per-window losses), ``complete`` (every window evaluated),
      ``work`` (token-layer calls spent on the row: its first evaluation plus its completion),
      ``cumulative_work`` (running sum of ``work`` in rowid order: a completion's work counts at its
      row's position), ``created`` and ``completed`` (unix times; completed None if never completed);
    * ``rounds``: {round: {"masks", "active", "complete", "work"}};
    * ``n_windows`` (W, None before the full model was measured), ``n_masks``, ``complete``, ``partial``,
      ``work`` (total). Work is engine.fidelity.work: (layer calls + leaves) x windows x tokens."""
    store = getattr(run, "store", run)
    rows = store.results()
    full = store.meta().get("window_losses_full")
    W = len(full["tokens"]) if full else None
    complete = [r.windows is None or (W is not None and r.windows >= W) for r in rows]
    work = np.cumsum([r.work for r in rows]).tolist() if rows else []
    rounds: dict[int, dict] = {}
    for r, c in zip(rows, complete):
        g = rounds.setdefault(r.round, {"masks": 0, "active": 0, "complete": 0, "work": 0})
        g["masks"] += 1
        g["active"] += r.source == "active"
        g["complete"] += c
        g["work"] += r.work
    return {
        "rows": {"rowid": [r.rowid for r in rows], "mask": [r.mask for r in rows], "kept": [r.kept for r in rows],
                 "round": [r.round for r in rows], "source": [r.source for r in rows],
                 "windows": [r.windows for r in rows], "complete": complete, "work": [r.work for r in rows],
                 "cumulative_work": [int(x) for x in work], "created": [r.created for r in rows],
                 "completed": [r.completed for r in rows]},
        "rounds": rounds,
        "n_windows": W,
        "n_masks": len(rows),
        "complete": int(sum(complete)),
        "partial": len(rows) - int(sum(complete)),
        "work": int(work[-1]) if work else 0,
    }


def info(model_spec: ModelSpec, data_spec: DataSpec, evaluation: EvalSpec = EvalSpec()) -> dict:
    """Model family, size, class, dtype, device, identity and its perplexity on the data's windows."""
    from engine.data import make_windows
    from engine.evaluate import MaskEvaluator
    from engine.models import load_model

    set_threads(evaluation.threads)
    validate.check_run(RunSpec(model=model_spec, data=data_spec))
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
    validate.check_cache_dir(cache_dir)  # a regular file: exit 5, as `sample` says
    root = Path(cache_dir) if cache_dir is not None else None
    return [dataclasses.asdict(s) for s in list_runs(root)]


# ---------------------------------------------------------------- stage 2: spec-keyed artifacts

STAGES = ("fit", "contributions", "decisions")


def artifact_name(stage: str, method: MethodSpec) -> str:
    """``<stage>:<hash of the spec fields that decide it>``: a fit depends on the surrogate only,
    contributions also on estimator, budget and seed, decisions also on the decision rule."""
    return f"{stage}:{stable_hash(method.key(stage))}"


def stored(run, stage: str, method: MethodSpec) -> dict | None:
    """The stored result of `stage` for `method` on `run` (an OpenRun or a RunStore), or None.
    The dict has ``stale: True`` when the store now holds more masks than the result saw."""
    store = getattr(run, "store", run)
    art = store.get_artifact(artifact_name(stage, method))
    if art is None:
        return None
    return {**art, "stale": _stale(art, store)}


def _stale(art: dict, store: RunStore) -> bool:
    """True when the store changed since `art` was computed: more masks, or more evaluated windows
    (multi-fidelity completions add windows, not masks). Artifacts written before the window count
    was recorded compare the mask count only."""
    if art.get("n_masks") != store.count():
        return True
    return "n_windows_evaluated" in art and art["n_windows_evaluated"] != store.evaluated_windows()


def _seen(samples_or_store) -> dict:
    """What staleness compares, as the artifact records it: n_masks and n_windows_evaluated of the rows
    a result was computed from (a method.Samples, or the store itself)."""
    s = samples_or_store
    if isinstance(s, RunStore):
        return {"n_masks": s.count(), "n_windows_evaluated": s.evaluated_windows()}
    windows = None if s.window_tokens is None else int(np.count_nonzero(s.window_tokens > 0))
    return {"n_masks": int(s.n), **({} if windows is None else {"n_windows_evaluated": windows})}


def _put(run: OpenRun, stage: str, method: MethodSpec, seen, result: dict) -> dict:
    """Store a stage result; `seen`: the method.Samples it was computed from (or the store)."""
    art = {"stage": stage, "spec": method.key(stage), **_seen(seen), **result}
    run.store.put_artifact(artifact_name(stage, method), art)
    return art


def samples(run: OpenRun, require: bool = True):
    """The run's evaluated masks as a method.Samples (EstimationError when there are too few; None
    when there are none and require=False).

    Partially evaluated rows (multi-fidelity) get their estimated full-fidelity score
    (`fidelity.estimate_full`) with `se`, surrogate fit `weights` (`fidelity.fit_weights`) and
    `complete`; their `ppl` stays the stored perplexity over the evaluated windows. Complete rows keep
    their stored score; a run without partial rows has se / weights / complete None (as before).
    `round` and `source` say which sampling round chose each row and whether the design drew it."""
    from engine.method import Samples

    table = run.store.table()
    meta = run.store.meta()
    ppl_full = meta.get("ppl_full")
    if len(table.rowid) == 0 or ppl_full is None:
        if not require:
            return None
        raise EstimationError(
            f"run {run.run_id} has no evaluated masks yet. Run `python -m engine sample` with the same "
            "model, data and sampling options first (or `python -m engine run`, which samples too).")
    s = Samples(table.masks, table.score, table.ppl, table.nonfinite, float(ppl_full), run.spec.sampling,
                table.window_nll, table.window_tokens, round=table.round, source=table.source)
    if "window_losses_full" in meta:  # the full model's per-window losses (schema 2)
        full_nll, full_tokens = _full_losses(run.store)
        s = dataclasses.replace(s, full_window_nll=full_nll, full_window_tokens=full_tokens)
        s = s.with_partial_rows(full_nll, full_tokens)
    return s.require() if require else s


_FITS: dict[tuple, object] = {}  # (run_id, n_masks[, windows evaluated], surrogate hash) -> method.Fit; a few
_FITS_MAX = 4


def _fit(run: OpenRun, method: MethodSpec, curve: bool = False, compare: bool = False,
         progress: "StepProgress | None" = None):
    """The fitted surrogate for `method.surrogate` on the run's current samples (fitting is seeded
    and deterministic, so a refit gives the same ensemble). Writes the fit artifact when it adds
    something (first fit, new masks, a learning curve or comparison not stored yet)."""
    from engine import method as method_lib
    from engine.surrogate import variants

    s = samples(run)
    key = (run.run_id, *_seen(s).values(), stable_hash(method.key("fit")))
    f = _FITS.get(key)
    have = f.summary if f is not None else {}
    if f is None or (curve and "learning_curve" not in have) or (compare and "comparison" not in have):
        f = method_lib.fit(s, method.surrogate, curve=curve or "learning_curve" in have,
                           compare_kinds=variants() if compare or "comparison" in have else (),
                           progress=None if progress is None else progress.at)
        _FITS.pop(key, None)
        _FITS[key] = f
        while len(_FITS) > _FITS_MAX:
            _FITS.pop(next(iter(_FITS)))
    old = stored(run, "fit", method)
    if old is None or old["stale"] or set(f.summary) - set(old):
        _put(run, "fit", method, s, _fit_json(run, f))
    return f


def _fit_json(run: OpenRun, f) -> dict:
    """The fit artifact: headline, report, curve/comparison, and the held-out predictions (store
    order row indices and predicted scores), so pages plot predicted vs true without refitting."""
    test = f.fitted.report.split.test
    heldout = {"rows": [int(i) for i in test], "predicted": [float(x) for x in f.predict(f.samples.masks[test])]}
    return {"run_id": run.run_id, **f.headline, **f.summary, "heldout": heldout}


def fit(spec: RunSpec, method: MethodSpec = MethodSpec(), cache_dir=None, compare: bool = False,
        run: OpenRun | None = None, evaluation: EvalSpec = EvalSpec(), progress: bool = False,
        json_mode: bool = False) -> dict:
    """Fit the surrogate on the run's samples: held-out R², Spearman, MAE, per stratum, learning curve
    (and a comparison of every registered surrogate when `compare`); `progress`: StepProgress lines."""
    run = run or open_run(spec, cache_dir, evaluation, create=False)  # analysis: never creates a run
    t = time.monotonic()
    f = _fit(run, method, curve=True, compare=compare, progress=StepProgress("fit", progress, json_mode))
    out = _fit_json(run, f)
    out.pop("heldout")
    return {**out, "seconds": round(time.monotonic() - t, 3)}


def _contributions(run: OpenRun, method: MethodSpec, progress: "StepProgress | None" = None):
    """(Fit, Contributions) for `method`; the contributions artifact is written."""
    from engine import method as method_lib

    f = _fit(run, method, progress=progress)
    if progress is not None:
        progress.at(0, 1, f"estimating the contributions ({method.estimator})")
    c = method_lib.contributions(f.samples, f, method)
    if progress is not None:
        progress.at(1, 1, f"estimated the contributions ({method.estimator})")
    _put(run, "contributions", method, f.samples, _contributions_json(run, f, c, method.estimator))
    return f, c


def _contributions_json(run: OpenRun, f, c, estimator: str) -> dict:
    out = c.to_dict()
    return {
        "run_id": run.run_id,
        "key": estimator,  # the registry name (`estimator` is the descriptive one)
        "estimator": c.estimator,
        "estimand": out["details"].get("estimand"),
        "budget": out["details"].get("budget"),
        "contributions": out["values"],
        "stderr": out["stderr"],
        **_interval_fields(out["details"].get("interval")),
        "ranking": [int(i) for i in np.argsort(c.values, kind="stable")],  # least important first
        "n_evaluations": c.n_evaluations,
        "efficiency": out["details"].get("efficiency"),
        "r2": f.headline.get("r2"),
        "details": out["details"],
    }


def _interval_fields(interval: dict | None) -> dict:
    """ci_low / ci_high / level (None when no interval was computed) and what the interval is for."""
    if not interval:
        return {"ci_low": None, "ci_high": None, "level": None}
    return {"ci_low": interval["ci_low"], "ci_high": interval["ci_high"], "level": interval["level"],
            "interval_estimand": interval["estimand_text"], "bias_allowance": interval["bias_allowance"]}


def contributions(spec: RunSpec, method: MethodSpec = MethodSpec(), cache_dir=None,
                  run: OpenRun | None = None, evaluation: EvalSpec = EvalSpec(), progress: bool = False,
                  json_mode: bool = False) -> dict:
    """Per-layer contributions (one per layer, in layer order) with error bars and the ranking."""
    run = run or open_run(spec, cache_dir, evaluation, create=False)  # analysis: never creates a run
    t = time.monotonic()
    f, c = _contributions(run, method, StepProgress("shapley", progress, json_mode))
    art = stored(run, "contributions", method)
    return {**{k: v for k, v in art.items() if k not in ("stage", "stale")}, "seconds": round(time.monotonic() - t, 3)}


def _measure_fn(run: OpenRun, data: DataSpec | None = None):
    """Real perplexities of keep-masks on the run's windows (or on `data`'s windows)."""
    from engine.data import make_windows
    from engine.evaluate import MaskEvaluator

    windows = run.windows if data is None else make_windows(run.lm.tokenizer, data)
    return MaskEvaluator(run.lm, windows).perplexities


MIN_VAL_WINDOWS = 2  # fewer validation windows than this: no bootstrap over them, the calibration windows decide
# Baselines whose sets join the decision's candidates (computed on the calibration windows when the run has none
# stored; one forward, or L one-layer masks for ppl). Any other stored baseline (sleb, taylor) joins as well.
CANDIDATE_BASELINES = ("block-influence", "angular", "ppl")


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


def _baseline_removed(result: dict, k: int) -> tuple[int, ...] | None:
    """The set a stored baseline result (BaselineResult.to_json) removes for k, or None where it has none
    (SLEB beyond the rounds it ran)."""
    order, details = result.get("order") or [], result.get("details") or {}
    if not 0 < k < len(order):
        return None
    blocks = details.get("blocks")
    if blocks is not None:
        return tuple(range(blocks[k - 1]["start"], blocks[k - 1]["start"] + k)) if k <= len(blocks) else None
    if details.get("k_max") is not None and k > int(details["k_max"]):
        return None
    return tuple(sorted(int(i) for i in order[:k]))


def baseline_candidates(run: OpenRun, ks) -> tuple[dict, int]:
    """({k: {removed set: "baseline:<name>[+baseline:<other>]"}}, set-window evaluations spent): the sets of
    every baseline stored in the run and of CANDIDATE_BASELINES (computed on the calibration windows and
    stored as ``baseline:<name>`` when missing, as `engine baseline` stores them)."""
    from engine.baselines import run_baseline

    spent = 0
    stored_names = [n.split(":", 1)[1] for n in run.store.artifact_names() if n.startswith("baseline:")]
    results = {}
    for name in dict.fromkeys((*CANDIDATE_BASELINES, *stored_names)):
        r = run.store.get_artifact(f"baseline:{name}")
        if r is None:
            r = run_baseline(name, run.lm, run.windows).to_json()
            run.store.put_artifact(f"baseline:{name}", r)
            if name == "ppl":
                spent += run.n_layers * int(run.windows.input_ids.shape[0])
        results[name] = r
    out: dict[int, dict] = {}
    for k in ks:
        for name, r in results.items():
            s = _baseline_removed(r, k)
            if s is not None:
                have = out.setdefault(k, {}).get(s)
                out[k][s] = f"{have}+baseline:{name}" if have else f"baseline:{name}"
    return out, spent


def _decision_pool(run: OpenRun, method: MethodSpec, progress: StepProgress | None):
    """The race's window pool (racing.WindowPool): the validation windows, then the calibration windows, each
    shuffled (seed method.mc_seed); one MaskEvaluator per window range the race asks for. Returns (pool,
    calibration columns, validation columns, words for `tied_on`)."""
    import torch

    from engine import racing
    from engine.data import validation_windows
    from engine.evaluate import MaskEvaluator

    val = validation_windows(run.lm.tokenizer, run.spec.data, method.val_windows, at_most=True)
    n_val = int(val.input_ids.shape[0])
    if n_val < MIN_VAL_WINDOWS:
        n_val = 0
    rng = np.random.default_rng([method.mc_seed, 23])
    cal = run.windows.input_ids
    parts = [val.input_ids[rng.permutation(n_val)]] if n_val else []
    ids = torch.cat(parts + [cal[rng.permutation(cal.shape[0])]])  # (W, T)
    evaluators: dict[tuple[int, int], object] = {}

    def measure(masks, start, stop):
        if (start, stop) not in evaluators:
            evaluators[start, stop] = MaskEvaluator(run.lm, ids[start:stop])
        ev = evaluators[start, stop]
        nll = np.full((masks.shape[0], stop - start), np.nan)
        tok = np.zeros((masks.shape[0], stop - start), dtype=np.int64)
        for i, _, v, t, _ in ev.iter_window_losses(masks):
            nll[i], tok[i] = v, t
            if progress is not None:
                progress.tick()
        return nll, tok

    W = int(ids.shape[0])
    n_cal = W - n_val
    on = (f"{W} windows: {n_val} validation windows of the calibration text + the {n_cal} calibration windows"
          if n_val else f"the {n_cal} calibration windows (the surrogate was fitted on them)"
          + (f"; the text has too few windows outside them to validate on" if method.val_windows else ""))
    return racing.WindowPool(run.n_layers, W, measure), list(range(n_val, W)), list(range(n_val)), on


def _decide(run: OpenRun, method: MethodSpec, ks, eval_data: tuple[str, ...] = (), fc=None,
            progress: StepProgress | None = None):
    """Decide for each k in `ks` by racing the candidates (rank-and-cut, the surrogate's beam, the baselines'
    sets, the swap neighbours) on paired windows (`_decision_pool`: the validation windows of the calibration
    text, then the calibration windows; engine/racing.py): the chosen set is the best over all of them among
    the sets that finished, its ties are listed, and the chosen sets are measured on the held-out splits.
    Returns (Fit, Contributions, Decisions, {"evaluations", "baseline_evaluations", "budget_hit"})."""
    from engine import decision as decision_lib
    from engine import method as method_lib

    f, c = fc or _contributions(run, method)  # fc: (Fit, Contributions) the caller has just computed
    t0 = time.monotonic()
    ks = method_lib.check_ks(ks, run.n_layers)
    splits = method_lib.eval_splits_for(run.spec.data, tuple(eval_data))
    measures = {name: _measure_fn(run, dataclasses.replace(run.spec.data, source=name)) for name in splits}
    extra, spent = ({}, 0)
    if method.decision == "verified" and not method.no_baseline_candidates:
        extra, spent = baseline_candidates(run, ks)
    pool, cal_cols, val_cols, on = _decision_pool(run, method, progress)

    def report(event):
        if progress is not None:
            progress.begin(event["sets"], f"{event['stage']}, look {event['look']}/{event['looks']}: measuring "
                                          f"{event['sets']} candidate sets on {event['windows']} windows")

    ds = method_lib.decide(f, c, ks, None, None, method, pool=pool, calibration_cols=cal_cols,
                           validation_cols=val_cols, extra=extra, on=on, progress=report)
    if measures:
        ds = dataclasses.replace(ds, splits=decision_lib.measure_splits(ds.items, run.n_layers, measures))
    cost = {"evaluations": int(pool.evaluations), "baseline_evaluations": spent,
            "budget": method.decide_budget, "budget_hit": any(d.budget_hit for d in ds.items),
            "seconds": round(time.monotonic() - t0, 3)}  # baselines, race and held-out splits
    _put(run, "decisions", method, f.samples, {"run_id": run.run_id, "ks": [d.k for d in ds.items],
                                                 "splits_measured": list(splits), "cost": cost, **ds.to_dict()})
    return f, c, ds, cost


def default_remove(method: MethodSpec, n_layers: int) -> int:
    """The number of layers to remove: the spec's, else a quarter of the layers (at least one)."""
    return method.remove if method.remove is not None else max(1, n_layers // 4)


def decide(spec: RunSpec, method: MethodSpec = MethodSpec(), cache_dir=None, eval_data: tuple[str, ...] = (),
           run: OpenRun | None = None, ks=None) -> dict:
    """Decide which layers to remove for k = remove (and --ks, or 1..remove with --all-k), or for the given
    `ks` only; stored as the decisions artifact."""
    run = run or open_run(spec, cache_dir, create=False)
    _decide(run, method, method.decide_ks(run.n_layers) if ks is None else sorted(set(ks)), eval_data)
    return stored(run, "decisions", method)


def measure(run: OpenRun, masks) -> list[float]:
    """Real calibration perplexities of keep-masks bool[n, L] (the app's what-if "Measure")."""
    return [float(x) for x in _measure_fn(run)(np.atleast_2d(np.asarray(masks, dtype=bool)))]


def export(spec: RunSpec, method: MethodSpec, out_dir, removed=None, overwrite: bool = False, cache_dir=None,
           run: OpenRun | None = None, evaluation: EvalSpec = EvalSpec(), fmt: str = "folder",
           quant: str = "f32") -> dict:
    """Export the model without `removed` (default: the decision for k = method.remove) to `out_dir`,
    with manifest and model card, verified by a reload in a fresh process. `fmt="gguf"`: one GGUF
    file `out_dir` (engine.gguf_export) with `quant` f32 | f16 | q8_0 | q4_1."""
    from engine.prune import check_export_folder

    if fmt == "gguf":
        from engine.gguf_export import check_gguf_out

        check_gguf_out(out_dir, overwrite)  # before any model is loaded
    elif fmt == "folder":
        check_export_folder(out_dir, overwrite)  # before any model is loaded
    else:
        raise InputError(f"unknown export format {fmt!r}; choose folder or gguf.")
    if run is None:
        facts = validate.check_run(spec, remove=len(set(removed)) if removed is not None else method.remove,
                                   cache_dir=cache_dir)
        validate.check_removed(removed, facts.n_layers if facts else None)  # ids before any load or measurement
    run = run or open_run(spec, cache_dir, evaluation, create=False)  # analysis: never creates a run
    validate.check_removed(removed, run.n_layers)
    if removed is not None:
        return _export(run, method, out_dir, overwrite, None, len(set(removed)), removed, fmt=fmt, quant=quant)
    k = default_remove(method, run.n_layers)
    _, _, ds, _ = _decide(run, method, (k,))
    return _export(run, method, out_dir, overwrite, ds, k, fmt=fmt, quant=quant)


def _export(run: OpenRun, method: MethodSpec, out_dir, overwrite: bool, ds, k: int, removed=None,
            fmt: str = "folder", quant: str = "f32") -> dict:
    from engine.decision import removal_mask
    from engine.prune import prune_model

    art = stored(run, "fit", method) or {}
    if removed is None:
        d = ds.for_k(k)
        removed, measured, predicted, rule = d.removed, d.ppl_measured, d.ppl_predicted, d.method
        heldout = {name: {"before": sp.ppl_full, "after": sp.ppl[list(sp.ks).index(k)]}
                   for name, sp in ds.splits.items() if k in sp.ks}
        c = ds.contributions
    else:
        removed = tuple(sorted(int(i) for i in removed))
        measured = measure(run, removal_mask(removed, run.n_layers))[0]
        predicted, rule, heldout = None, "chosen by hand", {}
        c = None
    ppl_full = float(run.store.meta().get("ppl_full") or _measure_fn(run)(removal_mask((), run.n_layers)[None])[0])
    extra = {
        "method": rule,
        "estimator": None if c is None else c.estimator,
        "contributions": None if c is None else [float(x) for x in c.values],
        "contributions_stderr": None if c is None or c.stderr is None else [float(x) for x in c.stderr],
        "perplexities": {"calibration": {"before": ppl_full, "after": measured}, **heldout},
        "ppl_predicted": predicted,
        "surrogate": (art.get("report") or {}).get("test", {}),
        "method_spec": dataclasses.asdict(method),
        "run_id": run.run_id,
        "data": run.spec.data.source,
        "data_hash": run.windows.data_hash,
        "seeds": {"sampling": run.spec.sampling.seed, "data": run.spec.data.seed},
        "n_masks_evaluated": int(run.store.count()),
    }
    if fmt == "gguf":
        return _export_gguf(run, removed, out_dir, quant, overwrite, extra, ppl_full, measured)
    result = prune_model(run.lm, removed, out_dir, manifest_extra=extra, overwrite=overwrite,
                         verify_windows=run.windows.input_ids, expected_ppl=measured)
    out = {"run_id": run.run_id, "out": str(result.out_dir), "k": len(removed), "removed": list(removed),
           "ppl_full": ppl_full, "ppl_measured": measured,
           "verification": None if result.verification is None else dataclasses.asdict(result.verification),
           "format": "folder", "verified": result.verification is not None and result.verification.ok}
    run.store.put_artifact("export", out)
    return out


def _export_gguf(run: OpenRun, removed, out, quant: str, overwrite: bool, extra: dict, ppl_full: float,
                 measured: float) -> dict:
    from engine.gguf_export import export_gguf, manifest_path
    from engine.presets import PRESETS

    preset = PRESETS.get(run.spec.model.name)
    m = export_gguf(run.lm, removed, out, quant, manifest_extra=extra, overwrite=overwrite,
                    verify_windows=run.windows.input_ids, expected_ppl=measured,
                    tokenizer_pre=preset.gguf_tokenizer_pre if preset else "gpt2")
    v = m["verification"]
    out = {"run_id": run.run_id, "format": "gguf", "quant": quant, "out": str(out), "manifest": str(manifest_path(Path(out))),
           "size_bytes": m["size_bytes"], "sha256": m["sha256"], "k": len(m["removed_layers"]),
           "removed": m["removed_layers"], "ppl_full": ppl_full, "ppl_measured": measured, "verified": bool(v["ok"]),
           "ppl_rel_diff": v["ppl_rel_diff"], "reload_rtol": m["reload_rtol"], "fallback_tensors": m["fallback_tensors"],
           "tensor_types": m["tensor_types"], "verification": v}
    run.store.put_artifact("export", out)
    return out


def prune(spec: RunSpec, method: MethodSpec = MethodSpec(), out_dir=None, overwrite: bool = False,
          eval_data: tuple[str, ...] = (), cache_dir=None, run: OpenRun | None = None, sampled=None,
          evaluation: EvalSpec = EvalSpec(), progress: bool = False, json_mode: bool = False) -> dict:
    """fit -> contributions -> decide (k = remove, plus --ks / --all-k) -> export (if out_dir) on the run's
    samples; with `progress`, the decision's progress on stderr (StepProgress)."""
    from engine.method import check_ks
    from engine.prune import check_export_folder

    t0 = time.monotonic()
    if run is None:
        validate.check_run(spec, remove=method.remove, out_dir=out_dir, overwrite=overwrite, cache_dir=cache_dir)
    if out_dir is not None:
        check_export_folder(out_dir, overwrite)  # before any model is loaded
    run = run or open_run(spec, cache_dir, evaluation, create=False)  # analysis: never creates a run
    remove = default_remove(method, run.n_layers)
    check_ks(method.decide_ks(run.n_layers), run.n_layers)
    stages: dict[str, float] = {}
    t = time.monotonic()
    f = _fit(run, method)
    stages["fit"] = round(time.monotonic() - t, 3)
    t = time.monotonic()
    f, c = _contributions(run, method)
    stages["contributions"] = round(time.monotonic() - t, 3)
    t = time.monotonic()
    _, _, ds, cost = _decide(run, method, method.decide_ks(run.n_layers), eval_data, fc=(f, c),
                             progress=StepProgress("decide", progress, json_mode))
    stages["decide"] = round(time.monotonic() - t, 3)
    exported = None
    if out_dir is not None:
        t = time.monotonic()
        exported = _export(run, method, out_dir, overwrite, ds, remove)
        stages["export"] = round(time.monotonic() - t, 3)
    d = ds.for_k(remove)
    head = f.headline
    return {
        "run_id": run.run_id,
        "store": str(run.store.path),
        "n_masks": int(f.samples.n),
        "evaluated": int(sampled.evaluated) if sampled else 0,
        "r2": float(head["r2"]),
        "spearman": float(head["spearman"]),
        "fit": head,
        "estimator": c.estimator,
        "estimand": c.details.get("estimand"),
        "contributions": [float(x) for x in c.values],
        "contributions_stderr": None if c.stderr is None else [float(x) for x in c.stderr],
        **_interval_fields(c.details.get("interval")),
        "removed": [int(i) for i in d.removed],
        "tied": [list(t) for t in d.tied],
        "tie_level": d.tie_level,
        "tied_on": d.tied_on,
        "method": d.method,
        "source": d.source,
        "decide_evaluations": cost["evaluations"] + cost["baseline_evaluations"],
        "decide_cost": cost,
        "ppl_full": float(d.ppl_full),
        "ppl_predicted": float(d.ppl_predicted),
        "ppl_measured": float(d.ppl_measured),
        "heldout": {name: {"ppl_full": sp.ppl_full, "ppl_pruned": sp.ppl[list(sp.ks).index(remove)]}
                    for name, sp in ds.splits.items()},
        "by_k": [{"k": x.k, "removed": list(x.removed), "ppl_predicted": x.ppl_predicted,
                  "ppl_measured": x.ppl_measured, "method": x.method, "source": x.source,
                  "tied": [list(t) for t in x.tied], "validation_ppl": x.validation_ppl,
                  "n_measured": x.n_measured, "n_compared": sum(c.outcome in ("", "finished") for c in x.candidates),
                  "evaluations": x.evaluations, "budget_hit": x.budget_hit,
                  "heldout": {name: sp.ppl[list(sp.ks).index(x.k)] for name, sp in ds.splits.items()}}
                 for x in ds.items],
        "out": None if exported is None else exported["out"],
        "verification": None if exported is None else exported["verification"],
        "efficiency": c.details.get("efficiency"),
        "method_spec": dataclasses.asdict(method),
        "seconds": round(time.monotonic() - t0, 3),
        "stage_seconds": stages,
        "stages": stages,
    }


def run_all(spec: RunSpec, method: MethodSpec = MethodSpec(), out_dir=None, overwrite: bool = False,
            eval_data: tuple[str, ...] = (), cache_dir=None, progress: bool = True, json_mode: bool = False,
            evaluation: EvalSpec = EvalSpec()) -> dict:
    """The whole method in one resumable command: sample -> fit -> contributions -> decide -> export.

    Sampling is one pass unless `evaluation.single_pass` is False: nothing is fitted before every
    mask is in, so the order masks are stored in does not matter and the fewest layer calls win."""
    from engine.method import check_ks
    from engine.prune import check_export_folder

    t0 = time.monotonic()
    validate.check_run(spec, remove=method.remove, out_dir=out_dir, overwrite=overwrite, cache_dir=cache_dir)
    if out_dir is not None:
        check_export_folder(out_dir, overwrite)  # fail before minutes of sampling, not after
    if evaluation.single_pass is None:
        evaluation = dataclasses.replace(evaluation, single_pass=True)
    run = open_run(spec, cache_dir, evaluation)
    check_ks(method.decide_ks(run.n_layers), run.n_layers)  # before sampling, not after (--ks too)
    sampled = sample(spec, cache_dir, progress=progress, json_mode=json_mode, run=run, evaluation=evaluation)
    if sampled.stopped:
        raise WorkbenchError(
            f"sampling was {sampled.stopped} after {sampled.total}/{sampled.target} masks; everything evaluated is "
            "kept in the run store. Run the same command again to resume."
        )
    result = prune(spec, method, out_dir, overwrite, eval_data, cache_dir, run, sampled, progress=progress,
                   json_mode=json_mode)
    counters = ("layer_calls", "leaves", "work", "work_total", "completed", "partial", "rounds")
    result["sampling"] = {k: v for k, v in sampled.to_json().items() if k in counters}
    result["seconds"] = round(time.monotonic() - t0, 3)
    result["stage_seconds"] = result["stages"] = {"sample": sampled.seconds, **result["stage_seconds"]}
    return result


def baseline(spec: RunSpec, names, k_max: int | None = None, seed: int = 0, cache_dir=None,
             evaluation: EvalSpec = EvalSpec(), progress: bool = False) -> dict:
    """Static criteria on the calibration windows: per-layer scores and removal order of each.

    When the run of `spec` exists in the cache, each result is stored there as artifact
    ``baseline:<name>`` as soon as it is done (the app shows them beside the contributions);
    with `progress`, one JSON progress line per finished criterion goes to stderr."""
    from engine.baselines import run_baseline

    names = [names] if isinstance(names, str) else list(names)
    validate.check_run(spec)
    lm, windows = _load(spec, evaluation)
    run_id = spec.run_id(lm.identity, windows.data_hash)
    store = RunStore(cache_dir, run_id) if RunStore(cache_dir, run_id).exists() else None
    results = {}
    bar = StepProgress("baselines", progress, json_mode=True)
    for i, name in enumerate(names):
        t = time.monotonic()
        bar.at(i, len(names), f"running {name}")
        r = run_baseline(name, lm, windows, k_max=k_max, seed=seed).to_json()
        results[name] = r
        if store is not None:
            store.put_artifact(f"baseline:{name}", r)
        bar.at(i + 1, len(names), f"ran {name} ({time.monotonic() - t:.1f} s)")
    first = results[names[0]]
    out = {"model": spec.model.name, "data": spec.data.source, "n_layers": lm.n_layers,
           "run_id": run_id if store else None, **(first if len(names) == 1 else {})}
    if len(names) > 1:
        out["results"] = results
    return out


def _load(spec: RunSpec, evaluation: EvalSpec, weights: bool = True):
    from engine.data import make_windows
    from engine.models import load_model

    set_threads(evaluation.threads)
    if weights:
        lm = load_model(spec.model)
    else:
        from engine.distributed import driver_model

        lm = driver_model(spec.model)
    windows = make_windows(lm.tokenizer, spec.data)
    if weights:
        from engine.load_checks import check_ids_fit

        check_ids_fit(spec.model.name, windows.input_ids, lm.model, spec.data.source)
    return lm, windows


def heldout_predictions(run: OpenRun, method: MethodSpec) -> dict | None:
    """The stored fit's held-out masks with true and predicted scores (None when no fit is stored)."""
    art = stored(run, "fit", method)
    if not art or "heldout" not in art:
        return None
    from engine.surrogate import SCORE_FLOOR
    from engine.uncertainty import metric_intervals

    rows = np.array(art["heldout"]["rows"], dtype=int)
    table = run.store.table()
    masks, true, predicted = table.masks[rows], table.score[rows], np.array(art["heldout"]["predicted"])
    out = {"masks": masks, "true": true, "predicted": predicted, "ppl_full": float(run.store.meta()["ppl_full"])}
    if len(rows) >= 3:  # the one held-out R² the pages show, with its interval over the held-out masks
        m = metric_intervals(true, predicted, strata=masks.sum(axis=1), level=method.level)["r2"]
        out["r2_interval"] = {"value": m.value, "low": m.ci_low, "high": m.ci_high, "level": m.level, "n": m.n}
    with np.errstate(divide="ignore", invalid="ignore"):  # perplexity ratio predicted / measured per held-out mask
        factor = np.maximum(true, SCORE_FLOOR) / np.maximum(predicted, SCORE_FLOOR)
    if len(rows):
        worst = int(np.argmax(np.abs(np.log(factor))))
        out["worst"] = {"factor": float(factor[worst]), "removed": np.flatnonzero(~masks[worst]).tolist()}
    return out


def predict_ppl(run: OpenRun, method: MethodSpec, masks) -> list[float]:
    """Surrogate-predicted perplexities of keep-masks bool[n, L] (the what-if editor)."""
    from engine.surrogate import SCORE_FLOOR

    f = _fit(run, method)
    score = f.predict(np.atleast_2d(np.asarray(masks, dtype=bool)))
    return [float(f.samples.ppl_full / max(x, SCORE_FLOOR)) for x in score]


def estimand(estimator: str, design) -> str:
    """What `estimator` estimates on a run sampled with `design` (see engine.estimators)."""
    from engine.estimators import estimand as of

    return of(estimator, design)


def summarize(spec: RunSpec, method: MethodSpec = MethodSpec(), cache_dir=None, run: OpenRun | None = None,
              evaluation: EvalSpec = EvalSpec(), prompt: str | None = None, out_html=None) -> dict:
    """The stakeholder summary of the decision for k = method.remove (engine.summary has the record's
    contract); measures the full and the pruned model here, stores artifact ``summary:<hash>`` and,
    with `out_html`, writes the self-contained HTML report there."""
    import platform

    from engine import footprint, summary as summary_lib
    from engine.decision import removal_mask
    from engine.estimators import get as estimator

    ESTIMATOR_LABEL = lambda name: estimator(name).label  # noqa: E731
    if out_html is not None:
        atomic.check_output_file(out_html, "--out")  # a folder, a dangling link, a long name: before the work
    run = run or open_run(spec, cache_dir, evaluation, create=False)
    decisions = stored(run, "decisions", method)
    k = default_remove(method, run.n_layers)
    if not decisions or k not in decisions["ks"]:
        raise EstimationError(f"no decision for k = {k} with these settings yet: run `python -m engine prune "
                              f"--remove {k}` (or Decide on the Prune page) first.")
    d = next(x for x in decisions["decisions"] if x["k"] == k)
    removed = tuple(d["removed"])
    ks = decisions["ks"]
    curves = {"method": [{"k": x["k"], "ppl": x["ppl_measured"]} for x in decisions["decisions"]]}
    baselines = {name.split(":", 1)[1]: run.store.get_artifact(name) for name in run.store.artifact_names()
                 if name.startswith("baseline:")}
    sets = [(name, kk, tuple(b["order"][:kk])) for name, b in baselines.items() for kk in ks
            if len(b.get("order") or ()) >= kk]
    if sets:
        measured = _measure_fn(run)(np.stack([removal_mask(s, run.n_layers) for _, _, s in sets]))
        for (name, kk, _), ppl in zip(sets, measured):
            curves.setdefault(name, []).append({"k": kk, "ppl": float(ppl)})
    ppl = {"calibration": _paired_change(run, removed, None, method.level)}
    for name, sp in decisions["splits"].items():
        if k in sp["ks"]:
            ppl[name] = _paired_change(run, removed, name, method.level)
    ids = run.windows.input_ids
    if prompt is None and run.lm.tokenizer is not None:  # the start of a prose line of the held-out text
        from engine.data import make_windows

        splits = [name for name in decisions["splits"] if name in ppl]
        source = run.windows if not splits else make_windows(
            run.lm.tokenizer, dataclasses.replace(run.spec.data, source=splits[0]))
        prompt = summary_lib.default_prompt(run.lm.tokenizer.batch_decode(source.input_ids, skip_special_tokens=True))
    fit = stored(run, "fit", method) or {}
    record = {
        "run_id": run.run_id, "model": spec.model.name, "family": run.lm.family, "n_layers": run.n_layers,
        "n_masks": run.store.count(), "k": k, "removed": list(removed), "rule": d["method"],
        "splits_order": [n for n in decisions.get("splits_measured") or decisions["splits"] if n in ppl],
        "estimator": ESTIMATOR_LABEL(method.estimator), "r2": fit.get("r2"),
        "n_heldout": ((fit.get("report") or {}).get("split") or {}).get("n_test"),
        "ppl": ppl, "curves": curves,
        "footprint": {"full": footprint.measure(run.lm, ids).to_dict(),
                      "pruned": footprint.measure(run.lm, ids, removed).to_dict()},
        "speed": footprint.compare_speed(run.lm, ids, removed).to_dict(),
        "generation": {"prompt": prompt, "full": "".join(footprint.generate(run.lm, prompt)),
                       "pruned": "".join(footprint.generate(run.lm, prompt, removed))} if run.lm.tokenizer else None,
        "machine": f"{platform.machine()} {platform.system()}, {run.lm.device}, torch threads "
                   f"{__import__('torch').get_num_threads()}",
        "method_spec": dataclasses.asdict(method),
        "zeroshot": stored_zeroshot_pair(run.lm, removed, cache_dir),
        "healing": run.store.get_artifact(heal_name(removed, run.n_layers)),  # the report's before/after healing
    }
    _put(run, "summary", method, run.store, record)
    if out_html is not None:
        atomic.write_atomic(out_html, summary_lib.to_html(record))  # a kill or a full disk leaves no half file
        record = {**record, "html": str(out_html)}
    return record


def _paired_change(run: OpenRun, removed: tuple[int, ...], split: str | None, level: float) -> dict:
    """Perplexity of the full and the pruned model on the same windows (the run's calibration windows, or
    those of held-out text `split`), with the paired bootstrap interval of their ratio over the windows."""
    from engine.data import make_windows
    from engine.decision import removal_mask
    from engine.evaluate import MaskEvaluator
    from engine.uncertainty import compare_candidates

    windows = run.windows if split is None else make_windows(
        run.lm.tokenizer, dataclasses.replace(run.spec.data, source=split))
    masks = np.stack([np.ones(run.n_layers, dtype=bool), removal_mask(removed, run.n_layers)])  # (2, L)
    nll, tokens = MaskEvaluator(run.lm, windows).window_losses(masks)  # (2, W) each
    cmp = compare_candidates([(), tuple(removed)], nll, tokens, level=level, chosen=0)
    return {"before": cmp.ppl[0], "after": cmp.ppl[1], "ratio": cmp.ratio[1], "ratio_low": cmp.ci_low[1],
            "ratio_high": cmp.ci_high[1], "level": level, "n_windows": int(nll.shape[1])}


def generate(run: OpenRun, prompt: str, removed=(), max_new_tokens: int = 40, seed: int = 0):
    """Greedy text of the model without `removed`, streamed piece by piece (the Summary page)."""
    from engine import footprint

    return footprint.generate(run.lm, prompt, tuple(removed), max_new_tokens, seed)


# ---------------------------------------------------------------- interactions and near-optimal sets


def _interaction_key(method: MethodSpec, index: str, fit_on: str, surrogate: str, folds: int) -> dict:
    """The settings an interaction map depends on: the resolved surrogate spec (``same`` and the run's
    kind give the same key), index, budget, Monte Carlo seed, fit_on, jackknife groups and level."""
    from engine.method import interaction_spec

    spec = interaction_spec(method.surrogate, surrogate)
    return {"surrogate": dataclasses.asdict(spec), "index": index, "budget": method.budget, "mc_seed": method.mc_seed,
            "fit_on": fit_on, "folds": folds, **({"level": method.level} if folds else {})}


def interactions_name(method: MethodSpec, index: str, fit_on: str = "all", surrogate: str = INTERACTION_SURROGATE,
                      folds: int = INTERACTION_FOLDS) -> str:
    """Artifact name of an interaction map (`_interaction_key` hashed)."""
    return "interactions:" + stable_hash(_interaction_key(method, index, fit_on, surrogate, folds))


def stored_interactions(run, method: MethodSpec, index: str = "sii", fit_on: str = "all",
                        surrogate: str = INTERACTION_SURROGATE, folds: int = INTERACTION_FOLDS) -> dict | None:
    """The stored interaction map for these settings (None if not computed); ``stale`` as in `stored`."""
    store = getattr(run, "store", run)
    art = store.get_artifact(interactions_name(method, index, fit_on, surrogate, folds))
    return None if art is None else {**art, "stale": _stale(art, store)}


def interactions(spec: RunSpec, method: MethodSpec = MethodSpec(), index: str = "sii", fit_on: str = "all",
                 cache_dir=None, run: OpenRun | None = None, evaluation: EvalSpec = EvalSpec(),
                 csv_path=None, bias_check: bool = False, surrogate: str = INTERACTION_SURROGATE,
                 folds: int = INTERACTION_FOLDS) -> dict:
    """Pairwise interaction index of every layer pair on a surrogate of the run (engine.interactions):
    `matrix`, `stderr`, `pairs` (strongest first), `diagonal` (what the diagonal holds), stored as an
    artifact; `csv_path` also writes the pairs and the diagonal as CSV (i, j, kind, value, stderr).
    `surrogate`: the kind fitted for the map (default mlp+log-pairwise, the most faithful on the demo
    game; ``same`` = the run's `method.surrogate`), with the rest of `method.surrogate`'s settings.
    `folds` > 0: stderr and `details.interval` (level `method.level`) from a `folds`-group jackknife over
    the masks (method.interaction_interval; `folds` extra fits); 0: ensemble spread and Monte Carlo only.
    `bias_check` adds `bias_check` (method.interaction_bias_check: an unbiased, cross-fitted estimate
    from the real evaluations with its stderr, and `outside`: pairs whose value lies outside its
    2-stderr interval), which accounts for the surrogate's bias where the design covers the sizes."""
    from engine import method as method_lib

    if csv_path is not None:
        atomic.check_output_file(csv_path, "--csv")  # before any fit
    run = run or open_run(spec, cache_dir, evaluation, create=False)  # analysis: never creates a run
    t = time.monotonic()
    key = _interaction_key(method, index, fit_on, surrogate, folds)
    sspec = method_lib.interaction_spec(method.surrogate, surrogate)
    f = _fit(run, method) if fit_on == "train" else None  # the fit step's split; "all" needs no fit step
    s = f.samples if f is not None else samples(run)
    members = method_lib.interaction_members(s, sspec, fit_on, f)
    r = method_lib.interactions(s, members, index, method.budget, method.mc_seed)
    if folds:
        part = s if fit_on == "all" else s.subset(f.fitted.report.split.train)
        r = method_lib.interaction_interval(part, sspec, r, index, method.budget, method.mc_seed, folds, method.level,
                                            members)
    result = {"run_id": run.run_id, "n_layers": run.n_layers, "fit_on": fit_on, "surrogate": sspec.kind,
              "folds": folds, **r.to_dict()}
    if bias_check:
        chk = method_lib.interaction_bias_check(s, sspec, index, method.mc_seed)
        iu = np.triu_indices(run.n_layers, 1)
        outside = np.abs(r.matrix - chk["corrected"])[iu] > 2 * chk["stderr"][iu]
        result["bias_check"] = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in chk.items()}
        result["bias_check"]["outside"] = int(outside.sum())
    art = {"stage": "interactions", "spec": key, **_seen(s), **result}
    run.store.put_artifact(interactions_name(method, index, fit_on, surrogate, folds), art)
    out = {**result, "n_masks": int(s.n), "seconds": round(time.monotonic() - t, 3)}
    if csv_path is not None:
        out["csv"] = str(write_interactions_csv(out, csv_path))
    return out


def write_interactions_csv(result: dict, path) -> Path:
    """Rows i, j, kind (pair | diagonal), value, stderr: every pair (strongest first), then the diagonal."""
    import csv

    path = Path(path)
    with atomic.open_atomic(path, "w", newline="") as fh:  # temp file beside + rename; errors name the path
        w = csv.writer(fh)
        w.writerow(["i", "j", "kind", "value", "stderr"])
        for p in result["pairs"]:
            w.writerow([p["i"], p["j"], "pair", p["value"], p["stderr"]])
        for i, row in enumerate(result["matrix"]):
            w.writerow([i, i, "diagonal", row[i], result["stderr"][i][i]])
    return path


def candidates(spec: RunSpec, method: MethodSpec = MethodSpec(), top: int = 10, cache_dir=None,
               run: OpenRun | None = None, evaluation: EvalSpec = EvalSpec(), progress: bool = False,
               json_mode: bool = False) -> dict:
    """The near-optimal sets explorer for k = 1..remove (default L/4): the `top` best removal sets per k
    by surrogate prediction with ensemble intervals, the measured perplexity of those the run has
    measured (sampled masks and the stored decision's candidates), layer frequencies and
    interchangeable pairs; stored as the ``candidates:<hash>`` artifact."""
    from engine import method as method_lib

    run = run or open_run(spec, cache_dir, evaluation, create=False)  # analysis: never creates a run
    t = time.monotonic()
    f = _fit(run, method)
    # Real calibration perplexities are facts of the run, whatever settings decided them: every stored
    # decision's measured sets count (a decision for another k or rule measured sets this k has too).
    every = [run.store.get_artifact(n) for n in run.store.artifact_names() if n.startswith("decisions:")]
    measured = method_lib.measured_sets(f.samples, {"decisions": [d for a in every if a for d in a.get("decisions", [])]})
    ks = list(range(1, default_remove(method, run.n_layers) + 1))
    bar = StepProgress("candidates", progress, json_mode)
    items = []
    for i, k in enumerate(ks):  # one k at a time, so the progress says which
        bar.at(i, len(ks), f"searching the {top} best removal sets of {k} layers")
        items += method_lib.near_optimal(f.samples, f, [k], top, measured)
    bar.at(len(ks), len(ks), f"searched k = 1..{ks[-1]}")
    result = {"run_id": run.run_id, "n_layers": run.n_layers, "ppl_full": f.samples.ppl_full, "top": int(top),
              "ks": [n.k for n in items], "candidates": [n.to_dict() for n in items]}
    run.store.put_artifact(candidates_name(method, top), {"stage": "candidates", **_seen(f.samples), **result})
    return {**result, "n_masks": int(f.samples.n), "seconds": round(time.monotonic() - t, 3)}


def candidates_name(method: MethodSpec, top: int) -> str:
    return "candidates:" + stable_hash({**method.key("fit"), "remove": method.remove, "top": int(top)})


def stored_candidates(run, method: MethodSpec, top: int = 10) -> dict | None:
    store = getattr(run, "store", run)
    art = store.get_artifact(candidates_name(method, top))
    return None if art is None else {**art, "stale": _stale(art, store)}


def interaction_indices() -> dict[str, str]:
    """{index name: description} of the interaction indices (for the app's choices)."""
    from engine.interactions import INDICES

    return dict(INDICES)


def measure_pair(run: OpenRun, i: int, j: int) -> dict:
    """Real calibration perplexity of the full model, of removing i, j, and both; the measured
    interaction at the full model s(N) - s(N-i) - s(N-j) + s(N-ij) (scores s = ppl_full / ppl;
    positive = the two layers are worth more together). Appended to the ``pair_measurements``
    artifact (never to the samples: these masks are not part of the sampling design)."""
    L = run.n_layers
    i, j = int(i), int(j)
    if not (0 <= i < L and 0 <= j < L and i != j):
        raise WorkbenchError(f"choose two different layers between 0 and {L - 1}; got {i} and {j}.")
    masks = np.ones((4, L), dtype=bool)  # full, -i, -j, -ij
    masks[1, i] = masks[2, j] = masks[3, [i, j]] = False
    ppl = np.array(measure(run, masks))
    s = np.where(np.isfinite(ppl) & (ppl > 0), ppl[0] / ppl, 0.0)
    out = {"i": min(i, j), "j": max(i, j), "ppl_full": float(ppl[0]), "ppl_without_i": float(ppl[1]),
           "ppl_without_j": float(ppl[2]), "ppl_without_both": float(ppl[3]),
           "interaction_at_full": float(s[0] - s[1] - s[2] + s[3]), "n_masks": int(run.store.count())}
    past = [m for m in (run.store.get_artifact("pair_measurements") or {}).get("items", [])
            if (m["i"], m["j"]) != (out["i"], out["j"])]
    run.store.put_artifact("pair_measurements", {"items": [*past, out]})
    return out


def predicted_pair_at_full(run: OpenRun, method: MethodSpec, i: int, j: int) -> float:
    """The surrogate's f(N) - f(N-i) - f(N-j) + f(N-ij): the same quantity `measure_pair` measures, so
    the two can be compared directly (the map's index averages such terms over many coalitions)."""
    masks = np.ones((4, run.n_layers), dtype=bool)  # full, -i, -j, -ij
    masks[1, i] = masks[2, j] = masks[3, [i, j]] = False
    f = _fit(run, method).predict(masks)  # (4,) scores
    return float(f[0] - f[1] - f[2] + f[3])


# ---------------------------------------------------------------- quality against real work (the Surrogate page)


def work_curve(run: OpenRun, method: MethodSpec = MethodSpec()) -> dict:
    """The run's quality-vs-work curve for `method.surrogate`: held-out R² and Spearman (intervals at
    `method.level`, n) of a surrogate fitted on the first training rows in store order, against the
    real evaluation work (token-layer calls) spent on them (`uncertainty.work_curve`, same held-out
    rows as the fit). Stored in the fit artifact under ``work_curve`` (when that artifact exists:
    `engine fit` writes it first), with the n_masks / n_windows_evaluated it saw."""
    from engine.uncertainty import work_curve as curve

    s = samples(run)
    work = run.store.table().work[:s.n]  # rows only ever append: the first s.n are the rows of s
    result = {**curve(s.masks, s.scores, work, method.surrogate, ppl_full=s.ppl_full, sample_weight=s.weights,
                      testable=s.testable, level=method.level, seed=method.surrogate.seed), **_seen(s)}
    name = artifact_name("fit", method)
    art = run.store.get_artifact(name)
    if art is not None:
        run.store.put_artifact(name, {**art, "work_curve": result})
    return result


# ---------------------------------------------------------------- healing (engine/heal.py)


class _HealProgress:
    """A line every few seconds on stderr: step, loss, ETA (json_mode: {"event": "progress", ...})."""

    def __init__(self, enabled: bool, json_mode: bool):
        self.enabled, self.json_mode = enabled, json_mode
        self.t0 = self.last = time.monotonic()
        self.first_step = None

    def __call__(self, step: int, steps: int, loss: float, lr: float) -> None:
        if self.first_step is None:
            self.first_step = step - 1
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


def _export_manifest(model_name: str) -> dict | None:
    """The pruning manifest of `model_name` when it is an export folder of this tool, else None."""
    from engine.prune import MANIFEST

    path = Path(model_name) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _decision_for(run: OpenRun, method: MethodSpec, k: int) -> tuple[tuple[int, ...], str]:
    """(removed, rule) of the run's decision for k: the stored decisions when current, else decided now."""
    art = stored(run, "decisions", method)
    if art and not art["stale"] and k in art.get("ks", []):
        d = next(d for d in art["decisions"] if d["k"] == k)
        return tuple(int(i) for i in d["removed"]), d["method"]
    _, _, ds, _ = _decide(run, method, (k,))
    d = ds.for_k(k)
    return tuple(int(i) for i in d.removed), d.method


def heal_name(removed, n_layers: int) -> str:
    """Run-store artifact of a healing of the run's model without `removed` (the Summary page reads it)."""
    from engine.decision import removal_mask

    return "heal:" + "".join("1" if b else "0" for b in removal_mask(removed, n_layers))


def heal(spec: RunSpec, method: MethodSpec, healing, out_dir=None, removed=None, overwrite: bool = False,
         eval_data: tuple[str, ...] = (), cache_dir=None, evaluation: EvalSpec = EvalSpec(), progress: bool = True,
         json_mode: bool = False) -> dict:
    """LoRA healing (engine/heal.py) of the model without `removed`, or of the run's decision for
    `method.remove`, or of an export folder as it is; measured before/after on held-back windows of the
    healing text and on the held-out texts; exported (merged, verified by a fresh-process reload) to
    `out_dir` when given. Resumes from the cache's checkpoint of the same settings after a kill."""
    import dataclasses as dc

    from engine import heal as heal_lib
    from engine.config import HEAL_STEPS, default_cache_dir
    from engine.data import load_text, make_windows, tokenizer_hash
    from engine.decision import removal_mask
    from engine.errors import InputError
    from engine.method import DEMO_EVAL_SPLITS, eval_splits_for
    from engine.prune import check_export_folder, package_versions, prune_model

    t0 = time.monotonic()
    if out_dir is not None:
        check_export_folder(out_dir, overwrite, source=spec.model.name)  # before any model is loaded
    heal_source = healing.data or spec.data.source
    text_field = spec.data.text_field
    heal_text = load_text(heal_source, text_field)
    checked = tuple(dict.fromkeys((*DEMO_EVAL_SPLITS, *eval_data)))
    overlap, warnings = heal_lib.check_overlap(heal_source, heal_text, {n: load_text(n, text_field) for n in checked},
                                               healing.allow_overlap)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr, flush=True)
    measured = tuple(n for n in eval_splits_for(dc.replace(spec.data, source=heal_source), tuple(eval_data))
                     if n != heal_source)
    source_manifest = _export_manifest(spec.model.name)
    run, rule = None, "chosen by hand"
    if removed is not None:
        validate.check_run(spec, remove=len(set(removed)), cache_dir=cache_dir)
        lm, _ = load(spec, evaluation)
    elif method.remove is not None:
        validate.check_run(spec, remove=method.remove, cache_dir=cache_dir)
        run = open_run(spec, cache_dir, evaluation, create=False)  # the decision needs the run's samples
        lm = run.lm
        removed, rule = _decision_for(run, method, method.remove)
    elif source_manifest is not None:
        validate.check_run(spec, cache_dir=cache_dir)
        lm, _ = load(spec, evaluation)
        removed, rule = (), "the export's own layers"
    else:
        raise InputError("say which layers to remove before healing: --remove K (the run's decision for K layers), "
                         "--removed 2,3,5 (0-based), or --model an export folder (healed as it is).")
    L = lm.n_layers
    removed = tuple(sorted(int(i) for i in removed))
    bad = [i for i in removed if not 0 <= i < L]
    if bad or len(set(removed)) != len(removed) or len(removed) >= L:
        raise InputError(f"--removed {','.join(map(str, removed))}: the model has layers 0..{L - 1}; give distinct "
                         "layers and keep at least one.")
    kept = [i for i in range(L) if i not in set(removed)]
    mask = removal_mask(removed, L)
    T = healing.seq_len or spec.data.seq_len
    hw = heal_lib.healing_windows(lm.tokenizer, heal_text, T, healing.held_back, healing.seed)
    steps = heal_lib.total_steps(healing, len(hw.train), HEAL_STEPS)
    evals = {}
    for name in measured:
        text = load_text(name, text_field)
        n_tok = len(lm.tokenizer(text, add_special_tokens=False)["input_ids"])
        n = min(healing.eval_windows, n_tok // spec.data.seq_len)
        evals[name] = make_windows(lm.tokenizer, dc.replace(spec.data, source=name, n_windows=max(1, n)),
                                   text=text).input_ids
    splits = {"heal": hw.held_back, **evals}
    before = {name: heal_lib.window_losses(lm, w, mask) for name, w in splits.items()}

    cache = Path(cache_dir).resolve() if cache_dir else default_cache_dir()
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    key = heal_lib.checkpoint_key(lm.identity, kept, L, healing, hw.text_sha256, tokenizer_hash(lm.tokenizer), dtype, T)
    checkpoint = heal_lib.HealCheckpoint(cache / "heal" / key, key)
    outcome = heal_lib.heal_model(lm, kept, hw, healing, steps, checkpoint, _HealProgress(progress, json_mode))
    after = {name: heal_lib.window_losses(lm, w, mask) for name, w in splits.items()}
    results = {name: heal_lib.compare(before[name][:2], after[name][:2], before[name][2], method.level,
                                      method.mc_seed) for name in splits}
    h = results["heal"]
    import peft

    settings = {**dc.asdict(healing), "lora_alpha": healing.lora_alpha, "seq_len": T, "steps": steps,
                "warmup": heal_lib.WARMUP, "optimizer": "AdamW (weight decay 0, grad-norm clip 1.0)",
                "target_modules": len(outcome.target_modules), "trainable_params": outcome.trainable_params}
    out = {
        "model": spec.model.name, "run_id": run.run_id if run else None, "n_layers": L, "removed": list(removed),
        "kept": kept, "rule": rule, "heal_data": heal_source, "heal_data_sha256": hw.text_sha256,
        "n_train_windows": int(len(hw.train)), "n_held_back": int(len(hw.held_back)),
        "steps": steps, "resumed_from": outcome.resumed_from, "steps_run": steps - outcome.resumed_from,
        "train_seconds": round(outcome.seconds, 2), "loss_first": outcome.loss_first, "loss_last": outcome.loss_last,
        "ppl_full": h["ppl_full"], "ppl_before": h["ppl_before"], "ppl_after": h["ppl_after"],
        "recovered": h["recovered"], "heldout": {n: r for n, r in results.items() if n != "heal"},
        "held_back": h, "overlap": overlap, "warnings": warnings, "settings": settings,
        "checkpoint": str(checkpoint.path), "out": None, "verified": None, "verification": None,
    }
    if out_dir is not None:
        extra = {
            "method": f"{rule}, then LoRA healing",
            "perplexities": {f"{heal_source} (held back)" if n == "heal" else n:
                             {"before": r["ppl_full"], "after": r["ppl_after"]} for n, r in results.items()},
            "healing": {**settings, "data": heal_source, "data_sha256": hw.text_sha256, "tokenizer": tokenizer_hash(
                lm.tokenizer), "loss_first": outcome.loss_first, "loss_last": outcome.loss_last,
                "seconds": round(outcome.seconds, 2), "peft": peft.__version__, "results": results,
                "pruned_by": rule, "source_export": None if source_manifest is None else {
                    "folder": str(Path(spec.model.name).resolve()),
                    "removed_layers": source_manifest.get("removed_layers"),
                    "n_layers_original": source_manifest.get("n_layers_original")}},
            "run_id": out["run_id"],
            "versions_healing": {**package_versions(), "peft": peft.__version__},
        }
        result = prune_model(lm, removed, out_dir, manifest_extra=extra, overwrite=overwrite,
                             verify_windows=hw.held_back, expected_ppl=h["ppl_after"])
        ver = None if result.verification is None else dataclasses.asdict(result.verification)
        out.update(out=str(result.out_dir), verified=None if ver is None else bool(ver["ok"]), verification=ver)
    if run is not None:
        run.store.put_artifact(heal_name(removed, L), out)
    out["seconds"] = round(time.monotonic() - t0, 2)
    return out
# ---------------------------------------------------------------- zero-shot accuracy (lm-eval)

ZEROSHOT_DIR = "zeroshot"  # <cache>/zeroshot/<model hash>/run.sqlite: results keyed by model + set + tasks + limit
RUN_CHOICES = ("decision", "rank-and-cut")  # what `against` / `choose` name besides "full", criteria and layer lists


@dataclass(frozen=True)
class ModelChoice:
    """Which layers of the model a zero-shot evaluation deletes, and why."""

    label: str  # "full", "decision", "rank-and-cut", a baseline criterion, or "removed"
    removed: tuple[int, ...]


def parse_choice(text: str) -> str | tuple[int, ...]:
    """'full' | 'decision' | 'rank-and-cut' | a baseline criterion | a layer list '2,3,5'."""
    from engine.baselines import BASELINES
    from engine.config import parse_ints

    text = text.strip()
    if text in ("full", *RUN_CHOICES, *BASELINES):
        return text
    try:
        return tuple(sorted(set(parse_ints(text))))
    except WorkbenchError:
        raise WorkbenchError(f"--against {text!r}: name full, decision, rank-and-cut, a criterion "
                             f"({', '.join(BASELINES)}) or a layer list such as 2,3,5.") from None


def _needs_run(choice) -> bool:
    return isinstance(choice, str) and choice != "full"


def resolve_choice(choice, k: int | None, run: OpenRun | None, method: MethodSpec) -> ModelChoice:
    """The removed set of a choice: a run's decision or rank-and-cut for k (decided now when not
    stored), a stored baseline criterion's set for k, or an explicit list."""
    from engine.baselines import BASELINES, BaselineResult
    from engine.decision import rank_and_cut

    if not isinstance(choice, str):
        return ModelChoice("removed", tuple(choice))
    if choice == "full":
        return ModelChoice("full", ())
    if k is None:
        raise WorkbenchError(f"{choice!r} needs --remove K (the number of layers removed).")
    if run is None:
        raise WorkbenchError(f"{choice!r} needs the run of the sampling options (--model, --data, --masks ...).")
    if choice in BASELINES:
        art = run.store.get_artifact(f"baseline:{choice}")
        if art is None:
            raise WorkbenchError(f"run {run.run_id} has no stored {choice} baseline: run `python -m engine baselines "
                                 f"--method {choice}` with the same model and data options first.")
        b = BaselineResult(art["method"], np.array([np.nan if s is None else s for s in art["scores"]], dtype=float),
                           tuple(art["order"]), art.get("details") or {})
        return ModelChoice(choice, b.removed(k))
    art = stored(run, "decisions", method)
    items = {d["k"]: d for d in (art or {}).get("decisions", [])} if art and not art["stale"] else {}
    if k not in items:
        _decide(run, method, sorted({k, *items}))
        art = stored(run, "decisions", method)
        items = {d["k"]: d for d in art["decisions"]}
    if choice == "decision":
        return ModelChoice("decision", tuple(items[k]["removed"]))
    contributions = stored(run, "contributions", method)["contributions"]
    return ModelChoice("rank-and-cut", rank_and_cut(contributions, k))


def zeroshot_store(lm, cache_dir) -> RunStore:
    """The store of zero-shot results for one model (by identity), under <cache>/zeroshot/."""
    from engine.config import default_cache_dir

    root = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / ZEROSHOT_DIR
    sid = stable_hash({"model": lm.identity})
    return RunStore.open(root, sid, {"kind": "zeroshot", "model": getattr(lm.spec, "name", None),
                                     "model_identity": lm.identity, "n_layers": lm.n_layers})


def zeroshot_name(removed, zs) -> str:
    """Artifact name of one evaluation: removed set + tasks + limit (the store is the model's)."""
    return f"zeroshot:{stable_hash({'removed': sorted(int(i) for i in removed), **zs.key()})}"


def evaluate_choice(lm, choice: ModelChoice, zs, cache_dir, progress=None, store: RunStore | None = None,
                    recompute: bool = False) -> dict:
    """Zero-shot result of `lm` without `choice.removed` (stored; a stored one is returned as it is).
    The dict is ZeroShotResult.to_json() plus label, removed, n_kept, params, cached, raw."""
    from engine import zeroshot
    from engine.prune import _kept_from_removed, pruned_view

    store = store or zeroshot_store(lm, cache_dir)
    name = zeroshot_name(choice.removed, zs)
    hit = None if recompute else store.get_artifact(name)
    if hit is not None:
        return {**hit, "label": choice.label, "cached": True}
    kept, removed = _kept_from_removed(choice.removed, lm.n_layers)
    with pruned_view(lm.model, lm.adapter, kept):
        params = sum(p.numel() for p in lm.model.parameters())
        r = zeroshot.evaluate_model(lm.model, lm.tokenizer, zs.tasks, cache_dir=_cache_root(cache_dir),
                                    limit=zs.limit, batch_size=zs.batch_size, progress=progress)
    art = {**r.to_json(), "removed": list(removed), "n_layers": lm.n_layers, "n_kept": len(kept), "params": params,
           "params_full": lm.n_params, "model": getattr(lm.spec, "name", None), "model_identity": lm.identity,
           "spec": zs.key(), "raw": r.raw}
    store.put_artifact(name, art)
    return {**art, "label": choice.label, "cached": False}


def _cache_root(cache_dir) -> Path:
    from engine.config import default_cache_dir

    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def zeroshot_eval(model: ModelSpec, zs, choose=None, against=(), k: int | None = None, spec: RunSpec | None = None,
                  method: MethodSpec = MethodSpec(), cache_dir=None, out_json=None, progress: bool = True,
                  json_mode: bool = False, evaluation: EvalSpec = EvalSpec(), recompute: bool = False) -> dict:
    """Zero-shot accuracy (lm-eval) of one model choice, and paired comparisons against others.

    `choose`: 'full' (default), 'decision', 'rank-and-cut', a baseline criterion (all three for
    k = `k`, from the run of `spec`), or a tuple of layers to delete. `against`: more choices,
    each compared with the chosen one on the same items (paired bootstrap). Every evaluation is
    stored in the model's zero-shot store (<cache>/zeroshot/), keyed by removed set + tasks +
    limit, so a rerun or the app reads it back instead of evaluating again. `out_json`: also
    write lm-eval's results JSON of the chosen model there."""
    from engine import zeroshot
    from engine.tasks import check_tasks

    t0 = time.monotonic()
    validate.check_cache_dir(cache_dir)
    check_tasks(zs.tasks, _cache_root(cache_dir))  # the offline error before any model is loaded
    choose = "full" if choose is None else choose
    choices = [choose, *[a for a in against if a != choose]]
    run = None
    if any(_needs_run(c) for c in choices):
        if spec is None:
            raise WorkbenchError("a run's decision or a baseline needs the run's options (--model, --data, --masks).")
        run = open_run(spec, cache_dir, evaluation, create=False)
        lm = run.lm
    else:
        from engine.models import load_model

        set_threads(evaluation.threads)
        lm = load_model(model)
    resolved = [resolve_choice(c, k, run, method) for c in choices]
    store = zeroshot_store(lm, cache_dir)
    bar = zeroshot.Progress(progress, json_mode)
    results = [evaluate_choice(lm, c, zs, cache_dir, bar, store, recompute) for c in resolved]
    main = results[0]
    comparisons = []
    for other in results[1:]:
        cmp = zeroshot.compare(main, other, boot=zs.pair_boot, level=zs.pair_level)
        comparisons.append({"a": main["label"], "a_removed": main["removed"], "b": other["label"],
                            "b_removed": other["removed"], **cmp})
    if out_json is not None:
        zeroshot.write_results_json(_raw_result(main), out_json,
                                    {"model": model.name, "removed": main["removed"], "label": main["label"]})
    strip = lambda r: {k2: v for k2, v in r.items() if k2 != "raw"}  # noqa: E731
    return {
        "model": model.name, "label": main["label"], "removed": main["removed"], "k": len(main["removed"]),
        "n_layers": lm.n_layers, "n_kept": main["n_kept"], "params": main["params"],
        "tasks": {t: {kk: v[kk] for kk in ("acc", "stderr", "n", "split", "acc_norm", "acc_norm_stderr", "perplexity",
                                            "perplexity_stderr")} for t, v in main["tasks"].items()},
        "mean": main["mean"], "mean_stderr": main["mean_stderr"], "limit": zs.limit, "cached": main["cached"],
        "evaluated": [{kk: v for kk, v in strip(r).items() if kk != "tasks"} |
                      {"tasks": {t: {"acc": s["acc"], "stderr": s["stderr"], "n": s["n"]} for t, s in r["tasks"].items()}}
                      for r in results],
        "comparisons": comparisons, "run_id": None if run is None else run.run_id,
        "store": str(store.path), "out": None if out_json is None else str(out_json),
        "seconds": round(time.monotonic() - t0, 2),
    }


def _raw_result(art: dict):
    from engine import zeroshot

    r = zeroshot.ZeroShotResult.from_json(art)
    return dataclasses.replace(r, raw=art.get("raw") or {})


def stored_zeroshot(lm, removed, zs, cache_dir=None) -> dict | None:
    """A stored zero-shot result (None when that model + set + tasks + limit was never evaluated)."""
    return zeroshot_store(lm, cache_dir).get_artifact(zeroshot_name(removed, zs))


def zeroshot_table(run: OpenRun, method: MethodSpec, zs, choices, cache_dir=None) -> dict:
    """Stored zero-shot results of `choices` (see resolve_choice; k = method.remove) on `run`'s model,
    read only (nothing is evaluated or decided): one row per choice with per task acc ± stderr (n),
    the mean, parameters kept, and the paired comparison of the first choice against the row.
    Rows not evaluated yet have `stored: False`; a choice that cannot be resolved without computing
    (no stored decision or baseline) is listed with `problem`."""
    from engine import zeroshot

    store = zeroshot_store(run.lm, cache_dir)
    rows, first = [], None
    for c in choices:
        try:
            choice = _resolve_stored(c, method.remove, run, method)
        except WorkbenchError as e:
            rows.append({"label": c if isinstance(c, str) else "removed", "stored": False, "problem": str(e)})
            continue
        art = store.get_artifact(zeroshot_name(choice.removed, zs))
        row = {"label": choice.label, "removed": list(choice.removed), "stored": art is not None}
        if art is not None:
            row.update(tasks={t: {kk: v[kk] for kk in ("acc", "stderr", "n")} for t, v in art["tasks"].items()},
                       mean=art["mean"], mean_stderr=art["mean_stderr"], params_kept=art["params"] / art["params_full"],
                       seconds=art["seconds"])
            if first is None:
                first = (choice.label, art)
            else:
                cmp = zeroshot.compare(first[1], art, boot=zs.pair_boot, level=zs.pair_level)
                row["vs_first"] = {"a": first[0], **cmp["mean"], "tasks": cmp["tasks"]}
        rows.append(row)
    return {"rows": rows, "limit": zs.limit, "tasks": list(zs.tasks), "k": method.remove}


def _resolve_stored(choice, k, run: OpenRun, method: MethodSpec) -> ModelChoice:
    """resolve_choice without deciding: a decision / rank-and-cut needs the stored decisions for k."""
    if choice in RUN_CHOICES:
        art = stored(run, "decisions", method)
        items = {d["k"]: d for d in (art or {}).get("decisions", [])}
        if k not in items:
            raise WorkbenchError(f"no stored decision for k = {k}: Decide on the Prune page, or press Evaluate "
                                 "(the job decides first).")
    return resolve_choice(choice, k, run, method)


def stored_baseline_names(run: OpenRun) -> list[str]:
    """Baseline criteria stored in the run (artifacts baseline:<name>)."""
    return [n.split(":", 1)[1] for n in run.store.artifact_names() if n.startswith("baseline:")]


def zeroshot_data_missing(task_names, cache_dir=None) -> str | None:
    """The offline error's message when the task files are not in the cache (None when they are)."""
    from engine.tasks import TaskDataMissing, check_tasks

    try:
        check_tasks(task_names, _cache_root(cache_dir))
    except TaskDataMissing as e:
        return str(e)
    return None


def stored_zeroshot_pair(lm, removed, cache_dir=None) -> dict | None:
    """Stored zero-shot results of the full model and of the model without `removed` on the same tasks
    and limit (the pair with the most items when several are stored), with the paired comparison;
    None when no such pair was evaluated (`engine evaluate --removed ... --against full`)."""
    from engine import zeroshot

    root = _cache_root(cache_dir) / ZEROSHOT_DIR / stable_hash({"model": lm.identity})
    if not (root / "run.sqlite").is_file():
        return None
    store = zeroshot_store(lm, cache_dir)
    arts = [store.get_artifact(n) for n in store.artifact_names() if n.startswith("zeroshot:")]
    by_key: dict[str, dict] = {}
    for a in arts:
        if a["removed"] in ([], sorted(int(i) for i in removed)):
            by_key.setdefault(json.dumps(a["spec"], sort_keys=True), {})["full" if not a["removed"] else "pruned"] = a
    pairs = [p for p in by_key.values() if len(p) == 2 or (not removed and "full" in p)]
    if not pairs:
        return None
    best = max(pairs, key=lambda p: sum(t["n"] for t in p["full"]["tasks"].values()))
    full, pruned = best["full"], best.get("pruned", best["full"])
    cmp = zeroshot.compare(pruned, full)
    return {"limit": full["limit"], "tasks": {t: {"full": v["acc"], "full_stderr": v["stderr"], "n": v["n"],
                                                  "pruned": pruned["tasks"][t]["acc"],
                                                  "pruned_stderr": pruned["tasks"][t]["stderr"],
                                                  "diff": cmp["tasks"][t]}
                                              for t, v in full["tasks"].items() if t in pruned["tasks"]},
            "mean": {"full": full["mean"], "pruned": pruned["mean"], "diff": cmp["mean"]}}
