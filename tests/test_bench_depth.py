"""bench.depth and bench.gpu_mask_eval --depth at toy sizes: the figures are produced and consistent."""

from __future__ import annotations

import json

import pytest

from bench import depth, gpu_mask_eval
from engine.config import SamplingSpec
from engine.evaluate import count_prefix_computations
from engine.sampling import sample_masks


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_depth_counts_and_times(capsys):
    depth.main(["--depths", "8", "--masks", "12,40", "--timed", "12", "--hidden", "32", "--windows", "2",
                "--seq-len", "16", "--reference-masks", "4", "--breakdown", "--json"])
    printed = _last_json(capsys.readouterr().out)
    timed, counted = printed["rows"]
    masks = sample_masks(SamplingSpec(n_masks=40, seed=0), 8)
    assert counted["layer_calls_per_mask"] == pytest.approx(count_prefix_computations(masks) / 40)
    assert not counted["timed"] and "engine_masks_per_s" not in counted
    assert timed["timed"] and timed["agree"] and timed["reference_masks"] == 4
    assert timed["layer_calls"] == timed["prefix_computations"]
    assert timed["batched_max_rel_diff"] < 1e-5 and timed["batched_calls"] < timed["batched_layer_calls"]
    assert timed["measured_over_floor"] > 0 and timed["ratio"] > 0
    b = timed["breakdown"]
    parts = b["in_layer_calls_cpu_seconds"] + b["in_leaves_cpu_seconds"] + b["rest_cpu_seconds"]
    assert parts == pytest.approx(b["walk_cpu_seconds"]) and b["in_layer_calls_cpu_seconds"] > 0


def test_gpu_mask_eval_depth_mode_small_on_cpu(tmp_path, capsys):
    gpu_mask_eval.main(["--small", "--device", "cpu", "--dtype", "float32", "--depth", "--depth-masks", "6,10",
                        "--reference-masks", "3", "--windows", "2", "--seq-len", "16", "--no-readme", "--json"])
    printed = _last_json(capsys.readouterr().out)
    assert printed["mode"] == "depth" and [r["n_masks"] for r in printed["rows"]] == [6, 10]
    assert all(r["agree"] and r["batched_max_rel_diff"] < 1e-5 for r in printed["rows"])
