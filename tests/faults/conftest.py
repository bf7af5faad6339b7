"""Fixtures of the fault matrix (helpers in faults/helpers.py); see helpers' docstring for the report."""

from __future__ import annotations

import json
import os

import pytest

from faults.helpers import TEXT, Record, last_json, save_llama


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Saved tiny models and texts: llama4, llama6 (4, 6 layers), nan4 (NaN in layers[2].mlp.down_proj), notok4 (no tokenizer)."""
    root = tmp_path_factory.mktemp("fault-models")
    (root / "text.txt").write_text(TEXT)
    save_llama(root / "llama4")
    save_llama(root / "llama6", n_layers=6)
    save_llama(root / "nan4", nan_at="model.layers.2.mlp.down_proj.weight")
    save_llama(root / "notok4", tokenizer=False)
    return root


_RECORDS: dict[str, Record] = {}


@pytest.fixture(autouse=True)
def record(request):
    rec = _RECORDS.setdefault(request.node.nodeid, Record())
    yield rec


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    target = os.environ.get("LAYERPRUNE_FAULTS_REPORT")
    if not target or report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    rec = _RECORDS.get(item.nodeid, Record())
    line = {"case": item.nodeid.split("::", 1)[-1], "file": item.nodeid.split("::", 1)[0], "outcome": report.outcome,
            "seconds": round(report.duration, 2), "samples_lost": rec.samples_lost, "tracebacks": rec.tracebacks,
            "wrong_results": rec.wrong_results,
            "commands": rec.commands}
    with open(target, "a") as fh:
        fh.write(json.dumps(line) + "\n")


@pytest.fixture
def cli(capsys, record):
    """cli(*argv) -> (exit code, stdout, stderr, last JSON line or None), in-process; counts tracebacks."""
    from engine import cli as engine_cli

    def run(*argv):
        code = engine_cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        record.saw(out, err)
        return code, out, err, last_json(out)

    return run


