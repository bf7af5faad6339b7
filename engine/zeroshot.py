"""Zero-shot accuracy through lm-evaluation-harness, and paired comparisons of two models.

`evaluate_model(model, tokenizer, tasks, cache_dir, limit, batch_size, progress)` runs lm-eval
0.4.13's `simple_evaluate` on an in-memory transformers model (`HFLM(pretrained=model)`) over
the inline task configs of engine.tasks (local files; HF_DATASETS_OFFLINE=1), with per-sample
logs, and returns a `ZeroShotResult`: per task the headline accuracy (lm-eval's `acc`) with
lm-eval's standard error and n, acc_norm where lm-eval reports it, LAMBADA's perplexity, the
mean over tasks (its stderr from the tasks' stderrs, tasks being independent samples), and each
item's correctness keyed by doc_id (what the paired comparison needs). A pruned model is
evaluated inside `engine.export.pruned_view` (the layers really deleted, the config fixed), so
lm-eval sees exactly the model an export would write.

`paired_difference(a, b, boot, seed, level)`: accuracy difference of two models on the same
items, with a paired bootstrap interval (items resampled together) and the closed-form normal
standard error sqrt(var(a_i - b_i) / n). `compare(result_a, result_b)` does it per task (items
matched by doc_id) and for the mean over tasks (a stratified bootstrap: items resampled within
each task, the tasks' differences averaged).

Scoring: by default each document's requests are scored as one tree (`scorer="shared"`,
engine.zeroshot_scorer: the shared context runs once, the LM head only on scored positions);
`scorer="hflm"` keeps lm-eval's HFLM path as it is. Both give lm-eval's loglikelihoods (to float
rounding; tests/test_zeroshot_scorer.py), so the stored result's key does not include it.

Why a progress hook by hand: lm-eval's own progress is a tqdm bar; the CLI's JSON mode needs
one `{"event": "progress", "done", "total", "items_done", "items_total", "eta_s"}` line a second
(what engine.jobs reads), so the HFLM subclass counts the requests lm-eval scores (its cache hook
sees each one) and the documents whose requests are all scored.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.tasks import TASKS, task_configs

HEADLINE = "acc"  # the metric averaged into `mean` (lm-eval's accuracy of every task)


@dataclass(frozen=True)
class TaskScore:
    """One task's result: lm-eval's aggregate and each item's correctness."""

    task: str
    acc: float
    stderr: float  # lm-eval's standard error of acc (sample std / sqrt(n))
    n: int  # items scored
    split: str
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    perplexity: float | None = None  # lambada_openai
    perplexity_stderr: float | None = None
    doc_ids: tuple[int, ...] = ()
    correct: tuple[int, ...] = ()  # 0/1 per item, aligned with doc_ids

    def to_json(self, items: bool = True) -> dict:
        d = asdict(self)
        if not items:
            d.pop("doc_ids"), d.pop("correct")
        else:
            d["doc_ids"], d["correct"] = list(self.doc_ids), list(self.correct)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TaskScore":
        return cls(**{**d, "doc_ids": tuple(d.get("doc_ids", ())), "correct": tuple(d.get("correct", ()))})


@dataclass(frozen=True)
class ZeroShotResult:
    tasks: dict  # task -> TaskScore
    limit: int | None  # items per task asked for (None: the whole split)
    seconds: float
    n_requests: int  # loglikelihood requests lm-eval scored
    lm_eval_version: str
    raw: dict = field(default_factory=dict, compare=False)  # lm-eval's results JSON (without samples)
    scorer: str = "hflm"  # which loglikelihood path scored it (results stored before the field: HFLM's)
    scoring_seconds: float = 0.0  # of `seconds`, inside the LM's loglikelihood (the rest: lm-eval's task work)

    @property
    def mean(self) -> float:
        return float(np.mean([t.acc for t in self.tasks.values()]))

    @property
    def mean_stderr(self) -> float:
        se = [t.stderr for t in self.tasks.values()]
        return float(math.sqrt(sum(s * s for s in se)) / len(se))

    def to_json(self, items: bool = True) -> dict:
        return {"tasks": {k: v.to_json(items) for k, v in self.tasks.items()}, "mean": self.mean,
                "mean_stderr": self.mean_stderr, "limit": self.limit, "seconds": self.seconds,
                "n_requests": self.n_requests, "lm_eval_version": self.lm_eval_version, "scorer": self.scorer,
                "scoring_seconds": self.scoring_seconds}

    @classmethod
    def from_json(cls, d: dict) -> "ZeroShotResult":
        return cls(tasks={k: TaskScore.from_json(v) for k, v in d["tasks"].items()}, limit=d.get("limit"),
                   seconds=float(d.get("seconds", 0.0)), n_requests=int(d.get("n_requests", 0)),
                   lm_eval_version=d.get("lm_eval_version", ""), scorer=d.get("scorer", "hflm"),
                   scoring_seconds=float(d.get("scoring_seconds", 0.0)))


# ---------------------------------------------------------------- running lm-eval


class Progress:
    """Requests and items (documents) scored so far: a JSON line a second on stderr (json_mode) or a
    tqdm bar. `done`/`total` count lm-eval's loglikelihood requests, `items_done`/`items_total` the
    documents all of whose requests are scored; `eta_s` comes from the work done so far: tokens when
    the scorer reports them (the shared scorer does), else requests."""

    def __init__(self, enabled: bool, json_mode: bool, label: str = "zero-shot"):
        self.enabled, self.json_mode, self.label = enabled, json_mode, label
        self.total = self.done = 0
        self.items_total = self.items_done = 0
        self.work_total = self.work_done = 0  # tokens, when the scorer says
        self.t0 = self.last = time.monotonic()
        self.bar = None

    def start(self, total: int, items: int = 0) -> None:
        self.total, self.items_total = self.total + total, self.items_total + items
        if self.enabled and not self.json_mode:
            from tqdm import tqdm

            if self.bar is None:
                self.bar = tqdm(total=self.total, file=sys.stderr, unit="req", desc=self.label, dynamic_ncols=True)
            else:
                self.bar.total = self.total
                self.bar.refresh()

    def add_work(self, total: int) -> None:
        self.work_total += total

    def credit(self, work: int) -> None:
        self.work_done += work

    def step(self, n: int = 1, items: int = 0) -> None:
        self.done += n
        self.items_done += items
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= 1.0 or self.done >= self.total:
            self.last = now
            print(json.dumps(self.line(now)), file=sys.stderr, flush=True)

    def line(self, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        by_work = self.work_total > 0 and self.work_done > 0
        done, total = (self.work_done, self.work_total) if by_work else (self.done, self.total)
        rate = done / max(now - self.t0, 1e-9)
        return {"event": "progress", "step": self.label, "done": self.done, "total": self.total,
                "items_done": self.items_done, "items_total": self.items_total,
                "eta_s": round(max(total - done, 0) / max(rate, 1e-9), 1)}

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


SCORERS = ("shared", "hflm")  # shared: engine.zeroshot_scorer (default); hflm: lm-eval's HFLM as it is


def _lm(model, tokenizer, batch_size: int, progress: Progress | None, scorer: str = "shared"):
    """lm-eval's HFLM over an in-memory model, reporting each scored request to `progress`.

    scorer "shared": `_loglikelihood_tokens` scores the requests of each document as one tree
    (engine.zeroshot_scorer); what the tree scorer cannot take goes to HFLM's own method. "hflm":
    HFLM unchanged (batches of `batch_size` requests)."""
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM

    from engine import zeroshot_scorer as zsc

    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose from {', '.join(SCORERS)}")

    class _Hook(CacheHook):
        """Sees each scored request (both paths call it once per request): counts requests and items."""

        def __init__(self):
            super().__init__(None)
            self.owner: dict = {}  # request args -> [doc key, ...] not yet scored
            self.left: dict = {}  # doc key -> requests not yet scored

        def expect(self, requests) -> int:
            for r in requests:
                k = (r.task_name, r.doc_id)
                self.owner.setdefault(tuple(r.args), []).append(k)
                self.left[k] = self.left.get(k, 0) + 1
            return len({(r.task_name, r.doc_id) for r in requests})

        def add_partial(self, attr, req, res):  # called once per scored loglikelihood request
            if attr != "loglikelihood":
                return
            items = 0
            keys = self.owner.get(tuple(req))
            if keys:
                k = keys.pop()
                self.left[k] -= 1
                items = int(self.left[k] == 0)
            if progress is not None:
                progress.step(1, items)

    class _LM(HFLM):
        fallback_reason: str | None = None
        scoring_seconds = 0.0

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            items = self.cache_hook.expect(requests)
            if progress is not None:
                progress.start(len(requests), items)
            self._doc_keys = [(r.task_name, r.doc_id) for r in requests]
            t0 = time.monotonic()
            try:
                return super().loglikelihood(requests, disable_tqdm=True)
            finally:
                self._doc_keys = None
                self.scoring_seconds += time.monotonic() - t0

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            if scorer == "hflm" or override_bs is not None:  # override_bs: loglikelihood_rolling's windows
                return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            reason = zsc.unsupported_reason(self.model)
            if reason is not None:
                self.fallback_reason = reason
                return super()._loglikelihood_tokens(requests, disable_tqdm=True)
            return self._shared(requests)

        def _shared(self, requests):
            keys = getattr(self, "_doc_keys", None)
            keys = keys if keys is not None and len(keys) == len(requests) else None
            # HFLM truncates longer inputs from the left; a sliding window masks what the tree mask would not
            w = zsc.window(self.model)
            cap = min(self.max_length, w if w is not None else self.max_length)
            fits = [len(c) + len(k) - 1 <= cap for _, c, k in requests]
            res: list = [None] * len(requests)
            idx = [i for i, ok in enumerate(fits) if ok]
            long = [i for i, ok in enumerate(fits) if not ok]
            if long:
                for i, r in zip(long, super()._loglikelihood_tokens([requests[i] for i in long], disable_tqdm=True)):
                    res[i] = r
            trees = zsc.build_trees([(requests[i][1], requests[i][2]) for i in idx],
                                    None if keys is None else [keys[i] for i in idx])
            if progress is not None:
                progress.add_work(sum(t.n_tokens for t in trees))
            dtype = next(self.model.parameters()).dtype
            for batch in zsc.batch_rows(zsc.pack_rows(trees, ROW_TOKENS), BATCH_TOKENS):
                lay = zsc.layout(batch, dtype, self.device)
                scored = zsc.score_batch(self.model, lay, self.softmax_dtype)
                if progress is not None:
                    progress.credit(lay.n_real)  # before the requests' steps, which print the line
                for br, ll, greedy in scored:
                    for j in br.requests:
                        i = idx[j]
                        res[i] = (ll, greedy)
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], res[i])
            return res

    lm = _LM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    lm.set_cache_hook(_Hook())
    return lm


# Shared scorer's packing: trees packed into rows of ROW_TOKENS tokens, rows batched while rows x longest
# row <= BATCH_TOKENS. Chosen, not tuned: short rows keep the masked-out attention small (a row's
# attention is L x L whatever the mask); bench/zeroshot_speed.py's figures were measured with these.
ROW_TOKENS = 256
BATCH_TOKENS = 2048


def _quiet_lm_eval() -> None:
    import logging

    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except Exception:  # an older datasets: only noisier
        pass


def evaluate_model(model, tokenizer, tasks, cache_dir, limit: int | None = None, batch_size: int = 16,
                   progress: Progress | None = None, scorer: str = "shared",
                   samples_out: dict | None = None) -> ZeroShotResult:
    """lm-eval on `model` (in memory, as it is now) for `tasks`; the first `limit` items of each.
    `scorer`: "shared" (each document's requests as one tree, engine.zeroshot_scorer; HFLM's path
    for what it cannot take) or "hflm" (lm-eval's HFLM unchanged); both give lm-eval's numbers.
    `samples_out`: filled with lm-eval's per-document logs ({task: [sample]}, each request's
    (loglikelihood, greedy) in "resps"), for benches that compare scorers request by request."""
    configs = task_configs(tasks, cache_dir)  # TaskDataMissing before anything heavy
    import lm_eval
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    t0 = time.monotonic()
    was_training = model.training
    model.eval()
    saved = os.environ.get("HF_DATASETS_OFFLINE")
    os.environ["HF_DATASETS_OFFLINE"] = "1"  # our task files are local; never reach a hub (restored below)
    # lm-eval's per-task bar while it builds requests (lm_eval.api.task's module-level tqdm, no switch in
    # simple_evaluate) is off: our own progress (a bar, or --json lines) says how far it is. Restored below.
    import lm_eval.api.task as lm_task

    task_tqdm = lm_task.tqdm
    lm_task.tqdm = functools.partial(task_tqdm, disable=True)
    try:
        lm = _lm(model, tokenizer, batch_size, progress, scorer)
        # Our tasks are inline dicts: indexing lm-eval's ~14,000 bundled YAMLs (28 s here) is not needed.
        tm = TaskManager(include_defaults=False)
        # bootstrap_iters=0: lm-eval's bootstrap forks a multiprocessing Pool, which deadlocks in a process
        # that already runs threads (torch, our progress thread); the standard errors come from the
        # per-item results instead (_task_score), as lm-eval's own closed forms do.
        out = lm_eval.simple_evaluate(model=lm, tasks=configs, limit=limit, log_samples=True, verbosity="ERROR",
                                      bootstrap_iters=0, task_manager=tm)
    finally:
        lm_task.tqdm = task_tqdm
        if saved is None:
            os.environ.pop("HF_DATASETS_OFFLINE", None)
        else:
            os.environ["HF_DATASETS_OFFLINE"] = saved
        model.train(was_training)
        if progress is not None:
            progress.close()
    seconds = time.monotonic() - t0
    if samples_out is not None:
        samples_out.update(out["samples"])
    scores = {name: _task_score(name, out["results"][name], out["samples"][name]) for name in tasks}
    raw = {k: v for k, v in out.items() if k != "samples"}
    n_req = int(sum(len(s.get("arguments", ())) for v in out["samples"].values() for s in v))
    used = scorer if lm.fallback_reason is None else f"hflm (shared scorer off: {lm.fallback_reason})"
    return ZeroShotResult(tasks=scores, limit=limit, seconds=round(seconds, 2), n_requests=n_req,
                          lm_eval_version=_version(), raw=_jsonable(raw), scorer=used,
                          scoring_seconds=round(lm.scoring_seconds, 2))


def _version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _task_score(name: str, agg: dict, samples: list[dict]) -> TaskScore:
    pairs = sorted((int(s["doc_id"]), int(round(float(s[HEADLINE])))) for s in samples)

    def get(metric):
        v = agg.get(f"{metric},none")
        return None if v is None or v == "N/A" else float(v)

    def values(metric) -> np.ndarray | None:
        v = [float(s[metric]) for s in samples if isinstance(s.get(metric), (int, float))]
        return np.asarray(v) if len(v) == len(samples) and len(v) > 1 else None

    def mean_stderr(metric) -> float | None:  # lm-eval's mean_stderr: sample std (ddof 1) / sqrt(n)
        v = values(metric)
        return None if v is None else float(v.std(ddof=1) / math.sqrt(len(v)))

    ppl_se = None
    ll = values("perplexity")  # per item: the log-likelihood of the target; perplexity = exp(-mean)
    if ll is not None and get("perplexity") is not None:  # delta method: se(exp(-m)) = exp(-m) se(m)
        ppl_se = float(get("perplexity") * ll.std(ddof=1) / math.sqrt(len(ll)))
    return TaskScore(task=name, acc=get("acc"), stderr=mean_stderr("acc"), n=len(pairs), split=TASKS[name].split,
                     acc_norm=get("acc_norm"), acc_norm_stderr=mean_stderr("acc_norm"),
                     perplexity=get("perplexity"), perplexity_stderr=ppl_se,
                     doc_ids=tuple(p[0] for p in pairs), correct=tuple(p[1] for p in pairs))


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: getattr(o, "__name__", str(o))))


def write_results_json(result: ZeroShotResult, path, extra: dict | None = None) -> Path:
    """lm-eval's own results JSON (what `lm_eval --output_path` writes, without samples), plus our
    `layerprune` block (model, removed set, limit); written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {**result.raw, "layerprune": {**(extra or {}), "limit": result.limit, "mean_acc": result.mean,
                                        "mean_acc_stderr": result.mean_stderr}}
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- paired comparisons


def paired_difference(a, b, boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """mean(a) - mean(b) for 0/1 (or real) scores of two models on the same n items.

    Paired bootstrap: `boot` resamples of the n items (the same indices for both models);
    the interval is the resamples' central `level` percentile range. `se_normal` is the
    closed form sqrt(var(a_i - b_i) / n) (population variance), which the bootstrap's `se`
    approaches as n and boot grow. `wins`/`losses`: items only a / only b got right.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired scores need two equal 1-d arrays, got {a.shape} and {b.shape}")
    d = a - b  # (n,)
    n = d.size
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(boot, n))  # (boot, n)
    means = d[idx].mean(axis=1)  # (boot,)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"diff": float(d.mean()), "se": float(means.std(ddof=1)) if boot > 1 else float("nan"),
            "se_normal": float(d.std() / math.sqrt(n)), "lo": float(lo), "hi": float(hi), "level": level,
            "n": int(n), "wins": int(np.sum(d > 0)), "losses": int(np.sum(d < 0)),
            "separated": bool(lo > 0 or hi < 0)}


def _aligned(x: TaskScore, y: TaskScore) -> tuple[np.ndarray, np.ndarray]:
    ya = dict(zip(y.doc_ids, y.correct))
    common = [i for i in x.doc_ids if i in ya]
    xa = dict(zip(x.doc_ids, x.correct))
    return np.array([xa[i] for i in common], dtype=float), np.array([ya[i] for i in common], dtype=float)


def compare(a: ZeroShotResult | dict, b: ZeroShotResult | dict, boot: int = 2000, seed: int = 0,
            level: float = 0.95) -> dict:
    """a minus b per shared task (items matched by doc_id) and for the mean over those tasks.

    The mean's interval is a stratified paired bootstrap: each resample draws each task's items
    with replacement (same draw for both models) and averages the tasks' differences."""
    a = a if isinstance(a, ZeroShotResult) else ZeroShotResult.from_json(a)
    b = b if isinstance(b, ZeroShotResult) else ZeroShotResult.from_json(b)
    shared = [t for t in a.tasks if t in b.tasks]
    if not shared:
        raise ValueError("the two results share no task")
    rng = np.random.default_rng(seed)
    per_task, boot_means, normal_var = {}, np.zeros(boot), 0.0
    for i, t in enumerate(shared):
        xa, xb = _aligned(a.tasks[t], b.tasks[t])
        if xa.size == 0:
            raise ValueError(f"{t}: the two results share no item (different --limit or data?)")
        per_task[t] = paired_difference(xa, xb, boot=boot, seed=seed + i, level=level)
        d = xa - xb
        boot_means += d[rng.integers(0, d.size, size=(boot, d.size))].mean(axis=1)
        normal_var += d.var() / d.size
    k = len(shared)
    boot_means /= k
    lo, hi = np.quantile(boot_means, [(1 - level) / 2, (1 + level) / 2])
    diff = float(np.mean([per_task[t]["diff"] for t in shared]))
    mean = {"diff": diff, "se": float(boot_means.std(ddof=1)) if boot > 1 else float("nan"),
            "se_normal": float(math.sqrt(normal_var) / k), "lo": float(lo), "hi": float(hi), "level": level,
            "n": int(sum(per_task[t]["n"] for t in shared)), "separated": bool(lo > 0 or hi < 0)}
    return {"tasks": per_task, "mean": mean, "boot": boot, "level": level}
