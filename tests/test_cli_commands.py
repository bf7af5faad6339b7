"""Every CLI command's human output and its --json line on one tiny run, failures included, and the
same contributions from the CLI, the pipeline (what the app calls) and the method functions (what
bench/compare calls) for the same specs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import save_tiny_llama
from engine import cli, method, pipeline
from engine.config import DataSpec, MethodSpec, ModelSpec, RunSpec, SamplingSpec, SurrogateSpec

TEXT = " ".join(f"Sentence {i} tells the model something about layers and their order." for i in range(250))
L = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("commands")
    (root / "text.txt").write_text(TEXT)
    save_tiny_llama(root / "tiny", n_layers=L, seed=0)
    return root


def _base(root, *extra):
    return ["--model", str(root / "tiny"), "--data", str(root / "text.txt"), "--windows", "2", "--seq-len", "16",
            "--cache-dir", str(root / "cache"), "--threads", "1", *extra]


RUN = ("--scheme", "size-uniform", "--masks", "24")
STAGE2 = (*RUN, "--surrogate", "ridge-pairwise", "--ensemble", "2")


def _both(capsys, argv):
    """(human stdout, json dict): the command run once without --json and once with it."""
    assert cli.main(argv) == 0, capsys.readouterr()
    human = capsys.readouterr().out
    assert cli.main([*argv, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    return human, json.loads(out[-1])


@pytest.fixture(scope="module")
def sampled(tiny):
    assert cli.main(["sample", *_base(tiny, *RUN)]) == 0
    return tiny


def test_sample(sampled, capsys):
    human, js = _both(capsys, ["sample", *_base(sampled, *RUN)])
    assert "24/24 done" in human
    assert js["evaluated"] == 0 and js["total"] == js["target"] == 24 and js["stopped"] is None


def test_info(tiny, capsys):
    human, js = _both(capsys, ["info", *_base(tiny)])
    assert f"{L} layers" in human and "perplexity" in human
    assert js["n_layers"] == L and js["family"] == "llama" and js["ppl"] > 1


def test_status(sampled, capsys):
    human, js = _both(capsys, ["status", "--cache-dir", str(sampled / "cache")])
    assert "run_id" in human and "24/24" in human
    assert js["runs"][0]["n_samples"] == 24


def test_fit(sampled, capsys):
    human, js = _both(capsys, ["fit", *_base(sampled, *STAGE2)])
    assert "held-out" in human and "learning curve" in human and "comparison on the same split" in human
    for key in ("run_id", "r2", "spearman", "mae", "mae_ppl", "n_masks", "report", "learning_curve", "comparison",
                "work_curve"):
        assert key in js, key
    assert js["n_masks"] == 24 and js["report"]["split"]["n_train"] + js["report"]["split"]["n_test"] == 24
    assert "quality vs work" in human and js["work_curve"]["points"] and js["work_curve"]["n_test"] == \
        js["report"]["split"]["n_test"]


def test_shapley(sampled, capsys):
    human, js = _both(capsys, ["shapley", *_base(sampled, *STAGE2, "--estimator", "exact")])
    assert "Shapley value" in human and "least important first" in human
    for key in ("run_id", "estimator", "contributions", "stderr", "ranking", "n_evaluations", "efficiency", "r2",
                "estimand", "key"):
        assert key in js, key
    assert len(js["contributions"]) == L and sorted(js["ranking"]) == list(range(L))


def test_shapley_window_boot_adds_the_window_part_to_the_interval(sampled, capsys):
    argv = ["shapley", *_base(sampled, *STAGE2, "--estimator", "regression-adjusted")]
    _, plain = _both(capsys, argv)
    _, windowed = _both(capsys, [*argv, "--window-boot", "10"])
    interval = windowed["details"]["interval"]
    assert interval["details"]["window_resamples"] == 10 and len(interval["details"]["se"]["windows"]) == L
    assert "windows" not in plain["details"]["interval"]["details"]["se"]
    assert windowed["contributions"] == pytest.approx(plain["contributions"])  # the estimate is the same
    width = np.subtract(windowed["ci_high"], windowed["ci_low"]) - np.subtract(plain["ci_high"], plain["ci_low"])
    assert np.all(width >= -1e-12) and np.any(width > 0)  # an independent noise source only widens


def test_prune_exports_and_refuses_a_full_folder(sampled, tmp_path, capsys):
    out = tmp_path / "pruned"
    argv = ["prune", *_base(sampled, *STAGE2, "--remove", "1", "--out", str(out))]
    assert cli.main(argv) == 0
    human = capsys.readouterr().out
    assert "exported to" in human and "calibration perplexity" in human
    code = cli.main([*argv, "--json"])
    out_lines = capsys.readouterr()
    assert code != 0 and "--overwrite" in out_lines.err
    err = json.loads(out_lines.out.strip().splitlines()[-1])
    assert "error" in err and "--overwrite" in err["error"]
    assert cli.main([*argv, "--overwrite", "--json"]) == 0
    js = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(js["removed"]) == 1 and js["verification"]["ok"] and js["out"] == str(out)
    # every surrogate prediction says whether its kept count lies inside the sampled ones (engine.extrapolation)
    region = js["sampled_region"]
    assert region["kept_min"] <= region["kept_max"] and region["text"].startswith("kept ")
    assert js["kept"] == js["n_layers"] - 1 if "n_layers" in js else js["kept"] >= 1
    inside = region["kept_min"] <= js["kept"] <= region["kept_max"]
    assert js["extrapolation"] == (None if inside else f"outside the sampled region ({region['text']})")


def test_run_and_baselines(sampled, capsys):
    human, js = _both(capsys, ["run", *_base(sampled, *STAGE2, "--remove", "2")])
    assert "calibration perplexity: full" in human and "predicted" in human
    # only what was asked: --remove 2 decides for k = 2 alone
    assert js["evaluated"] == 0 and len(js["removed"]) == 2 and [d["k"] for d in js["by_k"]] == [2]
    assert js["decide_evaluations"] > 0 and {"sample", "fit", "decide"} <= set(js["stages"])
    assert js["source"] and js["by_k"][0]["evaluations"] <= js["decide_evaluations"]
    assert "the decision spent" in human and "set-window evaluations" in human
    _, every = _both(capsys, ["run", *_base(sampled, *STAGE2, "--remove", "2", "--all-k")])
    assert [d["k"] for d in every["by_k"]] == [1, 2]
    # the swap search (default 2 rounds): k = 1 races every single layer, k = 2 more than verification's 6
    assert every["by_k"][0]["n_measured"] == L and every["by_k"][1]["n_measured"] > 6
    assert all(1 <= d["n_compared"] <= d["n_measured"] for d in every["by_k"])
    row = next(line for line in human.splitlines() if line.startswith(f"  2  {js['by_k'][0]['removed']}"))
    assert f" {js['by_k'][0]['n_measured']:>5}  " in row and f"from {js['source']}" in row
    _, js0 = _both(capsys, ["run", *_base(sampled, *STAGE2, "--remove", "2", "--swaps", "0", "--ks", "1",
                                          "--no-baseline-candidates")])
    assert [d["k"] for d in js0["by_k"]] == [1, 2]
    assert all(d["n_measured"] <= 6 for d in js0["by_k"])  # rank-and-cut + 5 beam sets, no swaps, no baselines
    _, tight = _both(capsys, ["run", *_base(sampled, *STAGE2, "--remove", "2", "--decide-budget", "20")])
    assert tight["decide_cost"]["budget_hit"] and tight["by_k"][0]["budget_hit"]
    human, js = _both(capsys, ["baselines", *_base(sampled, "--method", "block-influence")])
    assert "removal order" in human and len(js["scores"]) == L


@pytest.mark.parametrize("argv, words", [
    (["shapley", "--estimator", "magic"], "invalid choice"),
    (["fit", "--holdout", "1.5"], "--holdout must be a fraction"),
    (["run", "--remove", str(L)], "1..5"),
    (["sample", "--strata", "a,b"], "integers"),
    (["shapley", "--window-boot", "1"], "--window-boot must be 0 or >= 2"),
    (["run", "--remove", "2", "--ks", "2,9"], "1..5"),  # refused before any sampling
    (["prune", "--decide-budget", "0"], "--decide-budget must be a positive integer"),
    (["prune", "--race-alpha", "2"], "--race-alpha must be a fraction"),
])
def test_a_failing_command_prints_one_paragraph_and_a_json_error(sampled, capsys, argv, words):
    code = cli.main([argv[0], *_base(sampled, *RUN), *argv[1:], "--json"])
    out, err = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in err and len([x for x in err.splitlines() if x.startswith("error:")]) == 1
    assert words in err
    js = json.loads(out.strip().splitlines()[-1])
    assert words in js["error"] and js["type"]


def test_cli_pipeline_and_method_give_the_same_contributions(sampled, capsys):
    """The CLI (scripts), pipeline.contributions (the app) and method.* on a Samples record
    (bench/compare) compute the same numbers for the same specs."""
    assert cli.main(["shapley", *_base(sampled, *STAGE2, "--estimator", "paper", "--budget", "5000",
                                       "--mc-seed", "3"), "--json"]) == 0
    from_cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["contributions"]
    spec = RunSpec(ModelSpec(name=str(sampled / "tiny")), DataSpec(source=str(sampled / "text.txt"), n_windows=2,
                                                                   seq_len=16),
                   SamplingSpec(scheme="size-uniform", n_masks=24))
    mspec = MethodSpec(surrogate=SurrogateSpec(kind="ridge-pairwise", ensemble=2), estimator="paper", budget=5000,
                       mc_seed=3)
    run = pipeline.open_run(spec, sampled / "cache")
    from_pipeline = pipeline.contributions(run, mspec)["contributions"]
    t = run.store.table()
    samples = method.Samples.from_perplexities(t.masks, t.ppl, run.store.meta()["ppl_full"], spec.sampling)
    from_method = method.contributions(samples, method.fit(samples, mspec.surrogate, curve=False), mspec).values
    np.testing.assert_allclose(from_cli, from_pipeline, rtol=0, atol=0)
    np.testing.assert_allclose(from_cli, from_method, rtol=1e-12, atol=1e-12)


def test_export_by_hand_and_report(sampled, tmp_path, capsys):
    out = tmp_path / "by-hand"
    assert cli.main(["export", *_base(sampled, *STAGE2, "--removed", "1,4", "--out", str(out))]) == 0
    human = capsys.readouterr().out
    assert "layers [1, 4] removed" in human and "generate with KV cache ok" in human
    code = cli.main(["export", *_base(sampled, *STAGE2, "--removed", "1,4"), "--json"])  # no --out
    captured = capsys.readouterr()
    assert code != 0 and "--out" in json.loads(captured.out.strip().splitlines()[-1])["error"]
    assert json.loads((out / "pruning_manifest.json").read_text())["removed_layers"] == [1, 4]

    assert cli.main(["prune", *_base(sampled, *STAGE2, "--remove", "2")]) == 0
    capsys.readouterr()
    html = tmp_path / "report.html"
    human, js = _both(capsys, ["report", *_base(sampled, *STAGE2, "--remove", "2", "--out", str(html))])
    assert "perplexity calibration" in human and f"report written to {html}" in human
    assert len(js["removed"]) == 2 and js["footprint"]["pruned"]["n_layers"] == L - 2
    assert js["footprint"]["pruned"]["n_params"] < js["footprint"]["full"]["n_params"]
    cal = js["ppl"]["calibration"]  # paired over the same windows: the ratio's interval holds the ratio
    assert cal["ratio_low"] <= cal["ratio"] <= cal["ratio_high"]
    assert cal["ratio"] == pytest.approx(cal["after"] / cal["before"])
    assert cal["n_windows"] == 2 and js["speed"]["repeats"] == 5
    assert js["speed"]["forward_low"] <= js["speed"]["forward_speedup"] <= js["speed"]["forward_high"]
    text = html.read_text()
    assert "Removing 2 of" in text  # the one-sentence story heads the report
    assert "<html>" in text and "Plotly" in text and '<script src="http' not in text  # plotly.js inlined
    # without --out the report goes into the run's folder of the cache, never the working directory
    _, js2 = _both(capsys, ["report", *_base(sampled, *STAGE2, "--remove", "2")])
    written = Path(js2["html"])
    assert written.name == "report-k2.html" and written.parent == (sampled / "cache" / js2["run_id"]).resolve()
    assert "Removing 2 of" in written.read_text()


def test_long_stages_report_step_total_eta_and_words_in_json_progress_lines(sampled, capsys):
    """decide, fit, shapley, candidates, baselines (SLEB per round), interactions and report write {"event": "progress", "stage", "done", "total",
    "eta_s", "step"} lines on stderr with --json (what the app's job panel shows)."""
    def progress(argv):
        assert cli.main([*argv, "--json"]) == 0
        err = capsys.readouterr().err.splitlines()
        return [json.loads(x) for x in err if x.startswith('{"event": "progress"')]

    lines = progress(["prune", *_base(sampled, *STAGE2, "--remove", "2")])
    decide = [x for x in lines if x["stage"] == "decide"]
    assert decide and all({"done", "total", "eta_s", "step"} <= set(x) for x in decide)
    assert any("candidate sets on" in x["step"] and "left" in x["step"] for x in decide)
    assert all(0 <= x["done"] <= x["total"] for x in decide)
    fit = progress(["fit", *_base(sampled, *STAGE2, "--surrogate-seed", "3")])
    assert [x["stage"] for x in fit][:1] == ["fit"] and fit[-1]["done"] == fit[-1]["total"]
    assert any("comparing surrogate kinds" in x["step"] for x in fit)
    shap = progress(["shapley", *_base(sampled, *STAGE2, "--surrogate-seed", "4")])
    assert "shapley" in {x["stage"] for x in shap}
    cands = progress(["candidates", *_base(sampled, *STAGE2, "--remove", "2")])
    assert [x["done"] for x in cands if x["stage"] == "candidates"] == [0, 1, 2]
    base = progress(["baselines", *_base(sampled, "--method", "block-influence,angular")])
    assert [x["done"] for x in base if x["stage"] == "baselines"] == [0, 1, 1, 2]
    sleb = [x for x in progress(["baselines", *_base(sampled, "--criterion", "sleb", "--k-max", "2")])
            if x["stage"] == "baselines" and "round" in x["step"]]
    assert [x["done"] for x in sleb] == [0, L, 2 * L - 1] == [0, L, sleb[0]["total"]]  # masks over both rounds
    inter = [x for x in progress(["interactions", *_base(sampled, *STAGE2)]) if x["stage"] == "interactions"]
    assert inter[0]["done"] == 0 and inter[-1]["done"] == inter[-1]["total"] >= 3
    assert any("jackknife" in x["step"] for x in inter)
    report = [x for x in progress(["report", *_base(sampled, *STAGE2, "--remove", "2")]) if x["stage"] == "report"]
    assert [x["done"] for x in report] == list(range(report[-1]["total"] + 1))
    assert any("generating" in x["step"] for x in report)


def test_export_spec_round_trips_through_its_flags():
    """ExportSpec declares the export flags once: the argv the pages build from it (the hand-written argv
    they built before, byte for byte) parses back to the same spec, --eval-data repeated in order."""
    from engine.argv import command_argv
    from engine.config import ExportSpec, spec_argv

    held = ExportSpec(eval_data=("demo-test", "more.txt"))
    assert spec_argv(held) == ["--eval-data", "demo-test", "--eval-data", "more.txt"]
    assert spec_argv(ExportSpec(out="x", overwrite=True)) == ["--out", "x", "--overwrite"]
    assert spec_argv(ExportSpec()) == []
    for name, spec in (("prune", held), ("run", ExportSpec(out="x", overwrite=True, eval_data=("a",))),
                       ("export", ExportSpec(out="m.gguf", format="gguf", quant="q8_0")), ("heal", ExportSpec())):
        argv = command_argv(name, spec, extra=("--removed", "1") if name == "export" else ())
        assert cli._spec(ExportSpec, cli.build_parser(argv).parse_args(argv)) == spec
    # prune, run and heal take no format: their flags are not there
    argv = command_argv("prune", ExportSpec(format="gguf"))
    assert "--format" not in argv and cli._spec(ExportSpec, cli.build_parser(argv).parse_args(argv)) == ExportSpec()
