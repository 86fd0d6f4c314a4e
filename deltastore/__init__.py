"""deltastore: a crash-safe, chunked, checksummed store of per-step parameter deltas, with a streaming reduce core.

See :class:`deltastore.DeltaStore` for the format and call order, :mod:`deltastore.codecs` for the codecs,
:mod:`deltastore.reduce` for the reduce core and :mod:`deltastore.writer` for the asynchronous write pipeline.
Everything a user of the store (``amnesiac`` included) may rely on is listed in ``__all__``; the submodules are the
implementation.
"""

from .codecs import CODEC_NAMES, Codec, Encoder, StreamSpec, parse_codec, register_codec
from .devices import resolve_device
from .errors import (PROGRAMMING_ERRORS, CorruptionError, DeltaStoreError, DeviceUnavailableError, FormatError,
                     InvalidArgumentError, LayoutMismatchError, ReadOnlyError, StepSelectionError, StoreExistsError,
                     StoreLockedError, StoreNotFoundError, UnknownCodecError, WriterError)
from .fileio import (MAX_SAFETENSORS_HEADER, atomic_write_bytes, crc32c, parse_safetensors, read_safetensors_file,
                     tensor_crc32c)
from .generation import read_attachment, stale_files
from .layout import TensorLayout
from .reduce import ReduceResult, UnlearnPlan, plan_unlearning, run_plan
from .rewrite import RewritePlan, RewriteResult, RunRewrite, folded_metadata, reopen_store
from .steplog import RaggedField, log_tail_crc32c
from .store import DeltaStore
from .verify import Reconstruction, check_state_at, reconstruction, verify_store
from .streaming import DEFAULT_PIECE_ELEMS, StepStreamer
from .writer import DEFAULT_BUFFER_BYTES, AsyncStepWriter

__all__ = ["CODEC_NAMES", "Codec", "CorruptionError", "DeltaStore", "DeltaStoreError", "DeviceUnavailableError",
           "FormatError", "InvalidArgumentError", "LayoutMismatchError", "PROGRAMMING_ERRORS", "ReadOnlyError",
           "StepSelectionError", "StoreExistsError", "StoreLockedError", "StoreNotFoundError", "TensorLayout",
           "UnknownCodecError", "WriterError", "parse_codec", "resolve_device",
           # codecs: one class per codec, registered by name
           "Encoder", "StreamSpec", "register_codec",
           # reading and writing files the way the store does (amnesiac's checkpoints use them)
           "MAX_SAFETENSORS_HEADER", "atomic_write_bytes", "crc32c", "parse_safetensors", "read_safetensors_file",
           "tensor_crc32c", "log_tail_crc32c", "RaggedField",
           # unlearning: planning and the streaming reduce
           "ReduceResult", "UnlearnPlan", "plan_unlearning", "run_plan",
           # recording: the asynchronous write pipeline
           "AsyncStepWriter", "DEFAULT_BUFFER_BYTES",
           # verification: the one reconstruction check (verify and resume)
           "Reconstruction", "check_state_at", "reconstruction", "verify_store",
           # rewriting a run in place (purge, retention): deltastore/rewrite.py, deltastore/generation.py
           "RewritePlan", "RewriteResult", "RunRewrite", "folded_metadata", "read_attachment", "reopen_store",
           "stale_files"]
__version__ = "0.1.0"
