"""Collecting samples: evaluate the run's masks in rounds (design, then active plans), each on its
first windows, complete partial rows (multi-fidelity), commit every row as it finishes; `samples(run)`
reads them back as a method.Samples and `sampling_progress(run)` describes them."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np

from engine import validate
from engine.config import EvalSpec, RunSpec
from engine.errors import EstimationError, WorkbenchError
from engine.store import RunStore
from engine.pipeline.run import OpenRun, load, open_run
from engine.pipeline.progress import _Progress


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
    lease = store.lease()
    # A run stopped (cancelled, failed, died) then asked for no more masks than it holds still takes the
    # writer: the sample's first `target` masks may lack some (a stop mid-chunk keeps part of a chunk, in
    # trie order), and the run's status must say finished once they are all there.
    stopped_before = lease is not None and lease.status != "finished"
    if len(done) < target or ppl_full is None or _completion_pending(run) or stopped_before:
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
    from engine.fidelity import first_windows, row_scores
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
                # over the evaluated windows (= ppl_full / ppl when every window is evaluated); a completion
                # (store.Writer.complete) rescores the row with the same function
                losses = () if nll is None else (nll[None], tokens[None], *full)  # (1, W), (1, W), (W,), (W,)
                score, flag = row_scores(np.array([ppl], dtype=float), ppl_full, *losses)
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
