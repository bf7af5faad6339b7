"""The one home of spec -> artifact name -> staleness: every stage result is stored as an artifact
named by a hash of the spec fields that decide it, holding the n_masks / n_windows_evaluated it saw,
so a reader tells a stale result (the store grew since) from a current one."""

from __future__ import annotations

import numpy as np

from engine.config import INTERACTION_FOLDS, INTERACTION_SURROGATE, InteractionSpec, MethodSpec, stable_hash
from engine.store import RunStore
from engine.pipeline.run import OpenRun


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


def _interaction_key(method: MethodSpec, index: str, fit_on: str, surrogate: str, folds: int) -> dict:
    """The settings an interaction map depends on: the resolved surrogate spec (``same`` and the run's
    kind give the same key), index, budget, Monte Carlo seed, fit_on, jackknife groups and level."""
    from engine.method import interaction_spec

    return InteractionSpec(index, fit_on, surrogate, folds).key(method, interaction_spec(method.surrogate, surrogate))


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


def candidates_name(method: MethodSpec, top: int) -> str:
    return "candidates:" + stable_hash({**method.key("fit"), "remove": method.remove, "top": int(top)})


def stored_candidates(run, method: MethodSpec, top: int = 10) -> dict | None:
    store = getattr(run, "store", run)
    art = store.get_artifact(candidates_name(method, top))
    return None if art is None else {**art, "stale": _stale(art, store)}


def heal_name(removed, n_layers: int) -> str:
    """Run-store artifact of a healing of the run's model without `removed` (the Summary page reads it)."""
    from engine.decision import removal_mask

    return "heal:" + "".join("1" if b else "0" for b in removal_mask(removed, n_layers))


def zeroshot_name(removed, zs) -> str:
    """Artifact name of one evaluation: removed set + tasks + limit (the store is the model's)."""
    return f"zeroshot:{stable_hash({'removed': sorted(int(i) for i in removed), **zs.key()})}"
