"""Smoke tests of the benchmarks at tiny sizes: they run, agree with the reference, print JSON last."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench import gpu_mask_eval, mask_eval, run_wall, shapley_step
from bench.common import ZeroingReference
from engine.evaluate import MaskEvaluator, count_prefix_computations
from tests.conftest import build_tiny_lm, save_tiny_llama, write_words

MASKS = np.array([[1, 0, 1, 1], [1, 1, 0, 1], [1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 1]], dtype=bool)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A saved 4-layer Llama + byte tokenizer, and a text file to calibrate on."""
    root = tmp_path_factory.mktemp("bench")
    save_tiny_llama(root / "model", n_layers=4, seed=0)
    write_words(root / "text.txt", 800, seed=0)
    return root


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_reference_zeroing_is_an_identity_restores_weights_and_matches_engine():
    lm = build_tiny_lm("llama", n_layers=4, seed=1)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))  # (n, T)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ref = ZeroingReference(lm, ids)
    assert ref.zeroed_identity_error(MASKS[0]) == 0.0
    ppl_ref = ref.perplexities(MASKS)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    ppl_eng = MaskEvaluator(lm, ids).perplexities(MASKS)
    np.testing.assert_allclose(ppl_eng, ppl_ref, rtol=1e-5)
    # dropping a layer changes the perplexity, so the zeroing did something
    assert not np.isclose(ref.perplexity(np.ones(4, bool)), ppl_ref[0])


def test_compare_counts_layer_calls_and_agrees():
    lm = build_tiny_lm("llama", n_layers=4, seed=2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    r = mask_eval.compare(lm, ids, MASKS, unit_repeats=1)
    assert r.agree and r.max_rel_diff < 1e-5
    assert r.layer_calls == r.prefix_computations == count_prefix_computations(MASKS)
    assert r.kept_layers == int(MASKS.sum()) > r.prefix_computations
    assert r.ratio == pytest.approx(r.reference_seconds / r.engine_seconds)
    assert r.floor_seconds == pytest.approx(r.prefix_computations * r.layer_call_seconds + 6 * r.head_loss_seconds)


def test_compare_scales_a_reference_run_on_a_subset():
    lm = build_tiny_lm("llama", n_layers=4, seed=2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    r = mask_eval.compare(lm, ids, MASKS, unit_repeats=1, reference_masks=3)
    assert r.reference_masks == 3 and r.n_masks == len(MASKS) and r.agree
    assert r.reference_seconds == pytest.approx(r.reference_seconds_measured * len(MASKS) / 3)


def test_mask_eval_main_prints_json_last(tiny_folder, capsys):
    out = mask_eval.main(["--model", str(tiny_folder / "model"), "--data", str(tiny_folder / "text.txt"),
                          "--masks", "6", "--windows", "2", "--seq-len", "16", "--json"])
    printed = _last_json(capsys.readouterr().out)
    assert printed["ratio"] == pytest.approx(out["ratio"])
    assert printed["agree"] and printed["n_masks"] == 6 and printed["engine_seconds"] > 0
    assert printed["reference_seconds"] > 0 and printed["zeroed_identity_max_abs"] == 0.0


def test_gpu_mask_eval_small_on_cpu_writes_readme_section(tmp_path, capsys):
    readme = tmp_path / "README.md"
    gpu_mask_eval.main(["--small", "--device", "cpu", "--dtype", "float32", "--masks", "6", "--windows", "2",
                        "--seq-len", "16", "--readme", str(readme), "--json"])
    printed = _last_json(capsys.readouterr().out)
    assert printed["agree"] and printed["n_layers"] == 4 and printed["ratio"] > 0
    text = readme.read_text()
    assert "### gpu_mask_eval, 20" in text and "Machine: CPU" in text and "ratio" in text


def test_shapley_step_agrees_with_reference_loop(capsys):
    shapley_step.main(["--masks", "400", "--subset", "30", "--layers", "8", "--json"])
    printed = _last_json(capsys.readouterr().out)
    assert printed["agree"] and printed["max_abs_diff_on_subset"] < 1e-6
    assert printed["network_calls_engine"] == 400 * 9 and printed["network_calls_reference"] == 2 * 8 * 400
    assert printed["reference_seconds"] == pytest.approx(printed["reference_seconds_measured"] * 400 / 30)


def test_engine_base_masks_are_from_the_strata():
    s = shapley_step.random_surrogate(8)
    values, base = shapley_step.engine_base_masks(s, 8, (7, 6, 5), 50, seed=3)
    assert base.shape == (50, 8) and set(base.sum(axis=1)) <= {7, 6, 5}
    np.testing.assert_allclose(shapley_step.reference_loop(s.net, base), values, atol=1e-7)


def test_run_wall_times_the_cli(tiny_folder, capsys):
    run_wall.main(["--command", "sample", "--json", "--", "--model", str(tiny_folder / "model"),
                   "--data", str(tiny_folder / "text.txt"), "--masks", "3", "--windows", "2", "--seq-len", "16",
                   "--threads", "1"])
    printed = _last_json(capsys.readouterr().out)
    assert printed["ok"], printed
    assert printed["engine_command"] == "sample" and printed["child_result"]["evaluated"] == 3
    assert printed["wall_seconds"] > printed["reported_seconds"] > 0 and printed["peak_rss_mb"] > 10
