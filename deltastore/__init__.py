"""deltastore: a crash-safe, chunked, checksummed store of per-step parameter deltas, with a streaming reduce core.

See :class:`deltastore.DeltaStore` for the format and call order, :mod:`deltastore.codecs` for the codecs,
:mod:`deltastore.reduce` for the reduce core and :mod:`deltastore.writer` for the asynchronous write pipeline.
"""

from .codecs import CODEC_NAMES, Codec, Encoder, StreamSpec, parse_codec, register_codec
from .devices import resolve_device
from .errors import (PROGRAMMING_ERRORS, CorruptionError, DeltaStoreError, DeviceUnavailableError, FormatError,
                     InvalidArgumentError, LayoutMismatchError, ReadOnlyError, StepSelectionError, StoreExistsError,
                     StoreLockedError, StoreNotFoundError, UnknownCodecError, WriterError)
from .layout import TensorLayout
from .store import DeltaStore
from .streaming import DEFAULT_PIECE_ELEMS, StepStreamer

__all__ = ["CODEC_NAMES", "DEFAULT_PIECE_ELEMS", "Codec", "CorruptionError", "DeltaStore", "DeltaStoreError",
           "DeviceUnavailableError", "FormatError", "InvalidArgumentError", "LayoutMismatchError", "PROGRAMMING_ERRORS",
           "ReadOnlyError", "StepSelectionError", "StepStreamer", "StoreExistsError", "StoreLockedError",
           "StoreNotFoundError", "TensorLayout", "UnknownCodecError", "WriterError", "parse_codec", "resolve_device",
           "Encoder", "StreamSpec", "register_codec"]
__version__ = "0.1.0"
