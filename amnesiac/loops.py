"""What real training loops wrap around a model and an optimizer, and how the Recorder sees through it.

- :func:`unwrap_model` strips ``DistributedDataParallel`` / ``DataParallel`` (``.module``) and ``torch.compile``
  (``._orig_mod``) wrappers, so tensors are stored under the plain module's names and load into the plain model.
- :func:`recorded_state` is the state_dict the Recorder records: the unwrapped module's, with the ``_orig_mod.`` of
  compiled submodules taken out of the names and FSDP2's sharded tensors (DTensors) replaced by their local shard.
- :class:`StepTrigger` decides when an iteration's step is recorded: after the step of one chosen optimizer when
  several step one model, and never for a step that a ``GradScaler`` skipped (the step's samples changed nothing, so
  they are dropped rather than charged to the next step).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(3, 2)
    >>> wrapped = torch.compile(model, backend="eager")
    >>> sorted(wrapped.state_dict())
    ['_orig_mod.bias', '_orig_mod.weight']
    >>> unwrap_model(wrapped) is model, sorted(recorded_state(wrapped))
    (True, ['bias', 'weight'])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import RecorderError

_COMPILED = "_orig_mod."


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside any number of DDP / DataParallel / ``torch.compile`` wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            model = getattr(model, "_orig_mod")
    return model


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (FSDP2 shards parameters along a dimension); any other tensor as it is."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) and type(t).__name__ == "DTensor" else t


def is_sharded(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


def recorded_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict the Recorder records: plain names, local shards of sharded tensors."""
    return {name.replace(_COMPILED, ""): local_tensor(t) for name, t in unwrap_model(model).state_dict().items()}


def check_dtypes(state: dict[str, torch.Tensor], recorded: dict[str, torch.dtype], step: int) -> None:
    """Raise :class:`RecorderError` if a recorded tensor changed dtype (``model.half()`` in the middle of a run)."""
    for name, dtype in recorded.items():
        t = state.get(name)
        if t is not None and t.dtype != dtype:
            raise RecorderError(f"tensor {name!r} is {str(t.dtype).removeprefix('torch.')} at step {step}, but the "
                                f"run recorded it as {str(dtype).removeprefix('torch.')}: a state_dict that changes "
                                "dtype in the middle of a run cannot be recorded as one run (its deltas would not "
                                "add up). Keep the parameters' dtype and use torch.autocast for mixed precision, or "
                                "close this run and record the rest into a new one.")


def as_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """One optimizer or a sequence of them (several optimizers stepping one model)."""
    optimizers = list(optimizer) if isinstance(optimizer, Sequence) else [optimizer]
    if not optimizers or not all(hasattr(o, "register_step_post_hook") for o in optimizers):
        raise RecorderError("optimizer must be a torch.optim.Optimizer or a non-empty list of them")
    # accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer wrap the optimizer that actually steps
    inner = [getattr(o, "optimizer", None) or getattr(o, "_optimizer", None) for o in optimizers]
    return [i if isinstance(i, torch.optim.Optimizer) else o for i, o in zip(inner, optimizers)]


class StepTrigger:
    """Calls ``on_step`` once per iteration, after the step of the trigger optimizer (``record_on``: one of the
    optimizers or its index; the last one by default), and ``on_skip`` when a ``GradScaler`` skips that step.

    A GradScaler skips ``optimizer.step()`` when the gradients hold inf or NaN; no hook fires then. Wrapping the
    scaler's ``step`` on that one instance tells a skipped step from a taken one without reading its private state.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer], on_step: Callable[[], None],
                 on_skip: Callable[[], None], *, record_on=None, scaler=None):
        if record_on is None:
            trigger = optimizers[-1]
        elif isinstance(record_on, int) and not isinstance(record_on, bool):
            if not -len(optimizers) <= record_on < len(optimizers):
                raise RecorderError(f"record_on={record_on} is not an index of the {len(optimizers)} optimizers")
            trigger = optimizers[record_on]
        else:
            trigger = next((o for o in optimizers if o is record_on or o is as_optimizers(record_on)[0]), None)
            if trigger is None:
                raise RecorderError("record_on must be one of the optimizers given to the Recorder (or its index)")
        self.trigger, self.steps_taken = trigger, 0
        self._on_step, self._on_skip = on_step, on_skip
        self._hook = trigger.register_step_post_hook(self._stepped)
        self._scaler, self._scaler_step = scaler, None
        if scaler is not None:
            if not callable(getattr(scaler, "step", None)):
                raise RecorderError("scaler must be a torch.amp.GradScaler (or have its step(optimizer) method)")
            self._scaler_step = scaler.step
            scaler.step = self._scaled_step  # on this instance only

    def _stepped(self, optimizer, args, kwargs) -> None:
        self.steps_taken += 1
        self._on_step()

    def _scaled_step(self, optimizer, *args, **kwargs):
        before = self.steps_taken
        out = self._scaler_step(optimizer, *args, **kwargs)
        if getattr(optimizer, "optimizer", optimizer) is self.trigger and self.steps_taken == before:
            self._on_skip()
        return out

    def remove(self) -> None:
        self._hook.remove()
        if self._scaler is not None and self._scaler.__dict__.get("step") == self._scaled_step:
            del self._scaler.step
