"""Zero-shot accuracy (lm-eval) of model choices: the full model, a run's decision or rank-and-cut, a
baseline's set or a layer list; results in the model's zero-shot store under <cache>/zeroshot/."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine import validate
from engine.config import EvalSpec, MethodSpec, ModelSpec, RunSpec, stable_hash
from engine.errors import WorkbenchError
from engine.store import RunStore
from engine.pipeline.run import OpenRun, open_run, set_threads
from engine.pipeline.artifacts import stored, zeroshot_name
from engine.pipeline.stages import _decide


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


def evaluate_choice(lm, choice: ModelChoice, zs, cache_dir, progress=None, store: RunStore | None = None,
                    recompute: bool = False) -> dict:
    """Zero-shot result of `lm` without `choice.removed` (stored; a stored one is returned as it is).
    The dict is ZeroShotResult.to_json() plus label, removed, n_kept, params, cached, raw."""
    from engine import zeroshot
    from engine.export import _kept_from_removed, pruned_view

    store = store or zeroshot_store(lm, cache_dir)
    name = zeroshot_name(choice.removed, zs)
    hit = None if recompute else store.get_artifact(name)
    if hit is not None:
        return {**hit, "label": choice.label, "cached": True}
    kept, removed = _kept_from_removed(choice.removed, lm.n_layers)
    with pruned_view(lm.model, lm.adapter, kept):
        params = sum(p.numel() for p in lm.model.parameters())
        r = zeroshot.evaluate_model(lm.model, lm.tokenizer, zs.tasks, cache_dir=_cache_root(cache_dir),
                                    limit=zs.limit, batch_size=zs.batch_size, progress=progress, scorer=zs.scorer)
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
        "scorer": main.get("scorer", "hflm"),
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
