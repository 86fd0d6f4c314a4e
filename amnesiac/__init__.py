"""amnesiac: record a PyTorch training run, then forget training samples by undoing the steps that saw them.

Implements amnesiac unlearning (Graves, Nagisetty, Ganesh, AAAI 2021) on top of :mod:`deltastore`.
"""

from .errors import (AmnesiacError, DataError, ModelMismatchError, RecorderError, ResumeError, RunBusyError,
                     RunDamagedError, RunExistsError, RunNotFoundError, SelectionError)
from .recorder import Recorder
from .requests import purge
from .run import Run, UnlearnReport, open_run
from .sampler import IsolatingBatchSampler

__all__ = ["AmnesiacError", "DataError", "IsolatingBatchSampler", "ModelMismatchError", "Recorder", "RecorderError",
           "ResumeError", "Run", "RunBusyError", "RunDamagedError", "RunExistsError", "RunNotFoundError",
           "SelectionError", "UnlearnReport", "open_run", "purge"]
__version__ = "0.1.0"
