"""Pure helpers the Streamlit pages use: tables, commands and summaries (no streamlit, no model).

Contracts:
* ``spec_from_dict(d)`` rebuilds a RunSpec from ``dataclasses.asdict`` (what a run's meta stores),
  so a run started from the CLI can be selected and analysed in the app.
* ``sample_command(spec, cache_dir, threads)`` is the argv of ``python -m engine sample`` for a spec
  (the app launches sampling as a subprocess with it).
* ``samples_frame(rows)`` turns ``store.Sample`` records into a DataFrame with a ``stratum`` column.
* ``progress(rows, target)`` -> done, target, rate (masks/s) and ETA (s) from the rows' commit times.
* ``save_upload(cache_dir, name, data, max_bytes)`` stores an uploaded calibration file inside the
  cache dir (content-addressed, never outside it) and returns its path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from engine.config import DataSpec, ModelSpec, RunSpec, SamplingSpec
from engine.errors import DataError

UPLOAD_SUFFIXES = (".txt", ".jsonl")
UPLOADS_DIR = "uploads"


def spec_from_dict(d: dict) -> RunSpec:
    """Inverse of dataclasses.asdict(RunSpec) (lists from JSON become tuples again)."""
    s = dict(d.get("sampling", {}))
    for key in ("strata", "remove_range"):
        if s.get(key) is not None:
            s[key] = tuple(s[key])
    return RunSpec(model=ModelSpec(**d.get("model", {})), data=DataSpec(**d.get("data", {})), sampling=SamplingSpec(**s))


def job_argv(command: str, *specs, cache_dir, threads: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """Full argv of `python -m engine <command> --json` reproducing `specs` (the options that command
    takes, generated from the spec fields by engine.argv), for engine.jobs.launch."""
    from engine.argv import command_argv
    from engine.config import EvalSpec

    specs = [s for s in specs if not isinstance(s, EvalSpec)]
    evaluation = EvalSpec(threads=int(threads)) if threads else EvalSpec()
    return [sys.executable, "-m", "engine", *command_argv(command, *specs, evaluation, cache_dir=cache_dir,
                                                          extra=extra)]


def job_target(argv) -> int | None:
    """The mask count a `sample` job's argv asks for (--masks N), or None."""
    argv = list(argv or ())
    for i, a in enumerate(argv[:-1]):
        if a == "--masks" and argv[i + 1].isdigit():
            return int(argv[i + 1])
    return None


def sample_command(spec: RunSpec, cache_dir, threads: int | None = None) -> list[str]:
    """argv for `python -m engine sample --json` reproducing `spec`."""
    return job_argv("sample", spec, cache_dir=cache_dir, threads=threads)


SAMPLE_COLUMNS = ["rowid", "mask", "kept", "ppl", "score", "nonfinite", "seconds", "created", "round", "source",
                  "windows", "work"]
FIDELITY = ("complete", "partial")  # evaluated on every calibration window | on its own first windows only so far


def samples_frame(rows, n_windows: int | None = None) -> pd.DataFrame:
    """store.Sample records -> DataFrame (one row per mask) with `stratum` = 'kept k' labels, `round_label`
    ('round r') and `fidelity` (FIDELITY, from the windows evaluated against the run's n_windows)."""
    df = pd.DataFrame({c: [getattr(r, c) for r in rows] for c in SAMPLE_COLUMNS}, columns=SAMPLE_COLUMNS)
    df["stratum"] = "kept " + df["kept"].astype(str)
    df["round_label"] = "round " + df["round"].astype(str)
    df["fidelity"] = fidelity_labels(df["windows"], n_windows)
    return df


def fidelity_labels(windows, n_windows: int | None) -> list[str]:
    """complete | partial per row, as pipeline.sampling_progress counts them: a row without per-window
    losses (None: evaluated by Ray workers, or stored before them) was evaluated on every window."""
    w = pd.to_numeric(pd.Series(windows, dtype=object), errors="coerce").to_numpy(dtype=float)  # None -> NaN
    if n_windows is None:
        return ["complete"] * len(w)
    return np.where(np.isnan(w) | (w >= n_windows), "complete", "partial").tolist()


def round_table(progress: dict) -> pd.DataFrame:
    """pipeline.sampling_progress -> one row per sampling round: masks, design / active (where they came
    from), complete / partial (fidelity), and the work (token-layer calls) spent on them with its share."""
    total = max(int(progress["work"]), 1)
    rows = [{"round": int(r), "masks": g["masks"], "design": g["masks"] - g["active"], "active": g["active"],
             "complete": g["complete"], "partial": g["masks"] - g["complete"], "work (token-layer calls)": g["work"],
             "share of work": g["work"] / total}
            for r, g in sorted(progress["rounds"].items(), key=lambda kv: int(kv[0]))]
    return pd.DataFrame(rows, columns=["round", "masks", "design", "active", "complete", "partial",
                                       "work (token-layer calls)", "share of work"])


def fidelity_table(progress: dict) -> pd.DataFrame:
    """pipeline.sampling_progress -> masks per number of evaluated windows ('k of W'), with their share."""
    W, windows = progress["n_windows"], progress["rows"]["windows"]
    n = max(len(windows), 1)
    known = pd.Series([w for w in windows if w is not None], dtype="int64")
    rows = [{"windows evaluated": f"{k} of {W or '?'}", "masks": int(c), "share": c / n}
            for k, c in known.value_counts().sort_index(ascending=False).items()]
    if len(known) < len(windows):
        rows.append({"windows evaluated": "all (no per-window losses stored)", "masks": len(windows) - len(known),
                     "share": (len(windows) - len(known)) / n})
    return pd.DataFrame(rows, columns=["windows evaluated", "masks", "share"])


def work_frame(progress: dict) -> pd.DataFrame:
    """pipeline.sampling_progress -> cumulative work (token-layer calls) in store order: x = masks stored so
    far, with each row's round and fidelity (a row's work includes its completion, however late it came)."""
    rows = progress["rows"]
    return pd.DataFrame({"masks stored": np.arange(1, len(rows["rowid"]) + 1), "cumulative work": rows["cumulative_work"],
                         "round": [f"round {int(r)}" for r in rows["round"]],
                         "fidelity": ["complete" if c else "partial" for c in rows["complete"]]})


def round_colours(labels) -> dict[str, str]:
    """'round r' -> a colour fixed by r (the same in every chart of the page, whatever rows are shown)."""
    return {lab: STRATUM_PALETTE[int(str(lab).split()[-1]) % len(STRATUM_PALETTE)] for lab in set(labels)}


def work_curve_table(curve: dict, level: float) -> pd.DataFrame:
    """The `work_curve` points for display: work, masks fitted, held-out n, and R² / Spearman with their
    intervals written out ('0.812 [0.701, 0.880]')."""
    def with_interval(p: dict, k: str) -> str:
        v, lo, hi = p.get(k), p.get(f"{k}_low"), p.get(f"{k}_high")
        if v is None:
            return "-"
        return f"{v:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else " (no interval)")

    return pd.DataFrame([{"work (token-layer calls)": p["work"], "work on fitted masks": p["work_fitted"],
                          "masks fitted": p["train_masks"], "masks stored": p["rows_stored"], "held-out n": p["n_test"],
                          f"R² [{level:.0%}]": with_interval(p, "r2"), f"Spearman [{level:.0%}]": with_interval(p, "spearman")}
                         for p in curve.get("points") or []])


def work_curve_frame(curve: dict) -> pd.DataFrame:
    """The fit artifact's `work_curve` points as a table (store order: work, masks, held-out metrics with intervals)."""
    cols = ["work", "work_fitted", "train_masks", "rows_stored", "n_test", "r2", "r2_low", "r2_high", "spearman",
            "spearman_low", "spearman_high", "mae"]
    return pd.DataFrame(curve.get("points") or [], columns=cols)


def format_count(x: float | int | None) -> str:
    """12,345 -> '12.3 k'; 4.5e9 -> '4.50 G' (work counts on metrics)."""
    if x is None:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}"
    return str(int(x))


def adaptive_caption(sampling, n_windows: int) -> str:
    """' · 2 of 8 windows first, 25% completed · 3 rounds, 25% from the design' for a multi-fidelity /
    active SamplingSpec ('' when it is neither)."""
    out = ""
    if sampling.multi_fidelity:
        out += f" · {sampling.first_windows} of {n_windows} windows first, {sampling.complete:.0%} completed"
    if sampling.active:
        out += f" · {sampling.rounds} rounds, {sampling.explore:.0%} from the design"
    return out


def option_help(cls, name: str) -> str:
    """The help text an `option(...)` field declares (the CLI's --help says the same)."""
    from dataclasses import fields

    return next(f.metadata["help"] for f in fields(cls) if f.name == name)


# One colour per kept-layer count on every page (largest count first), whatever order rows arrive in.
STRATUM_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                   "#bcbd22", "#17becf")


def stratum_order(df: pd.DataFrame) -> list[str]:
    """'kept k' labels, largest k first."""
    return [f"kept {k}" for k in sorted(df["kept"].unique(), reverse=True)]


def stratum_colours(df: pd.DataFrame) -> dict[str, str]:
    """'kept k' -> a colour fixed by k (not by order of appearance)."""
    return {f"kept {int(k)}": STRATUM_PALETTE[int(k) % len(STRATUM_PALETTE)] for k in df["kept"].unique()}


def stratum_counts(df: pd.DataFrame) -> pd.DataFrame:
    """Masks per kept-layer count, largest count first."""
    out = df.groupby("kept").size().rename("masks").reset_index().sort_values("kept", ascending=False)
    return out.reset_index(drop=True)


def progress(created: list[float], target: int | None) -> dict:
    """done / target / rate (masks per second over the commits so far) / eta_s (None if unknown)."""
    done = len(created)
    rate = eta = None
    if done >= 2 and created[-1] > created[0]:
        rate = (done - 1) / (created[-1] - created[0])
        if target:
            eta = max(0, target - done) / rate
    frac = min(1.0, done / target) if target else 0.0
    return {"done": done, "target": target, "fraction": frac, "rate": rate, "eta_s": eta}


def format_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def runs_frame(runs: list[dict]) -> pd.DataFrame:
    """pipeline.status() rows as a table for display, in words ("" where a run has no problem)."""
    cols = {"run_id": "run", "status": "status", "n_samples": "masks", "target": "target masks",
            "partial": "partial masks", "work": "work (token-layer calls)", "n_layers": "layers", "model": "model",
            "data": "data", "problem": "problem"}
    rows = [{label: ("" if r.get(key) is None else r.get(key)) for key, label in cols.items()} for r in runs]
    return pd.DataFrame(rows, columns=list(cols.values()))


def save_upload(cache_dir, name: str, data: bytes, max_bytes: int) -> Path:
    """Save an uploaded calibration file as <cache_dir>/uploads/<sha>.<suffix>; DataError if refused."""
    suffix = Path(name).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise DataError(f"upload a .txt or .jsonl file; got {name!r}.")
    if len(data) > max_bytes:
        raise DataError(f"{name} is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:.0f} MiB.")
    if not data.strip():
        raise DataError(f"{name} is empty; upload a file with text in it.")
    folder = Path(cache_dir).resolve() / UPLOADS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{hashlib.sha256(data).hexdigest()[:16]}{suffix}"
    if not path.exists():
        tmp = path.with_name(path.name + f".{os.getpid()}.partial")
        tmp.write_bytes(data)
        tmp.replace(path)
    return path


# ---------------------------------------------------------------- analysis tables


def fit_frames(masks: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, ppl_full: float,
               floor: float = 1e-3) -> pd.DataFrame:
    """Held-out predictions in perplexity space: true, predicted, residual (log ratio), stratum."""
    kept = np.asarray(masks, bool).sum(axis=1)  # (n,)
    ppl_t = ppl_full / np.maximum(np.asarray(y_true, float), floor)
    ppl_p = ppl_full / np.maximum(np.asarray(y_pred, float), floor)
    return pd.DataFrame({"kept": kept, "stratum": [f"kept {k}" for k in kept], "ppl_true": ppl_t,
                         "ppl_predicted": ppl_p, "log_residual": np.log(ppl_p / ppl_t)})


MIN_STRATUM_N = 5  # fewer held-out masks in a stratum than this: its R² / Spearman mean nothing


def per_stratum_frame(per_stratum: dict) -> pd.DataFrame:
    """Held-out metrics per kept-layer count (largest first), as display strings; correlations read
    "n < MIN_STRATUM_N" where a stratum has too few held-out masks for them."""
    rows = []
    for k, m in sorted(per_stratum.items(), key=lambda kv: -int(kv[0])):
        few = m["n"] < MIN_STRATUM_N
        too_few = f"n < {MIN_STRATUM_N}"
        rows.append({"kept layers": int(k), "held-out masks": m["n"],
                     "R²": too_few if few else f"{m['r2']:.4f}", "Spearman": too_few if few else f"{m['spearman']:.4f}",
                     "MAE (score)": f"{m['mae']:.4f}", "mean relative error (PPL)": f"{m['mape_ppl']:.1%}"})
    return pd.DataFrame(rows)


METRIC_WORDS = {"r2": "held-out R²", "spearman": "Spearman", "mae": "MAE (score)", "mae_ppl": "MAE (perplexity)",
                "mape_ppl": "mean relative error (PPL)", "fit_seconds": "fit time (s)", "kind": "surrogate",
                "preset": "training", "train_masks": "training masks"}


def learning_curve_frame(lc: dict) -> pd.DataFrame:
    """One row per training size (column `train_masks`, metric keys as fitted; `METRIC_WORDS` labels them)."""
    return pd.DataFrame([{"train_masks": n, **m} for n, m in zip(lc["sizes"], lc["metrics"])])


def comparison_frame(comparison: dict) -> pd.DataFrame:
    """Every surrogate kind fitted once on the same split, columns in words."""
    cols = ["kind", "preset", "r2", "spearman", "mae", "mae_ppl", "mape_ppl", "fit_seconds"]
    return pd.DataFrame(comparison["rows"])[cols].rename(columns=METRIC_WORDS)


def contributions_frame(values, stderr=None, ci_low=None, ci_high=None) -> pd.DataFrame:
    """Per layer: contribution, its error bar, its interval (NaN when none), and rank (1 = most important)."""
    v = np.asarray(values, float)
    se = np.full_like(v, np.nan) if stderr is None else np.asarray([np.nan if x is None else x for x in stderr], float)
    lo = np.full_like(v, np.nan) if ci_low is None else np.asarray(ci_low, float)
    hi = np.full_like(v, np.nan) if ci_high is None else np.asarray(ci_high, float)
    order = np.argsort(-v, kind="stable")
    rank = np.empty(len(v), int)
    rank[order] = np.arange(1, len(v) + 1)
    return pd.DataFrame({"layer": np.arange(len(v)), "contribution": v, "stderr": se, "ci_low": lo, "ci_high": hi,
                         "rank": rank})


def dominant_layer(values, factor: float = 3.0) -> int | None:
    """The layer whose |value| is more than `factor` times every other layer's (it flattens a bar chart), or None."""
    v = np.abs(np.nan_to_num(np.asarray(values, dtype=float)))
    if v.size < 2:
        return None
    order = np.argsort(v)[::-1]
    return int(order[0]) if v[order[0]] > factor * v[order[1]] else None


def rank_agreement(contribs, baseline_scores) -> float:
    """Spearman correlation between two per-layer importance vectors (higher = more important in both)."""
    a = np.asarray(contribs, float)
    b = np.asarray([np.nan if x is None else x for x in baseline_scores], float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def decisions_frame(decisions: dict) -> pd.DataFrame:
    """The `decisions` artifact as one row per k: predicted and measured perplexity, removed layers."""
    rows = [{"k": d["k"], "ppl_predicted": d["ppl_predicted"], "ppl_measured": d["ppl_measured"],
             "rule": d["method"], "removed layers": ", ".join(str(i) for i in d["removed"]),
             "sets measured": d.get("n_measured") or len(d["candidates"]),
             "compared": len(d["candidates"]),
             "statistically tied": "; ".join(", ".join(map(str, t)) for t in d.get("tied") or [])}
            for d in decisions["decisions"]]
    return pd.DataFrame(rows)


RACE_OUTCOMES = {"finished": "raced on every window", "": "raced on every window"}


def race_frame(decision: dict, chosen: tuple[int, ...], top: int = 15) -> pd.DataFrame:
    """How one k's set was chosen: the raced candidates, those that saw the most windows first, then by their
    perplexity on the windows they saw; the chosen set marked. `PPL, raced windows` is what the choice
    compares (validation + calibration windows); `PPL, calibration` is the 8-window figure other pages show."""
    rows = []
    for c in decision.get("candidates", []):
        removed = tuple(int(i) for i in c["removed"])
        rows.append({"chosen": "yes" if removed == tuple(chosen) else "",
                     "removed layers": ", ".join(map(str, removed)), "from": c.get("source") or "",
                     "windows seen": c.get("windows"), "PPL, raced windows": c.get("ppl_raced"),
                     "PPL, calibration": c.get("ppl_measured"), "predicted PPL": c.get("ppl_predicted"),
                     "outcome": RACE_OUTCOMES.get(c.get("outcome", ""), str(c.get("outcome", "")).replace("_", " "))})
    df = pd.DataFrame(rows, columns=["chosen", "removed layers", "from", "windows seen", "PPL, raced windows",
                                     "PPL, calibration", "predicted PPL", "outcome"])
    df = df.sort_values(["windows seen", "PPL, raced windows"], ascending=[False, True], na_position="last")
    return df.head(top).reset_index(drop=True)


def config_layer_count(spec: ModelSpec) -> int | None:
    """The decoder depth from a local folder's config.json, without loading any weights (for captions
    before a model is loaded); None for hub ids, GGUF files, presets not fetched yet, or anything unreadable."""
    from engine.config import DEMO_MODEL_DIR, LAYER_COUNT_FIELDS
    from engine.presets import PRESETS, is_ready, preset_dir

    name = spec.name
    if name in PRESETS:
        folder = preset_dir(name) if is_ready(name) else None
    elif name == "demo":
        folder = DEMO_MODEL_DIR
    else:
        folder = Path(name).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text()) if folder is not None else {}
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    for field in LAYER_COUNT_FIELDS:
        if isinstance(config.get(field), int):
            return config[field]
    return None


def strata_caption(sampling, n_layers: int | None) -> str:
    """Which kept-layer counts the design samples, in words (the counts themselves once the depth is known)."""
    from engine.errors import WorkbenchError
    from engine.sampling import resolve_strata

    if sampling.scheme != "stratified":
        return "size-uniform: every kept-layer count equally likely" + (" (paired with complements)" if sampling.paired
                                                                         else "")
    how = ("your kept-layer counts" if sampling.strata else
           f"{sampling.remove_range[0]:.0%}-{sampling.remove_range[1]:.0%} of the layers removed" if sampling.remove_range
           else "the paper's strata scaled to the depth")
    if n_layers is None:
        return f"strata: {how} (the counts appear once the model is loaded)"
    try:
        counts = resolve_strata(sampling, n_layers)
    except WorkbenchError as e:
        return f"strata: {how}, which do not fit this {n_layers}-layer model: {e}"
    return f"strata: {how}, keeping {', '.join(map(str, counts))} of {n_layers} layers"


def format_bytes(n: int) -> str:
    """1023 B, 1.5 KiB, 2.0 MiB: never '0 KiB' for a small file."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


DECISION_COLUMNS = {"k": "layers removed", "ppl_predicted": "predicted perplexity", "ppl_measured": "measured perplexity"}


# How the app names what the CLI calls by its flags (errors are shown in the user's words).
APP_LABELS = {"--text-field": "the jsonl text field (Setup)", "--strata": "the kept-layer counts (Setup)",
              "--remove-range": "the removal range (Setup)", "--windows": "windows (Setup)",
              "--seq-len": "tokens per window (Setup)", "--paired": "paired (Setup)",
              "--scheme size-uniform": "the size-uniform scheme (Setup)", "--scheme": "the scheme (Setup)",
              "--data demo": "the demo text (Setup)", "--masks": "masks in the run (Sampling)",
              "--remove": "layers to remove (Prune)", "--overwrite": "overwrite (Prune, Export)",
              "--out": "the export folder (Prune)", "--holdout": "held-out fraction (Surrogate)",
              "--ensemble": "ensemble members (Surrogate)", "--budget": "budget (Shapley)",
              "--first-windows": "first windows (Sampling)", "--complete": "share completed (Sampling)",
              "--rounds": "rounds (Sampling)", "--explore": "share drawn from the design (Sampling)"}


def in_users_words(message: str, uploads: dict[str, str] | None = None) -> str:
    """An engine message as the app's user should read it: uploaded files by the name they gave
    (not the cache path they were saved under) and settings by their labels in the app (not CLI flags)."""
    for path, name in (uploads or {}).items():
        message = message.replace(path, name)
    for flag in sorted(APP_LABELS, key=len, reverse=True):  # longest first: "--scheme size-uniform" before "--scheme"
        message = message.replace(f"`{flag}`", APP_LABELS[flag]).replace(flag, APP_LABELS[flag])
    return message


# ---------------------------------------------------------------- benchmark results (bench/compare.py output)


def bench_results_dir() -> Path:
    """Where `python -m bench.compare` writes compare.csv / fidelity.csv ($LAYERPRUNE_BENCH_RESULTS overrides)."""
    default = Path(__file__).resolve().parents[1] / "bench" / "results"
    return Path(os.environ.get("LAYERPRUNE_BENCH_RESULTS", default))


METHOD_GROUPS = {"optimum": "optimum", "shapley": "estimators", "rank-and-cut on": "rank-and-cut on exact values"}


def method_group(method: str) -> str:
    """estimators | rank-and-cut on exact values | baselines | optimum: the Comparison page's chart groups."""
    for prefix, group in METHOD_GROUPS.items():
        if method.startswith(prefix):
            return group
    return "baselines"


def comparison_long(df: pd.DataFrame) -> pd.DataFrame:
    """compare.csv (method, k, ppl_<split>...) -> one row per (method, k, split) with its perplexity."""
    splits = [c for c in df.columns if c.startswith("ppl_")]
    long = df.melt(id_vars=["method", "k"], value_vars=splits, var_name="split", value_name="perplexity")
    long["split"] = long["split"].str.removeprefix("ppl_")
    return long


def fidelity_summary(df: pd.DataFrame) -> pd.DataFrame:
    """fidelity.csv -> mean and std over seeds of every metric, per estimator and n."""
    metrics = [c for c in df.columns if c not in ("n", "seed", "estimator", "target")]
    g = df.groupby(["estimator", "target", "n"])[metrics].agg(["mean", "std"])
    g.columns = [f"{m}_{s}" for m, s in g.columns]
    return g.reset_index()


# ---------------------------------------------------------------- interactions page


def interaction_pairs_frame(result: dict):
    """DataFrame of every pair (i, j, value, stderr, kind = synergy | redundancy, `distinct from 0`),
    strongest first. `distinct from 0`: |value| > z * stderr at the map's interval level (default 90%,
    z = 1.645), i.e. the normal interval of the pair excludes 0; "no" = within the estimate's noise."""
    from scipy.stats import norm

    df = pd.DataFrame(result["pairs"], columns=["i", "j", "value", "stderr"])
    df["kind"] = np.where(df["value"] >= 0, "synergy", "redundancy")
    level = float(((result.get("details") or {}).get("interval") or {}).get("level", 0.9))
    z = float(norm.ppf(0.5 + level / 2))
    distinct = df["value"].abs() > z * df["stderr"].fillna(np.inf)
    df[f"distinct from 0 ({level:.0%})"] = np.where(distinct, "yes", "no: within noise")
    return df


def colour_bound(values, quantile: float = 0.95, factor: float = 3.0) -> tuple[float, bool]:
    """(bound, clipped) for a symmetric colour scale: max |value|, or the `quantile` of |value| when the
    largest is more than `factor` times it (one layer's pairs would otherwise wash out the rest)."""
    v = np.abs(np.asarray(values, float))
    v = v[np.isfinite(v)]
    if not v.size:
        return 1.0, False
    top, q = float(v.max()), float(np.quantile(v, quantile))
    if q > 0 and top > factor * q:
        return q, True
    return top or 1.0, False


PAIR_WORDS = {"i": "layer a", "j": "layer b", "ppl_full": "PPL, full model", "ppl_without_i": "PPL without a",
              "ppl_without_j": "PPL without b", "ppl_without_both": "PPL without both",
              "interaction_at_full": "measured interaction at the full model",
              "predicted_at_full": "surrogate's interaction at the full model", "n_masks": "masks in the run"}


def interaction_profile(result: dict, layer: int):
    """DataFrame (partner, value, stderr) of one layer's pair values with every other layer."""
    M, se = np.asarray(result["matrix"], float), np.asarray(result["stderr"], float)
    others = [j for j in range(len(M)) if j != layer]
    return pd.DataFrame({"partner": others, "value": M[layer, others], "stderr": se[layer, others]})


def off_diagonal(matrix) -> np.ndarray:
    """float[L, L] copy with NaN on the diagonal (order-1 values would swamp a pair heatmap's scale)."""
    M = np.array(matrix, dtype=float)
    np.fill_diagonal(M, np.nan)
    return M


def near_sets_frame(k_result: dict):
    """DataFrame of one k's near-optimal sets: removed, predicted PPL with its interval, measured PPL."""
    rows = [{"removed": ", ".join(map(str, s["removed"])), "predicted PPL": s["ppl_predicted"],
             "interval low": s["ppl_low"], "interval high": s["ppl_high"],
             "measured PPL": "not measured" if s["ppl_measured"] is None else f"{s['ppl_measured']:.3f}"}
            for s in k_result["sets"]]
    return pd.DataFrame(rows)


def model_presets() -> dict:
    """{name: {label, description, license, wheel, folder, ready}} of the real-model presets (engine.presets).

    Presets resolve in config.default_cache_dir() (what `--model smollm2` reads), whatever cache the app shows."""
    from engine.presets import PRESETS, is_ready, preset_dir

    return {name: {"label": p.label, "description": p.description, "license": p.wheel.license,
                   "wheel": p.wheel.requirement, "folder": str(preset_dir(name)), "ready": is_ready(name)}
            for name, p in PRESETS.items()}


def extrapolation_label(sample_masks, mask) -> str | None:
    """The what-if editor's label for a surrogate prediction of `mask` (bool[L]): None when its kept count
    lies inside the run's sampled kept counts (`sample_masks` bool[n, L]), else "outside the sampled region
    (kept lo-hi)" (engine.extrapolation)."""
    from engine import extrapolation

    return extrapolation.labels_for(np.atleast_2d(mask), extrapolation.region(sample_masks))[0]

