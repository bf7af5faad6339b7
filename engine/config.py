"""Frozen configuration records and their stable hashes.

Every stage of the workbench is a pure function of these records, so a run is
identified by the hash of what it was asked to do (see `RunSpec.run_id`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
DEMO_MODEL_DIR = ASSETS_DIR / "demo-lm"
DEMO_TEXT_DIR = ASSETS_DIR / "demo-text"
# Names accepted by --data that resolve to the bundled text.
DEMO_DATA = {
    "demo": DEMO_TEXT_DIR / "calibration.txt",
    "demo-test": DEMO_TEXT_DIR / "test.txt",
    "demo-ood": DEMO_TEXT_DIR / "ood.txt",
}


def default_cache_dir() -> Path:
    """Run stores live here unless --cache-dir is given: $LAYERPRUNE_CACHE or ./cache."""
    return Path(os.environ.get("LAYERPRUNE_CACHE", "cache")).resolve()


def stable_hash(obj, n: int = 12) -> str:
    """Hex digest of a JSON-able object (dataclasses included), stable across runs and machines."""

    def default(o):
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, Path):
            return str(o)
        raise TypeError(f"cannot hash {type(o).__name__}")

    blob = json.dumps(obj, sort_keys=True, default=default, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:n]


@dataclass(frozen=True)
class ModelSpec:
    name: str = "demo"  # "demo", a Hugging Face hub id, or a local folder
    revision: str | None = None  # hub revision (branch, tag or commit); None = default branch
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    device: str = "cpu"  # cpu | cuda | cuda:N | auto (device_map="auto", needs accelerate)
    trust_remote_code: bool = False  # run code shipped with the model: off unless asked


@dataclass(frozen=True)
class DataSpec:
    source: str = "demo"  # demo | demo-test | demo-ood | path/to.txt | path/to.jsonl | wikitext2 | ptb | c4 | bookcorpus
    n_windows: int = 8  # number of calibration windows
    seq_len: int = 128  # tokens per window
    seed: int = 0  # which windows are drawn from the token stream
    text_field: str = "text"  # field read from each .jsonl record or dataset row


@dataclass(frozen=True)
class SamplingSpec:
    scheme: str = "stratified"  # stratified (paper) | size-uniform (coalition sizes uniform on 0..L)
    n_masks: int = 256  # masks in the run (the store may already hold some)
    strata: tuple[int, ...] | None = None  # kept-layer counts; None = the paper's strata scaled to L
    remove_range: tuple[float, float] | None = None  # alternative to strata: fraction of layers removed (lo, hi)
    paired: bool = False  # size-uniform only: also evaluate each mask's complement
    seed: int = 0


@dataclass(frozen=True)
class SurrogateSpec:
    kind: str = "mlp"  # mlp (the paper's network) | ridge-pairwise | gbt
    preset: str = "adam"  # mlp only: adam (converges at any budget) | paper (the reference schedule)
    holdout: float = 0.2  # fraction held out, stratified by kept-layer count
    ensemble: int = 5  # fits with different seeds, for error bars
    seed: int = 0


@dataclass(frozen=True)
class EvalSpec:
    """How masks are evaluated: speed and memory only, never which numbers come out, so it is
    not part of the run id (a run sampled with one setting can be resumed with another)."""

    batch_size: int | None = None  # windows per layer call; None = all at once (lower it if activations do not fit)
    compile: bool = False  # torch.compile each decoder layer: a one-time compile, then fused kernels
    # One prefix-trie walk over all pending masks: the fewest layer calls (256 default masks on 16
    # layers: 1,381 instead of 1,694), but masks are stored in trie order, so a run stopped midway
    # holds a biased part of the sample. False: doubling chunks in sample order (pipeline.sample).
    single_pass: bool = False


@dataclass(frozen=True)
class RunSpec:
    """What identifies a run store: the model, the calibration data and how masks are sampled.

    The number of masks is deliberately *not* part of the identity: asking for more
    masks later extends the same run, asking again for the same number resumes it.
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    sampling: SamplingSpec = field(default_factory=SamplingSpec)

    def identity(self, model_identity: str, data_hash: str) -> dict:
        """The JSON-able record hashed into the run id (model files and data content, not names)."""
        sampling = dataclasses.asdict(self.sampling)
        sampling.pop("n_masks")
        return {
            "model": model_identity,
            "dtype": self.model.dtype,
            "data": data_hash,
            "sampling": sampling,
        }

    def run_id(self, model_identity: str, data_hash: str) -> str:
        return stable_hash(self.identity(model_identity, data_hash))
