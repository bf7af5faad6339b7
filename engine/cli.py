"""`python -m engine <command>`: parses options, calls engine.pipeline, prints the result.

Orchestration stays in pipeline.py. Every command shares the options of the parent
parsers below; adding a command is one function decorated with ``@command(...)`` that
takes the parsed args and returns a JSON-able dict (or list).

Output: a short human summary on stdout, progress on stderr. With ``--json`` the last
line of stdout is exactly one JSON object (the result, or ``{"error": ...}``).
Errors: a WorkbenchError prints its message on stderr and exits with its exit_code
(no traceback unless ``--debug``); anything else is reported as a bug with a hint to
re-run with ``--debug``. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Callable

from engine.config import DataSpec, EvalSpec, ModelSpec, RunSpec, SamplingSpec, SurrogateSpec
from engine.errors import WorkbenchError


class UsageError(WorkbenchError):
    """A malformed command line (unknown option, bad number list)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and sys.exit(2); route it through main()
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 14,12,10; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 14,12,10; got {text!r}")
    return values


def _fraction_pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two fractions such as 0.1,0.4; got {text!r}") from None
    return lo, hi


def _common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object on the last stdout line")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    g.add_argument("--cache-dir", default=None, help="run stores (default $LAYERPRUNE_CACHE or ./cache)")
    return p


def _model_options() -> argparse.ArgumentParser:
    d = ModelSpec()
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.name, help="demo, a local folder (save_pretrained) or a hub id")
    g.add_argument("--revision", default=d.revision, help="hub revision (branch, tag or commit)")
    g.add_argument("--trust-remote-code", action="store_true", help="run code shipped with the model")
    g.add_argument("--device", default=d.device, help="cpu | cuda | cuda:N | auto (default %(default)s)")
    g.add_argument("--dtype", default=d.dtype, help="float32 | bfloat16 | float16 | auto (default %(default)s)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice; use 1 on a shared, busy machine)")
    return p


def _data_options() -> argparse.ArgumentParser:
    d = DataSpec()
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("calibration data")
    g.add_argument("--data", default=d.source, help="demo | demo-test | demo-ood | file.txt | file.jsonl | preset")
    g.add_argument("--text-field", default=d.text_field, help="field read from .jsonl records (default %(default)s)")
    g.add_argument("--windows", type=int, default=d.n_windows, help="calibration windows (default %(default)s)")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per window (default %(default)s)")
    g.add_argument("--data-seed", type=int, default=d.seed, help="which windows are drawn (default %(default)s)")
    return p


def _sampling_options() -> argparse.ArgumentParser:
    d = SamplingSpec()
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("mask sampling")
    g.add_argument("--masks", type=int, default=d.n_masks, help="masks in the run (default %(default)s)")
    g.add_argument("--scheme", default=d.scheme, choices=("stratified", "size-uniform"))
    g.add_argument("--strata", type=_ints, default=None, help="kept-layer counts, e.g. 14,12,10 (default: paper's)")
    g.add_argument("--remove-range", type=_fraction_pair, default=None, help="fractions removed, e.g. 0.1,0.4")
    g.add_argument("--paired", action="store_true", help="size-uniform: also evaluate each mask's complement")
    g.add_argument("--seed", type=int, default=d.seed, help="mask sampling seed (default %(default)s)")
    return p


def _evaluation_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("evaluation (speed and memory only; the same perplexities)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="calibration windows per layer call (default: all at once; lower it if memory runs out)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer (a one-time compile of seconds to minutes, then fused kernels)")
    order = g.add_mutually_exclusive_group()
    order.add_argument("--single-pass", dest="single_pass", action="store_true", default=None,
                       help="one prefix-trie walk over all pending masks: fewest layer calls; a run stopped midway "
                            "holds a biased part of the sample (default for run)")
    order.add_argument("--chunked", dest="single_pass", action="store_false",
                       help="doubling chunks in sample order: a run stopped midway holds an unbiased part "
                            "(default for sample, which the app streams)")
    return p


def eval_spec(args, single_pass_default: bool) -> EvalSpec:
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer; got {args.batch_size}.")
    single_pass = single_pass_default if args.single_pass is None else args.single_pass
    return EvalSpec(batch_size=args.batch_size, compile=args.compile, single_pass=single_pass)


def model_spec(args) -> ModelSpec:
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be a positive integer; got {args.threads}.")
        from engine.pipeline import set_threads

        set_threads(args.threads)
    return ModelSpec(
        name=args.model, revision=args.revision, dtype=args.dtype, device=args.device,
        trust_remote_code=args.trust_remote_code,
    )


def data_spec(args) -> DataSpec:
    for name, value in (("--windows", args.windows), ("--seq-len", args.seq_len)):
        if value < 1:
            raise UsageError(f"{name} must be a positive integer; got {value}.")
    return DataSpec(
        source=args.data, n_windows=args.windows, seq_len=args.seq_len, seed=args.data_seed,
        text_field=args.text_field,
    )


def run_spec(args) -> RunSpec:
    if args.masks < 0:
        raise UsageError(f"--masks must be >= 0; got {args.masks}.")
    sampling = SamplingSpec(
        scheme=args.scheme, n_masks=args.masks, strata=args.strata, remove_range=args.remove_range,
        paired=args.paired, seed=args.seed,
    )
    return RunSpec(model=model_spec(args), data=data_spec(args), sampling=sampling)


def _surrogate_options() -> argparse.ArgumentParser:
    d = SurrogateSpec()
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("surrogate")
    g.add_argument("--surrogate", default=d.kind, choices=("mlp", "ridge-pairwise", "gbt"),
                   help="surrogate model (default %(default)s: the paper's network)")
    g.add_argument("--preset", default=d.preset, choices=("adam", "paper"),
                   help="mlp training: adam (converges at any budget) or paper (the reference schedule)")
    g.add_argument("--holdout", type=float, default=d.holdout, help="held-out fraction (default %(default)s)")
    g.add_argument("--ensemble", type=int, default=d.ensemble, help="surrogates fitted for error bars (default %(default)s)")
    g.add_argument("--surrogate-seed", type=int, default=d.seed, help="(default %(default)s)")
    return p


def _method_options() -> argparse.ArgumentParser:
    from engine.method import ESTIMATORS

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("contributions and pruning")
    g.add_argument("--estimator", default="paper", choices=tuple(ESTIMATORS),
                   help="; ".join(f"{k}: {v}" for k, v in ESTIMATORS.items()))
    g.add_argument("--remove", type=int, default=None, help="number of layers to remove (default: L/4)")
    g.add_argument("--out", default=None, help="export folder for the pruned model (must be empty or new)")
    g.add_argument("--overwrite", action="store_true", help="replace a previous export in --out")
    g.add_argument("--eval-data", action="append", default=[],
                   help="held-out text measured before/after pruning (repeatable; demo data adds demo-test, demo-ood)")
    return p


def _baseline_options() -> argparse.ArgumentParser:
    from engine.baselines import BASELINES

    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("baseline")
    g.add_argument("--method", required=True, choices=tuple(BASELINES), help="the criterion to run")
    g.add_argument("--k-max", type=int, default=None, help="sleb: rounds to run (default L-1)")
    g.add_argument("--baseline-seed", type=int, default=0, help="random: the seed (default %(default)s)")
    return p


def surrogate_spec(args) -> SurrogateSpec:
    if not 0 < args.holdout < 1:
        raise UsageError(f"--holdout must be a fraction between 0 and 1; got {args.holdout}.")
    if args.ensemble < 1:
        raise UsageError(f"--ensemble must be >= 1; got {args.ensemble}.")
    return SurrogateSpec(kind=args.surrogate, preset=args.preset, holdout=args.holdout, ensemble=args.ensemble,
                         seed=args.surrogate_seed)


# ------------------------------------------------------------------ commands
_COMMANDS: dict[str, tuple[str, tuple[str, ...], Callable]] = {}
_OPTION_GROUPS = {
    "model": _model_options, "data": _data_options, "sampling": _sampling_options, "evaluation": _evaluation_options,
    "surrogate": _surrogate_options, "method": _method_options, "baseline": _baseline_options,
}


def command(name: str, help: str, options: tuple[str, ...] = ()):
    """Register `fn(args) -> dict | list` as `python -m engine <name>` with the given option groups."""

    def register(fn: Callable) -> Callable:
        _COMMANDS[name] = (help, options, fn)
        return fn

    return register


@command("sample", "evaluate sampled layer masks into the run store (resumable)",
         ("model", "data", "sampling", "evaluation"))
def _sample(args) -> dict:
    from engine import pipeline

    return pipeline.sample(run_spec(args), args.cache_dir, progress=True, json_mode=args.json,
                           evaluation=eval_spec(args, single_pass_default=False)).to_json()


@command("info", "describe a model and its perplexity on the calibration windows", ("model", "data"))
def _info(args) -> dict:
    from engine import pipeline

    return pipeline.info(model_spec(args), data_spec(args))


@command("status", "list the run stores in the cache directory")
def _status(args) -> dict:
    from engine import pipeline

    return {"runs": pipeline.status(args.cache_dir)}


@command("fit", "fit the surrogate to the run's samples; held-out R², Spearman, MAE, learning curve",
         ("model", "data", "sampling", "surrogate"))
def _fit(args) -> dict:
    from engine import pipeline

    return pipeline.fit(run_spec(args), surrogate_spec(args), args.cache_dir,
                        compare_kinds=("mlp:adam", "mlp:paper", "ridge-pairwise", "gbt"))


@command("shapley", "per-layer contributions on the surrogate (choose the estimator)",
         ("model", "data", "sampling", "surrogate", "method"))
def _shapley(args) -> dict:
    from engine import pipeline

    return pipeline.contributions(run_spec(args), surrogate_spec(args), args.estimator, args.cache_dir)


def _remove(args, spec: RunSpec) -> int:
    if args.remove is not None:
        return args.remove
    from engine.models import load_model

    return max(1, load_model(spec.model).n_layers // 4)


@command("prune", "decide which layers to remove from the run's samples and export the pruned model",
         ("model", "data", "sampling", "surrogate", "method"))
def _prune(args) -> dict:
    from engine import pipeline

    spec = run_spec(args)
    return pipeline.prune(spec, surrogate_spec(args), args.estimator, _remove(args, spec), args.out, args.overwrite,
                          tuple(args.eval_data), args.cache_dir)


@command("run", "the whole method: sample -> fit -> contributions -> decide -> export (resumable)",
         ("model", "data", "sampling", "evaluation", "surrogate", "method"))
def _run(args) -> dict:
    from engine import pipeline

    spec = run_spec(args)
    return pipeline.run_all(spec, surrogate_spec(args), args.estimator, _remove(args, spec), args.out, args.overwrite,
                            tuple(args.eval_data), args.cache_dir, progress=True, json_mode=args.json,
                            evaluation=eval_spec(args, single_pass_default=True))


@command("baselines", "a static pruning criterion (ShortGPT, angular, PPL, Taylor+, SLEB, random, last)",
         ("model", "data", "baseline"))
def _baselines(args) -> dict:
    from engine import pipeline

    return pipeline.baseline(model_spec(args), data_spec(args), args.method, k_max=args.k_max, seed=args.baseline_seed)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m engine", description="Game-theoretic layer pruning workbench.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command", parser_class=_Parser)
    common = _common_options()
    for name, (help_text, groups, _) in _COMMANDS.items():
        parents = [common] + [_OPTION_GROUPS[g]() for g in groups]
        sub.add_parser(name, help=help_text, description=help_text, parents=parents)
    return parser


# ------------------------------------------------------------------ output
def _human(name: str, result) -> str:
    if name == "status":
        runs = result["runs"]
        if not runs:
            return "no runs yet (python -m engine sample ...)"
        head = f"{'run_id':14} {'status':10} {'samples':>9} {'L':>3}  model / data"
        rows = [
            f"{r['run_id']:14} {r['status']:10} {r['n_samples']:>5}/{r['target'] or '-':<4}"
            f"{r['n_layers'] or '-':>3}  {r['model']} / {r['data']}"
            for r in runs
        ]
        return "\n".join([head, *rows])
    if name == "sample":
        r = result
        line = (
            f"run {r['run_id']}: evaluated {r['evaluated']} masks in {r['seconds']:.1f} s; "
            f"{r['total']}/{r['target']} done; PPL(full) {r['ppl_full']:.3f}; store {r['store']}"
        )
        if r["nonfinite"]:
            line += f"\n{r['nonfinite']} masks gave a non-finite perplexity (score 0)."
        if r["stopped"]:
            line += f"\nstopped ({r['stopped']}); run the same command again to resume."
        return line
    from engine.report import SUMMARIES

    if name in SUMMARIES:
        return SUMMARIES[name](result)
    return "\n".join(f"{k:12} {v}" for k, v in result.items())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    json_mode, debug = "--json" in argv, "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        name = args.command
        result = _COMMANDS[name][2](args)
    except WorkbenchError as e:
        return _fail(str(e), type(e).__name__, e.exit_code, json_mode, debug)
    except KeyboardInterrupt:
        return _fail("interrupted", "KeyboardInterrupt", 130, json_mode, debug)
    except Exception as e:  # a bug, not a user mistake
        msg = f"unexpected error ({type(e).__name__}: {e}). This is a bug; re-run with --debug for the traceback."
        return _fail(msg, type(e).__name__, 1, json_mode, debug)
    sys.stdout.write(_human(name, result) + "\n")
    if json_mode:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    sys.stdout.flush()
    if isinstance(result, dict) and result.get("stopped") == "interrupted":
        return 130
    return 0


def _fail(message: str, kind: str, code: int, json_mode: bool, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    print(f"error: {message}", file=sys.stderr, flush=True)
    if json_mode:
        print(json.dumps({"error": message, "type": kind}), flush=True)
    return code
