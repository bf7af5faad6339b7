"""One conversion of results to JSON-able values, shared by every result record."""

from __future__ import annotations

import math

import numpy as np


def jsonable(x):
    """numpy arrays/scalars -> Python, non-finite floats -> None, records -> their to_dict()."""
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if hasattr(x, "to_dict"):
        return x.to_dict()
    return x
