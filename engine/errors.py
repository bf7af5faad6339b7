"""User-facing errors: each message says what went wrong and what to do.

The CLI prints `str(error)` with no traceback and exits with `exit_code`; the app
shows the same text. Anything that is not a WorkbenchError is a bug.
"""


class WorkbenchError(Exception):
    exit_code = 2


class ModelLoadError(WorkbenchError):
    """Unknown model, missing local folder, hub unreachable, or remote code refused."""


class UnsupportedArchitecture(WorkbenchError):
    """No adapter knows where this model's decoder layers live."""


class DataError(WorkbenchError):
    """Calibration or evaluation text missing, empty, unreadable or too short."""


class StoreError(WorkbenchError):
    """The run store is unreadable, belongs to another run, or is locked by a live writer."""


class StoreLocked(StoreError):
    exit_code = 3


class ExportError(WorkbenchError):
    """The export folder is not empty (and --overwrite was not given), or the reload check failed."""


class EstimationError(WorkbenchError):
    """Too few evaluated masks for the requested fit or estimator."""


class SamplingError(WorkbenchError):
    """Invalid strata / remove range / scheme, or more masks asked for than exist."""
