"""One builder per JSON record the stages return or store (fit, contributions, the run record's
contribution fields), so each field is written in one place."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from engine.jsonable import jsonable

from engine.pipeline.run import OpenRun


def _fit_json(run: OpenRun, f) -> dict:
    """The fit artifact: headline, report, curve/comparison, and the held-out predictions (store
    order row indices and predicted scores), so pages plot predicted vs true without refitting."""
    test = f.fitted.report.split.test
    heldout = {"rows": [int(i) for i in test], "predicted": [float(x) for x in f.predict(f.samples.masks[test])]}
    return {"run_id": run.run_id, **f.headline, **f.summary, "heldout": heldout}


def contribution_fields(c) -> dict:
    """The fields every record writes for a shapley.Contributions `c`, in this order: estimator, estimand,
    contributions and stderr (floats, layer order), ci_low / ci_high / level (+ interval_estimand,
    bias_allowance when an interval was computed). Records rename `stderr` where they must."""
    return {
        "estimator": c.estimator,
        "estimand": c.details.get("estimand"),
        "contributions": [float(x) for x in c.values],
        "stderr": None if c.stderr is None else [float(x) for x in c.stderr],
        **_interval_fields(c.details.get("interval")),
    }


def manifest_contributions(c) -> dict:
    """The export manifest's contribution fields (all None for a set chosen by hand, `c` None)."""
    if c is None:
        return {"estimator": None, "contributions": None, "contributions_stderr": None}
    fields = contribution_fields(c)
    return {"estimator": fields["estimator"], "contributions": fields["contributions"],
            "contributions_stderr": fields["stderr"]}


def _contributions_json(run: OpenRun, f, c, estimator: str) -> dict:
    """The contributions artifact (and `engine shapley`'s record): `contribution_fields` made JSON-safe
    (non-finite -> None) between the run id, registry key and budget, and the ranking and details."""
    out = c.to_dict()
    fields = jsonable(contribution_fields(c))
    return {
        "run_id": run.run_id,
        "key": estimator,  # the registry name (`estimator` is the descriptive one)
        "estimator": fields.pop("estimator"),
        "estimand": fields.pop("estimand"),
        "budget": out["details"].get("budget"),
        **fields,
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


def prune_record(run: OpenRun, method, f, c, ds, cost: dict, remove: int, sampled, exported: dict | None,
                 stages: dict, t0: float) -> dict:
    """`engine prune` / `engine run`'s record: the fit's headline, the contributions, the decision for
    k = `remove` with its cost and held-out perplexities, every k's decision (`by_k`), the export."""
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
        **{("contributions_stderr" if k == "stderr" else k): v for k, v in contribution_fields(c).items()},
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
