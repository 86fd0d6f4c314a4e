"""Which device a reduce or a snapshot read runs on: checked once, up front, with an error that says what is missing.

Without this, ``device="cuda"`` on a machine without CUDA fails deep inside torch (an ``AssertionError`` or a
``RuntimeError`` from the first allocation), where it would look like a damaged run.

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

import torch

from .errors import DeviceUnavailableError, InvalidArgumentError


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device` that exists here; raises :class:`DeviceUnavailableError` if it does not.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, a :class:`torch.device`...

    Raises:
        DeviceUnavailableError: CUDA (or the GPU of that index, or MPS) is not available on this machine.
        InvalidArgumentError: ``device`` is not a device name at all.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{device!r} is not a device; pass 'cpu' or 'cuda' ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"CUDA is not available on this machine (asked for device {str(dev)!r}); "
                                         "pass device='cpu', or install a CUDA build of torch on a machine with a GPU")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceUnavailableError(f"CUDA device {dev.index} is not available: this machine has {count} "
                                         f"(cuda:0..cuda:{count - 1})")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceUnavailableError("MPS is not available on this machine; pass device='cpu'")
    return dev

