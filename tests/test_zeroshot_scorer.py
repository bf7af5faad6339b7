"""The shared-prefix scorer (engine.zeroshot_scorer via engine.zeroshot's LM) against lm-eval's own HFLM path:
per-request loglikelihoods within 1e-4 and the same greedy flags on items written by the test, on tiny models of
several families, in memory pruned; the same accuracies through evaluate_model; progress in items with an ETA."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import build_tiny_lm, byte_tokenizer
from engine import zeroshot, zeroshot_scorer as zsc
from engine.tasks import DEFAULT_TASKS, task_configs
from test_zeroshot import write_task_files


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("zss")
    write_task_files(root)
    return root


def _instances(cache, names=DEFAULT_TASKS):
    """lm-eval's own loglikelihood Instances for the test's documents (every task, every choice)."""
    from lm_eval.tasks import TaskManager

    built = TaskManager(include_defaults=False).load(task_configs(names, cache))["tasks"]
    out = []
    for name in names:
        t = built[name]
        t.build_all_requests(limit=None, rank=0, world_size=1)
        out.extend(t.instances)
    return out


def _scores(model, cache, scorer, instances):
    lm = zeroshot._lm(model, byte_tokenizer(), batch_size=3, progress=None, scorer=scorer)
    return lm.loglikelihood(instances), lm


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "phi3", "mistral"])
def test_shared_scorer_gives_hflms_loglikelihoods(cache, family):
    model = build_tiny_lm(family, n_layers=3, seed=1, tokenizer=byte_tokenizer()).model.eval()
    inst = _instances(cache)
    assert len(inst) > 50 and len({(i.task_name, i.doc_id) for i in inst}) == 8 * 3
    ref, _ = _scores(model, cache, "hflm", inst)
    got, lm = _scores(model, cache, "shared", inst)
    assert lm.fallback_reason is None
    assert [g[1] for g in got] == [r[1] for r in ref]  # greedy flags
    for (a, _), (b, _) in zip(got, ref):
        assert a == pytest.approx(b, abs=1e-4)


def test_trees_share_the_context_and_score_after_it(cache):
    """HellaSwag's 4 endings share the context (one tree, 4 branches); WinoGrande's two contexts share the
    sentence up to the blank; every scored position lies in a branch; duplicates share a branch."""
    inst = _instances(cache, ("hellaswag", "winogrande"))
    lm = zeroshot._lm(build_tiny_lm("llama", 2).model, byte_tokenizer(), 3, None)
    reqs = [lm._encode_pair(*i.args) for i in inst]
    keys = [(i.task_name, i.doc_id) for i in inst]
    trees = zsc.build_trees(reqs, keys)
    assert len(trees) == 2  # the test's 3 documents of each task are the same text: duplicates share branches
    assert sorted(i for t in trees for b in t.branches for i in b.requests) == list(range(len(reqs)))
    hs = [t for t in trees if t.key[0] == "hellaswag"]
    assert all(len(t.branches) == 4 and len(t.prefix) == len(reqs[0][0]) - 1 for t in hs)
    assert [len(b.requests) for b in hs[0].branches] == [3, 3, 3, 3]
    wg = [t for t in trees if t.key[0] == "winogrande"][0]
    assert len(wg.branches) == 2 and len(wg.prefix) == len("Ann beat Bo so ")  # byte tokens, up to the option
    for t in trees:
        for b in t.branches:
            assert 1 <= b.n_scored <= len(b.suffix)
    dup = zsc.build_trees([reqs[0], reqs[0], reqs[1]], [("x", 0), ("y", 1), ("y", 1)])
    assert [[b.requests for b in t.branches] for t in dup] == [[[0, 1]], [[2]]]  # the duplicate joins the first
    apart = zsc.build_trees([reqs[0], reqs[1]], [("x", 0), ("y", 1)])  # different documents: one tree each
    assert len(apart) == 2 and all(len(t.prefix) == len(reqs[0][0]) - 1 for t in apart)
    rows = zsc.pack_rows(trees, 64)
    assert sorted(id(t) for r in rows for t in r) == sorted(id(t) for t in trees)
    assert all(sum(t.n_tokens for t in r) <= max(64, max(t.n_tokens for t in trees)) for r in rows)


def test_pruned_in_memory_and_long_requests(cache):
    """Inside export.pruned_view (layers deleted, renumbered) the shared scorer still equals HFLM; requests
    longer than the model's window go to HFLM's truncating path (same numbers as HFLM alone)."""
    from engine.export import pruned_view

    lm = build_tiny_lm("llama", n_layers=4, seed=2, tokenizer=byte_tokenizer())
    inst = _instances(cache, ("piqa", "arc_easy", "lambada_openai", "boolq"))
    with pruned_view(lm.model, lm.adapter, [0, 3]):
        lm.model.eval()
        ref, _ = _scores(lm.model, cache, "hflm", inst)
        got, _ = _scores(lm.model, cache, "shared", inst)
        full_len = max(len(i.args[0]) + len(i.args[1]) for i in inst)
        short = zeroshot._lm(lm.model, byte_tokenizer(), 3, None, "shared")
        short._max_length = full_len // 2  # some requests now exceed the window: HFLM truncates them
        hshort = zeroshot._lm(lm.model, byte_tokenizer(), 3, None, "hflm")
        hshort._max_length = full_len // 2
        got_short, ref_short = short.loglikelihood(inst), hshort.loglikelihood(inst)
    assert len(lm.adapter.layers(lm.model)) == 4
    for (a, ga), (b, gb) in [*zip(got, ref), *zip(got_short, ref_short)]:
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert got_short != got  # truncation changed something: the long path was exercised


def test_unsupported_family_falls_back_to_hflm(cache):
    model = build_tiny_lm("gpt2", n_layers=2, tokenizer=byte_tokenizer()).model.eval()
    assert "gpt2" in zsc.unsupported_reason(model)
    inst = _instances(cache, ("piqa",))
    ref, _ = _scores(model, cache, "hflm", inst)
    got, lm = _scores(model, cache, "shared", inst)
    assert got == ref and "gpt2" in lm.fallback_reason


def test_evaluate_model_same_accuracy_and_item_progress(cache, capsys):
    model = build_tiny_lm("llama", n_layers=3, seed=3, tokenizer=byte_tokenizer()).model
    tok = byte_tokenizer()
    old = zeroshot.evaluate_model(model, tok, DEFAULT_TASKS, cache, batch_size=4, scorer="hflm")
    bar = zeroshot.Progress(True, json_mode=True)
    new = zeroshot.evaluate_model(model, tok, DEFAULT_TASKS, cache, batch_size=4, progress=bar, scorer="shared")
    assert new.scorer == "shared" and old.scorer == "hflm"
    for t in DEFAULT_TASKS:
        assert new.tasks[t].correct == old.tasks[t].correct and new.tasks[t].acc == old.tasks[t].acc
        assert new.tasks[t].acc_norm == old.tasks[t].acc_norm
    assert new.tasks["lambada_openai"].perplexity == pytest.approx(old.tasks["lambada_openai"].perplexity, rel=1e-4)
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith('{"event": "progress"')]
    last = lines[-1]
    assert last["done"] == last["total"] == new.n_requests
    assert last["items_done"] == last["items_total"] == 8 * 3 and last["eta_s"] == 0
    assert all(0 <= x["items_done"] <= x["items_total"] for x in lines)


def test_progress_eta_from_tokens_when_known():
    p = zeroshot.Progress(False, json_mode=True)
    p.start(10, items=5)
    p.add_work(1000)
    p.t0 -= 10.0  # 10 s elapsed
    p.credit(250)
    p.step(5, items=2)
    line = p.line(p.t0 + 10.0)
    assert line["eta_s"] == pytest.approx(30.0) and line["items_done"] == 2 and line["items_total"] == 5
    q = zeroshot.Progress(False, json_mode=True)
    q.start(10)
    q.step(2)
    assert q.line(q.t0 + 4.0)["eta_s"] == pytest.approx(16.0)  # by requests when no token counts


def test_layout_mask_blocks_other_branches_and_trees():
    a = zsc.Tree([1, 2], [zsc.Branch([3, 4], 2, [4, 5], [0]), zsc.Branch([6], 1, [7], [1])])
    b = zsc.Tree([], [zsc.Branch([8, 9], 1, [10], [2])])
    lay = zsc.layout([[a, b]], torch.float32, "cpu")
    ids = lay.input_ids[0].tolist()
    assert ids == [1, 2, 3, 4, 6, 8, 9] and lay.position_ids[0].tolist() == [0, 1, 2, 3, 2, 0, 1]
    ok = (lay.mask[0, 0] == 0).int().tolist()
    assert ok[4] == [1, 1, 0, 0, 1, 0, 0]  # branch 2 sees the prefix and itself, not branch 1
    assert ok[3] == [1, 1, 1, 1, 0, 0, 0]
    assert ok[6] == [0, 0, 0, 0, 0, 1, 1]  # tree b sees nothing of tree a
    assert lay.cols.tolist() == [2, 3, 4, 6] and lay.targets.tolist() == [4, 5, 7, 10]


def test_cli_scorer_flag_same_numbers(cache, tmp_path, capsys):
    """`engine evaluate` uses the shared scorer by default; `--scorer hflm` selects lm-eval's path: same results."""
    from conftest import save_tiny_llama
    from engine import cli

    folder = save_tiny_llama(tmp_path / "tiny", n_layers=3)
    base = ["evaluate", "--model", str(folder), "--tasks", "hellaswag,winogrande", "--cache-dir", str(cache),
            "--recompute", "--json"]
    out = {}
    for flag in ([], ["--scorer", "hflm"]):
        assert cli.main([*base, *flag]) == 0
        js = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        out[js["scorer"]] = js
    assert set(out) == {"shared", "hflm"}
    for t in ("hellaswag", "winogrande"):
        assert out["shared"]["tasks"][t]["acc"] == out["hflm"]["tasks"][t]["acc"]
    assert cli.main([*base, "--scorer", "nope"]) != 0
