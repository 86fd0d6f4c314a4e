"""Where tensors go: one check, shared by the Python API and the command line, that a requested device exists.

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> import torch
    >>> try:
    ...     print(resolve_device("cuda").type == "cuda" and torch.cuda.is_available())
    ... except DeviceError as e:
    ...     print("CUDA is not available" in str(e))
    True
"""

from __future__ import annotations

import torch

from .errors import DeviceError


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, or :class:`DeviceError` when it names a device this machine lacks
    (CUDA without a GPU or CUDA build, a CUDA index past the last GPU, an unknown name)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"{device!r} is not a device torch knows ({e}); use 'cpu' or 'cuda'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {str(resolved)!r} was asked for, but CUDA is not available on this machine "
                              "(no GPU, or a torch build without CUDA); use device 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise DeviceError(f"device {str(resolved)!r} was asked for, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s); use 'cuda:0' .. "
                              f"'cuda:{torch.cuda.device_count() - 1}' or 'cpu'")
    return resolved

