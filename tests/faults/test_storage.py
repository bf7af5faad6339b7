"""Storage faults: damaged stores, stores with no tables, read-only caches, full disks.

Read-only and full-disk cases run on a real tmpfs when this process may mount one (root on
Linux); the *_patched cases inject the same OS errors and always run.
"""

import errno
import os
import shutil
import sqlite3

import pytest

from engine.store import RunStore
from faults.helpers import FAST_FIT, fill, lease_status, model_args, remount_read_only, rows, tmpfs


def _sampled_cache(cli, models, cache, masks=4, name="llama4"):
    """Sample `masks` masks into `cache`; (database path, JSON result)."""
    code, _, err, js = cli("sample", *model_args(models, name), "--masks", masks, "--cache-dir", cache)
    assert code == 0, err
    return cache / js["run_id"] / "run.sqlite", js


def _damage(db, offset_pages=1, byte=0x5A):
    """Overwrite every page after `offset_pages` with garbage (the file stays the same size)."""
    con = sqlite3.connect(db)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big") or 65536
    for i in range(page * offset_pages, len(data)):
        data[i] = byte
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["pages", "header"])
def test_damaged_store_is_refused_on_open_and_listed(how, models, tmp_path, cli):
    db, _ = _sampled_cache(cli, models, tmp_path)
    if how == "pages":
        _damage(db)
    else:
        data = bytearray(db.read_bytes())
        data[:16] = b"not a database!!"
        db.write_bytes(bytes(data))
    code, _, err, js = cli("sample", *model_args(models), "--masks", 6, "--cache-dir", tmp_path)
    assert code == 5 and js["kind"] == "environment" and js["type"] == "StoreDamaged", err
    assert str(db) in js["message"] and "delete" in js["message"].lower()
    code, out, _, js = cli("status", "--cache-dir", tmp_path, "--json")
    assert code == 0 and [(r["run_id"], r["status"]) for r in js["runs"]] == [(db.parent.name, "damaged")]
    assert "damaged" in out and js["runs"][0]["problem"]
    # What the message says to do works: delete the folder, run again.
    shutil.rmtree(db.parent)
    code, _, err, js = cli("sample", *model_args(models), "--masks", 6, "--cache-dir", tmp_path)
    assert code == 0 and js["total"] == 6, err


def test_store_with_no_tables(models, tmp_path, cli):
    db, first = _sampled_cache(cli, models, tmp_path, masks=2)
    for suffix in ("", "-wal", "-shm"):
        p = db.with_name(db.name + suffix)
        if p.exists():
            p.unlink()
    sqlite3.connect(db).close()  # an empty database file: a creation killed before its first commit
    code, out, _, js = cli("status", "--cache-dir", tmp_path, "--json")
    assert js["runs"][0]["status"] == "damaged" and "no tables" in js["runs"][0]["problem"]
    from engine.errors import StoreDamaged

    with pytest.raises(StoreDamaged, match="has no tables"):  # opened without the run's meta (the app)
        RunStore.open(tmp_path, first["run_id"])
    # a command knows the run's meta, so it initialises the empty file and proceeds
    code, _, err, js = cli("fit", *model_args(models), *FAST_FIT, "--cache-dir", tmp_path)
    assert code == 2 and "no evaluated masks yet" in js["message"], err
    code, _, err, js = cli("sample", *model_args(models), "--masks", 2, "--cache-dir", tmp_path)
    assert code == 0 and js["total"] == 2 and js["run_id"] == first["run_id"], err


def test_status_lists_every_run_folder(models, tmp_path, cli):
    db, js = _sampled_cache(cli, models, tmp_path)
    (tmp_path / "0123456789abcdef").mkdir()  # a run folder whose database was never written
    (tmp_path / "uploads").mkdir()  # not a run folder
    code, out, _, js = cli("status", "--cache-dir", tmp_path, "--json")
    states = {r["run_id"]: r["status"] for r in js["runs"]}
    assert states == {db.parent.name: "finished", "0123456789abcdef": "empty"}


# ------------------------------------------------------------------ read-only
def _read_only_checks(cli, models, cache, db, record):
    before = rows(db)
    code, out, err, js = cli("status", "--cache-dir", cache, "--json")
    assert code == 0 and [r["status"] for r in js["runs"]] == ["finished"] and js["runs"][0]["n_samples"] == 12, err
    code, _, err, js = cli("sample", *model_args(models, "llama6"), "--masks", 16, "--cache-dir", cache)
    assert code == 5 and js["kind"] == "environment" and str(db) in js["message"], err
    assert "--cache-dir" in js["message"]
    code, _, err, js = cli("sample", *model_args(models, "llama6"), "--masks", 12, "--cache-dir", cache)
    assert code == 0 and js["evaluated"] == 0, err  # nothing to add: reading works
    code, _, err, js = cli("fit", *model_args(models, "llama6"), "--masks", 12, *FAST_FIT, "--cache-dir", cache)
    assert code == 5 and js["kind"] == "environment" and str(db) in js["message"], err  # reads, then cannot save
    record.samples_lost += len(set(before) - set(rows(db)))


def test_read_only_cache_tmpfs(models, tmp_path, cli, record):
    with tmpfs(tmp_path / "ro", 8192) as cache:
        db, _ = _sampled_cache(cli, models, cache, masks=12, name="llama6")
        remount_read_only(cache)
        _read_only_checks(cli, models, cache, db, record)


def test_read_only_cache_patched(models, tmp_path, cli, record, monkeypatch):
    db, _ = _sampled_cache(cli, models, tmp_path, masks=12, name="llama6")
    real_access = os.access

    def access(path, mode, *a, **k):  # what access(2) answers on a read-only mount
        if mode & os.W_OK and str(path).startswith(str(tmp_path)):
            return False
        return real_access(path, mode, *a, **k)

    monkeypatch.setattr(os, "access", access)
    _read_only_checks(cli, models, tmp_path, db, record)


def test_read_only_out_folder_tmpfs(models, tmp_path, cli):
    cache = tmp_path / "cache"
    _sampled_cache(cli, models, cache, masks=12, name="llama6")
    with tmpfs(tmp_path / "ro", 1024) as ro:
        remount_read_only(ro)
        code, _, err, js = cli("prune", *model_args(models, "llama6"), "--masks", 12, "--remove", 1, *FAST_FIT,
                               "--cache-dir", cache, "--out", ro / "pruned")
        assert code == 5 and js["kind"] == "environment" and "read-only" in js["message"], err
        assert not any(ro.iterdir())


# ------------------------------------------------------------------ disk full
def test_disk_full_while_sampling_tmpfs(models, tmp_path, cli, record):
    with tmpfs(tmp_path / "full", 4096) as cache:
        db, _ = _sampled_cache(cli, models, cache, masks=2)
        before = rows(db)
        filler = fill(cache)
        code, _, err, js = cli("sample", *model_args(models), "--masks", 10, "--cache-dir", cache)
        assert code == 5 and js["kind"] == "environment" and js["type"] == "DiskFull", err
        assert "disk full" in js["message"] and str(cache) in js["message"]
        filler.unlink()
        code, _, err, js = cli("sample", *model_args(models), "--masks", 10, "--cache-dir", cache)
        assert code == 0 and js["total"] == 10, err
        after = rows(db)
        record.samples_lost += len(set(before) - set(after))
        assert after[: len(before)] == before


def test_disk_full_while_exporting_tmpfs(models, tmp_path, cli):
    cache = tmp_path / "cache"
    _sampled_cache(cli, models, cache, masks=12, name="llama6")
    with tmpfs(tmp_path / "full", 256) as out_fs:  # smaller than the export (~0.5 MB)
        code, _, err, js = cli("prune", *model_args(models, "llama6"), "--masks", 12, "--remove", 1, *FAST_FIT,
                               "--cache-dir", cache, "--out", out_fs / "pruned")
        assert code == 5 and js["type"] == "DiskFull" and str(out_fs) in js["message"], err
        assert list(out_fs.iterdir()) == []  # no folder, no config files, no temporary folder


def test_disk_full_patched(models, tmp_path, cli, record, monkeypatch):
    from engine.store import Writer

    db, _ = _sampled_cache(cli, models, tmp_path, masks=2, name="llama6")
    before = rows(db)
    real_add = Writer.add

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.store.path))

    monkeypatch.setattr(Writer, "add", full)
    code, _, err, js = cli("sample", *model_args(models, "llama6"), "--masks", 12, "--cache-dir", tmp_path)
    assert code == 5 and js["type"] == "DiskFull" and str(db) in js["message"], err
    assert lease_status(db) == "failed"
    monkeypatch.setattr(Writer, "add", real_add)
    code, _, err, js = cli("sample", *model_args(models, "llama6"), "--masks", 12, "--cache-dir", tmp_path)
    assert code == 0 and js["total"] == 12
    record.samples_lost += len(set(before) - set(rows(db)))

    import transformers

    def no_space(self, folder, *a, **k):
        (folder / "config.json").write_text("{}")  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", no_space)
    out = tmp_path / "pruned"
    code, _, err, js = cli("prune", *model_args(models, "llama6"), "--masks", 12, "--remove", 1, *FAST_FIT,
                           "--cache-dir", tmp_path, "--out", out)
    assert code == 5 and js["type"] == "DiskFull", err
    assert not out.exists() and not list(tmp_path.glob(".pruned.*"))
