"""LoRA healing (engine/heal.py, pipeline.heal, `engine heal`): loss goes down, the merged export
reloads with plain transformers and equals the in-memory model, a killed run resumes from its
checkpoint, a healing text that overlaps a held-out text is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_lm, byte_tokenizer, save_tiny_llama, write_words
from engine import cli, heal as heal_lib
from engine.config import HealSpec, SpecError
from engine.data import load_text

ROOT = Path(__file__).resolve().parents[1]


def _tiny(tmp_path, n_layers=4):
    model = save_tiny_llama(tmp_path / "model", n_layers=n_layers)
    text = write_words(tmp_path / "words.txt", 2500)
    return model, text


def _heal_args(model, text, cache, *extra):
    return ["heal", "--model", str(model), "--data", str(text), "--windows", "4", "--seq-len", "16", "--held-back", "4",
            "--cache-dir", str(cache), *extra]


def test_a_few_lora_steps_lower_the_training_loss_and_leave_removed_layers_alone():
    lm = build_tiny_lm("llama", n_layers=4, tokenizer=byte_tokenizer())
    text = " ".join(np.random.default_rng(0).choice(["layer", "mask", "prune", "token"], 1500))
    hw = heal_lib.healing_windows(lm.tokenizer, text, 16, held_back=4, seed=0)
    assert hw.train.shape[1] == 16 and hw.held_back.shape == (4, 16)
    removed_layer = [p.detach().clone() for p in lm.adapter.layers(lm.model)[1].parameters()]
    kept_before = [p.detach().clone() for p in lm.adapter.layers(lm.model)[2].parameters()]
    mask = np.array([True, False, True, True])
    before = heal_lib.window_losses(lm, hw.held_back, mask)
    out = heal_lib.heal_model(lm, [0, 2, 3], hw, HealSpec(steps=30, lr=1e-2, batch=4, dropout=0.0, objective="lm",
                                                                  generated=0), steps=30)
    assert len(out.losses) == 30 and out.resumed_from == 0
    assert np.mean(out.losses[-5:]) < np.mean(out.losses[:5])
    after = heal_lib.window_losses(lm, hw.held_back, mask)
    assert after[0].sum() < before[0].sum()  # held-back loss too
    # merged: plain Linear modules again, the removed layer untouched, the kept ones changed
    assert all(type(m).__name__ == "Linear" for n, m in lm.model.named_modules() if n.endswith("q_proj"))
    assert all(torch.equal(a, b) for a, b in zip(removed_layer, lm.adapter.layers(lm.model)[1].parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(kept_before, lm.adapter.layers(lm.model)[2].parameters()))
    cmp = heal_lib.compare(before[:2], after[:2], before[2])
    assert cmp["ratio_low"] <= cmp["ratio"] <= cmp["ratio_high"] and cmp["ratio"] < 1 and cmp["n_windows"] == 4


def test_merged_export_reloads_with_plain_transformers_and_equals_the_in_memory_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from engine.export import MANIFEST, pruned_view

    model_dir, text = _tiny(tmp_path)
    out = tmp_path / "healed"
    assert cli.main(_heal_args(model_dir, text, tmp_path / "cache", "--removed", "1", "--steps", "12", "--lr", "1e-2",
                               "--out", str(out), "--json")) == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["removed_layers"] == [1] and manifest["n_layers"] == 3
    h = manifest["healing"]
    assert h["rank"] == 8 and h["steps"] == 12 and h["lr"] == 1e-2 and h["peft"]
    assert h["data_sha256"] == __import__("hashlib").sha256(text.read_bytes()).hexdigest()
    assert manifest["verification"]["ok"]

    # the same healing in memory, then the export's logits against the merged model's
    from engine.config import ModelSpec
    from engine.models import load_model

    lm = load_model(ModelSpec(name=str(model_dir)))
    hw = heal_lib.healing_windows(lm.tokenizer, text.read_text(), 16, 4, 0)
    heal_lib.heal_model(lm, [0, 2, 3], hw, HealSpec(steps=12, lr=1e-2), steps=12)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    x = hw.held_back  # (4, 16)
    with torch.no_grad(), pruned_view(lm.model, lm.adapter, [0, 2, 3]):
        mine = lm.model(x, use_cache=False).logits
    with torch.no_grad():
        theirs = reloaded(x, use_cache=False).logits
    assert torch.allclose(mine, theirs, rtol=1e-4, atol=1e-5)
    unhealed = load_model(ModelSpec(name=str(model_dir)))  # the comparison can fail: healing changed the logits
    with torch.no_grad(), pruned_view(unhealed.model, unhealed.adapter, [0, 2, 3]):
        assert not torch.allclose(unhealed.model(x, use_cache=False).logits, theirs, rtol=1e-4, atol=1e-5)


def _checkpoint_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=False)["step"])
    except Exception:  # not written yet, or being renamed into place
        return 0


def test_killed_heal_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    model_dir, text = _tiny(tmp_path)
    steps = ["--removed", "2", "--steps", "150", "--checkpoint-every", "5", "--heal-seq-len", "32", "--lr", "3e-3",
             "--objective", "lm", "--generated", "0"]  # the text's own loss: the random tiny model is no teacher
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "engine", *_heal_args(model_dir, text, cache, *steps), "--json"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    killed_at = 0
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((cache / "heal").glob("*/checkpoint.pt")) if (cache / "heal").exists() else []
        if found and (killed_at := _checkpoint_step(found[0])) >= 10:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the healing finished before it could be killed"
    assert 10 <= killed_at < 150

    rerun = subprocess.run([sys.executable, "-m", "engine", *_heal_args(model_dir, text, cache, *steps), "--json"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    resumed = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert resumed["resumed_from"] >= killed_at and resumed["resumed_from"] % 5 == 0
    assert resumed["steps"] == 150 and resumed["steps_run"] == 150 - resumed["resumed_from"]

    whole = _run_json(_heal_args(model_dir, text, tmp_path / "other-cache", *steps))
    assert whole["resumed_from"] == 0
    assert whole["ppl_after"] == pytest.approx(resumed["ppl_after"], rel=1e-4)
    assert whole["loss_last"] == pytest.approx(resumed["loss_last"], rel=1e-4)
    assert whole["ppl_after"] < whole["ppl_before"]


def _run_json(argv) -> dict:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main([*argv, "--json"])
    assert code == 0, buf.getvalue()[-2000:]
    return json.loads(buf.getvalue().strip().splitlines()[-1])


def test_healing_text_that_overlaps_a_held_out_text_is_refused_or_warned_about(tmp_path, capsys):
    model_dir, text = _tiny(tmp_path)
    code = cli.main(_heal_args(model_dir, text, tmp_path / "c", "--removed", "1", "--heal-data", "demo-test", "--json"))
    assert code == 2
    err = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert err["kind"] == "input" and "held-out" in err["message"] and "--allow-overlap" in err["message"]

    # a text holding a tenth of demo-test's passages: refused by content, whatever its name
    test = load_text("demo-test").split("\n\n")
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(text.read_text() + "\n\n" + "\n\n".join(test[: len(test) // 10]))
    with pytest.raises(heal_lib.HealDataOverlap, match="demo-test"):
        heal_lib.check_overlap(str(mixed), mixed.read_text(), {"demo-test": load_text("demo-test")})
    found, warnings = heal_lib.check_overlap(str(mixed), mixed.read_text(), {"demo-test": load_text("demo-test")},
                                             allow=True)
    assert found["demo-test"]["shared"] > 100 and len(warnings) == 1
    # the bundled calibration text shares only boilerplate with the held-out texts: accepted
    found, warnings = heal_lib.check_overlap("demo", load_text("demo"), {n: load_text(n) for n in ("demo-test", "demo-ood")})
    assert not warnings and found["demo-test"]["of_heldout"] < heal_lib.OVERLAP_REFUSE
    # --eval-data texts are held out too
    code = cli.main(_heal_args(model_dir, text, tmp_path / "c", "--removed", "1", "--eval-data", str(text), "--json"))
    assert code == 2 and "held-out" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["message"]


def test_cli_human_output_and_errors(tmp_path, capsys):
    model_dir, text = _tiny(tmp_path)
    assert cli.main(_heal_args(model_dir, text, tmp_path / "c", "--removed", "1,2", "--steps", "6")) == 0
    captured = capsys.readouterr()
    assert "healed" in captured.out and "6 LoRA steps" in captured.out and "(held back)" in captured.out
    assert "not exported" in captured.out
    assert "healing: step 6/6" in captured.err  # progress with loss and ETA on stderr
    assert "loss" in captured.err and "eta" in captured.err

    assert cli.main(_heal_args(model_dir, text, tmp_path / "c", "--json")) == 2  # no layers chosen
    assert "--remove K" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["message"]
    assert cli.main(_heal_args(model_dir, text, tmp_path / "c", "--removed", "9", "--json")) == 2
    assert "layers 0..3" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["message"]
    assert cli.main(_heal_args(model_dir, text, tmp_path / "c", "--removed", "1", "--steps", "5", "--epochs", "1",
                               "--json")) == 2
    assert "cannot be given with --steps" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["message"]
    with pytest.raises(SpecError):
        HealSpec(lr=0)


def test_an_export_folder_is_healed_as_it_is(tmp_path):
    model_dir, text = _tiny(tmp_path)
    first = tmp_path / "pruned"
    from engine.config import ModelSpec
    from engine.models import load_model
    from engine.export import MANIFEST, prune_model

    lm = load_model(ModelSpec(name=str(model_dir)))
    prune_model(lm, [3], first, verify=False)
    healed = tmp_path / "healed"
    r = _run_json(_heal_args(first, text, tmp_path / "c", "--steps", "4", "--out", str(healed)))
    assert r["removed"] == [] and r["n_layers"] == 3 and r["verified"] is True
    m = json.loads((healed / MANIFEST).read_text())
    assert m["healing"]["source_export"]["removed_layers"] == [3]
    from engine import html_report  # what the Summary page shows for a stored healing

    rows = html_report.heal_rows(r)
    assert len(rows) == 1 and rows[0][3] == f"{r['ppl_after']:,.2f}" and "held back" in rows[0][0]
    assert "4 LoRA steps" in html_report.heal_caption(r) and "passed" in html_report.heal_caption(r)


def test_remove_k_heals_the_runs_decision_and_stores_it_for_the_summary_page(tmp_path):
    from engine import pipeline
    from engine.store import RunStore

    model_dir, text = _tiny(tmp_path, n_layers=6)
    run = ["--model", str(model_dir), "--data", str(text), "--windows", "2", "--seq-len", "16", "--cache-dir",
           str(tmp_path / "cache"), "--scheme", "size-uniform", "--masks", "24"]
    assert cli.main(["sample", *run]) == 0
    run += ["--surrogate", "ridge-pairwise", "--ensemble", "2", "--threads", "1"]
    decided = _run_json(["prune", *run, "--remove", "2"])
    healed = _run_json(["heal", *run, "--remove", "2", "--steps", "4", "--held-back", "4", "--eval-windows", "4"])
    assert healed["removed"] == decided["removed"] and healed["rule"] == decided["method"]
    assert healed["run_id"] == decided["run_id"] and healed["steps"] == 4
    stored = RunStore(tmp_path / "cache", healed["run_id"]).get_artifact(pipeline.heal_name(healed["removed"], 6))
    assert stored["ppl_after"] == healed["ppl_after"] and stored["out"] is None


def test_bench_heal_at_tiny_size_writes_the_table_and_json(tmp_path, capsys):
    from bench import heal as bench_heal

    model_dir, text = _tiny(tmp_path)
    r = bench_heal.main(["--model", str(model_dir), "--data", str(text), "--seq-len", "32", "--ks", "1", "2",
                         "--n-masks", "10", "--steps", "3", "--cache-dir", str(tmp_path / "cache"),
                         "--out", str(tmp_path / "results"), "--json"])
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["steps"] == 3 and {row["method"] for row in last["rows"]} == {"product", "block-influence", "sleb"}
    assert {row["k"] for row in last["rows"]} == {1, 2} and all(row["steps"] == 3 for row in r["rows"])
    table = (tmp_path / "results" / "heal.md").read_text()
    assert "Command: `python -m bench.heal" in table and "| 2 | sleb |" in table
    product = [row for row in last["rows"] if row["method"] == "product"]
    assert all(row["healed_vs_product_healed"] == 1.0 for row in product)
    assert all(row["healed_over_pruned_low"] <= row["healed_over_pruned"] <= row["healed_over_pruned_high"]
               for row in last["rows"])


def test_distill_loss_is_the_kl_to_the_teacher_over_its_top_k_and_one_bin_for_the_rest():
    torch.manual_seed(0)
    t, s = torch.randn(2, 3, 40), torch.randn(2, 3, 40)  # teacher / student logits (B, T, V)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    full_kl = (p * (p.log() - q.log())).sum(-1).mean()
    top, idx = t.topk(40, dim=-1)  # K = V: exactly the KL
    probs = torch.exp(top - torch.logsumexp(t, -1, keepdim=True))
    assert float(heal_lib.distill_loss(s, probs, idx)) == pytest.approx(float(full_kl), rel=1e-5)
    top, idx = t.topk(5, dim=-1)  # K < V: the KL over 6 outcomes (5 tokens + the rest), by hand
    pk = torch.exp(top - torch.logsumexp(t, -1, keepdim=True))
    qk = q.gather(-1, idx)
    p6 = torch.cat([pk, 1 - pk.sum(-1, keepdim=True)], -1)
    q6 = torch.cat([qk, 1 - qk.sum(-1, keepdim=True)], -1)
    binned = (p6 * (p6.log() - q6.log())).sum(-1).mean()
    got = float(heal_lib.distill_loss(s, pk, idx))
    assert got == pytest.approx(float(binned), rel=1e-5) and 0 < got <= float(full_kl)
    assert abs(float(heal_lib.distill_loss(t, pk, idx))) < 1e-6  # the teacher itself: no loss


def test_lora_modules_select_attention_or_mlp_layers():
    lm = build_tiny_lm("llama", n_layers=2, tokenizer=byte_tokenizer())
    names = heal_lib.linear_targets(lm.model, lm.adapter)
    attn, mlp = heal_lib.select_targets(names, "attn"), heal_lib.select_targets(names, "mlp")
    assert attn and mlp and sorted(attn + mlp) == sorted(names) == sorted(heal_lib.select_targets(names, "all"))
    assert all(n.rsplit(".", 1)[1] in ("q_proj", "k_proj", "v_proj", "o_proj") for n in attn)
    assert all(n.rsplit(".", 1)[1] in ("gate_proj", "up_proj", "down_proj") for n in mlp)
    with pytest.raises(SpecError, match="objective"):
        HealSpec(objective="mse")


def test_distillation_on_sampled_windows_lowers_the_kl_and_a_resume_reuses_the_samples(tmp_path):
    lm = build_tiny_lm("llama", n_layers=4, tokenizer=byte_tokenizer())
    text = " ".join(np.random.default_rng(0).choice(["layer", "mask", "prune", "token"], 1500))
    hw = heal_lib.healing_windows(lm.tokenizer, text, 16, held_back=4, seed=0)
    sampled = heal_lib.sample_windows(lm.model, hw.train, 5, seed=0)  # (5, 16)
    assert sampled.shape == (5, 16) and sampled.dtype == torch.long
    assert torch.equal(sampled, heal_lib.sample_windows(lm.model, hw.train, 5, seed=0))  # seeded
    starts = {tuple(r[: heal_lib.PREFIX_TOKENS].tolist()) for r in hw.train}
    assert all(tuple(r[: heal_lib.PREFIX_TOKENS].tolist()) in starts for r in sampled)  # continues the text's prefixes
    spec = HealSpec(steps=20, lr=1e-2, batch=4, dropout=0.0, objective="distill", generated=5, checkpoint_every=10)
    ck = heal_lib.HealCheckpoint(tmp_path / "ck", "k")
    phases = []
    out = heal_lib.heal_model(lm, [0, 2, 3], hw, spec, steps=20, checkpoint=ck,
                              phase=lambda done, total, words: phases.append((done, total, words)))
    assert np.mean(out.losses[-4:]) < np.mean(out.losses[:4]) and min(out.losses) >= -1e-6  # a KL: never negative
    assert phases[0][:2] == (0, 5) and "sampling 5 windows" in phases[0][2]  # the work before step 1 is reported
    assert (5, 5) in [p[:2] for p in phases] and any("targets" in p[2] for p in phases)
    saved = torch.load(ck.path, weights_only=False)
    assert torch.equal(saved["generated"], sampled) and saved["step"] == 20


def test_the_html_report_shows_healing_for_the_same_set():
    from engine import html_report

    record = {"heal_data": "demo", "steps": 4, "train_seconds": 2.0, "out": None, "removed": [1, 2],
              "settings": {"rank": 8, "lr": 1e-3, "objective": "distill", "generated": 64},
              "held_back": {"n_windows": 4, "ppl_full": 30.0, "ppl_before": 40.0, "ppl_after": 35.0, "ratio": 0.875,
                            "ratio_low": 0.85, "ratio_high": 0.9, "level": 0.9, "recovered": 0.5},
              "heldout": {}}
    html = html_report.heal_html(record)
    assert "After healing" in html and "35.00" in html and "50%" in html and "64 windows sampled" in html


def test_bench_quant_table_and_heal_recipe_at_tiny_size(tmp_path, capsys):
    from bench import heal_recipe, quant_table

    model_dir, text = _tiny(tmp_path)
    r = quant_table.main(["--model", str(model_dir), "--data", str(text), "--removed", "1", "--quants", "f16,q8_0",
                          "--heal", "steps=3,generated=2,held_back=4", "--limit", "0", "--eval-windows", "4",
                          "--seq-len", "16", "--out", str(tmp_path / "results"), "--json"])
    assert [(x["model"], x["quant"]) for x in r["rows"]] == [(m, q) for m in ("full", "pruned", "pruned+healed")
                                                              for q in ("f16", "q8_0")]
    assert all(x["verified"] for x in r["rows"]) and r["rows"][0]["ppl_vs_ref"] == 1.0
    assert [x["n_layers"] for x in r["rows"]] == [4, 4, 3, 3, 3, 3]
    assert r["rows"][1]["size_mib"] < r["rows"][0]["size_mib"] and r["rows"][2]["size_mib"] < r["rows"][0]["size_mib"]
    assert r["rows"][2]["ppl"] != r["rows"][4]["ppl"]  # healing changed the pruned model
    md = (tmp_path / "results" / f"quant_table_{model_dir.name}.md").read_text()
    assert "Command: `python -m bench.quant_table" in md and "| pruned+healed | q8_0 | 3 |" in md
    capsys.readouterr()
    out = heal_recipe.main(["--model", str(model_dir), "--data", str(text), "--removed", "1", "--seq-len", "16",
                            "--eval-data", "demo-test", "--eval-windows", "4", "--recipe", "steps=2,generated=2,held_back=4",
                            "--recipe", "objective=lm,steps=2,modules=mlp,held_back=4"])
    assert [x["steps"] for x in out["rows"]] == [2, 2] and out["rows"][1]["trainable_params"] < out["rows"][0]["trainable_params"]
    assert all(x["demo-test"]["ratio_low"] <= x["demo-test"]["ratio"] <= x["demo-test"]["ratio_high"] for x in out["rows"])


def test_a_stopped_distillation_resumes_on_the_same_samples_and_ends_like_an_uninterrupted_one(tmp_path):
    text = " ".join(np.random.default_rng(0).choice(["layer", "mask", "prune", "token"], 1500))
    spec = HealSpec(steps=20, lr=1e-2, batch=4, dropout=0.0, generated=6, checkpoint_every=5)

    def fresh():
        torch.manual_seed(0)
        return build_tiny_lm("llama", n_layers=4, tokenizer=byte_tokenizer())

    lm = fresh()
    hw = heal_lib.healing_windows(lm.tokenizer, text, 16, held_back=4, seed=0)
    whole = heal_lib.heal_model(lm, [0, 2, 3], hw, spec, steps=20)

    def stop_at_12(step, steps, loss, lr):
        if step == 12:
            raise KeyboardInterrupt

    ck = heal_lib.HealCheckpoint(tmp_path / "ck", "k")
    with pytest.raises(KeyboardInterrupt):
        heal_lib.heal_model(fresh(), [0, 2, 3], hw, spec, steps=20, checkpoint=ck, progress=stop_at_12)
    assert torch.load(ck.path, weights_only=False)["step"] == 10
    resumed = heal_lib.heal_model(fresh(), [0, 2, 3], hw, spec, steps=20, checkpoint=ck)
    assert resumed.resumed_from == 10
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-4)
