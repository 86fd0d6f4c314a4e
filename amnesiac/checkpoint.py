"""The recording checkpoint file: model, optimizer and recording position at a committed step, without pickle.

A checkpoint is one safetensors file. Its tensors are the model's state_dict (``model/NAME``), the optimizer's
tensors (``optim/PARAM/KEY``, ``optim_group/I/KEY``) and a lossy codec's error-feedback residual
(``recorder/residual``); its metadata key ``amnesiac_checkpoint`` holds one JSON object::

    {"format": 1, "run_uid": ..., "step": committed steps, "epoch": ...,
     "log_bytes": the step log's committed length, "log_tail_crc32c": crc32c of its last 4 KiB,
     "optimizer": the optimizer's state_dict with every tensor replaced by {"tensor": NAME} and every other value by
                  {"value": JSON}, "tensor_crc32c": {NAME: crc32c of the tensor's bytes}}

``log_bytes`` and ``log_tail_crc32c`` tie the checkpoint to one history of its run: resuming refuses a checkpoint
from a history that was since cut back and recorded again.

Example:
    >>> import tempfile, torch
    >>> model = torch.nn.Linear(2, 1); opt = torch.optim.Adam(model.parameters())
    >>> model(torch.ones(1, 2)).sum().backward(); opt.step()
    >>> path = tempfile.mkdtemp() + "/ckpt.safetensors"
    >>> save_checkpoint(path, model, opt, step=1, epoch=0)
    >>> again = torch.nn.Linear(2, 1); opt2 = torch.optim.Adam(again.parameters())
    >>> info = load_checkpoint(path, again, opt2)
    >>> info["step"], torch.equal(again.weight, model.weight), opt2.state_dict()["param_groups"][0]["betas"]
    (1, True, (0.9, 0.999))
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from deltastore import (DeltaStore, DeltaStoreError, atomic_write_bytes, log_tail_crc32c, read_safetensors_file,
                        tensor_crc32c)

from .errors import ModelMismatchError, RecorderError, ResumeError

CHECKPOINT_FORMAT = 1
MAX_CHECKPOINT_BYTES = 1 << 40
METADATA_KEY = "amnesiac_checkpoint"
_INT_FIELDS = ("step", "log_bytes", "log_tail_crc32c", "epoch")


def save_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, step: int,
                    epoch: int, store: DeltaStore | None = None, residual: torch.Tensor | None = None,
                    durable: bool = True) -> None:
    """Write the checkpoint atomically (readers see the old file or the new one, never a torn one).

    ``store`` ties it to the run's history at ``step`` (its uid, committed log length and log tail checksum).
    """
    tensors = {f"model/{k}": v for k, v in model.state_dict().items()}
    optim = optimizer_to_tensors(optimizer, tensors)
    if residual is not None:
        tensors["recorder/residual"] = residual
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    log_bytes = store.commit_record["log_bytes"] if store is not None else 0
    head = {"format": CHECKPOINT_FORMAT, "run_uid": store.uid if store is not None else None, "step": int(step),
            "log_bytes": log_bytes, "log_tail_crc32c": log_tail_crc32c(store, log_bytes) if store is not None else 0,
            "epoch": int(epoch), "optimizer": optim,
            "tensor_crc32c": {k: tensor_crc32c(v) for k, v in tensors.items()}}
    data = safetensors.torch.save(tensors, metadata={METADATA_KEY: json.dumps(head)})
    atomic_write_bytes(Path(path), data, durable=durable)


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    for_store: DeltaStore | None = None) -> dict:
    """Load a checkpoint written by :meth:`amnesiac.Recorder.checkpoint` into ``model`` (and ``optimizer``).

    Returns ``{"step", "epoch", "run_uid", "residual"}``. Every tensor is checked against its crc32c first; the
    file is safetensors with JSON metadata, so loading it runs no code. With ``for_store``, the checkpoint must
    belong to that run and to the history it holds now (else :class:`ResumeError`, and nothing is loaded).
    """
    path = Path(path)
    try:
        tensors, meta = read_safetensors_file(path, "checkpoint", max_bytes=MAX_CHECKPOINT_BYTES)
    except FileNotFoundError:
        raise ResumeError(f"checkpoint {path} does not exist") from None
    except DeltaStoreError as e:
        raise ResumeError(f"{path} is not a checkpoint written by Recorder.checkpoint ({e})") from None
    head = _head(path, meta)
    if set(head["tensor_crc32c"]) != set(tensors) or any(tensor_crc32c(t) != head["tensor_crc32c"][k]
                                                         for k, t in tensors.items()):
        raise ResumeError(f"checkpoint {path} fails its crc32c checksums: the file was changed or damaged")
    if for_store is not None:
        _check_history(path, head, for_store)
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(model_state)
    except RuntimeError as e:
        raise ModelMismatchError(f"checkpoint {path} does not fit the model: {str(e)[:500]}") from None
    if optimizer is not None:
        optimizer_from_tensors(optimizer, head["optimizer"], tensors)
    return {"step": head["step"], "epoch": head["epoch"], "run_uid": head.get("run_uid"),
            "residual": tensors.get("recorder/residual")}


def _head(path: Path, meta: dict[str, str]) -> dict:
    """The checkpoint's JSON description, checked for the fields and types this version writes."""
    try:
        head = json.loads(meta[METADATA_KEY])
    except (KeyError, ValueError, RecursionError) as e:
        raise ResumeError(f"{path} is not a checkpoint written by Recorder.checkpoint (no readable "
                          f"{METADATA_KEY!r} metadata: {type(e).__name__})") from None
    ok = (isinstance(head, dict) and head.get("format") == CHECKPOINT_FORMAT
          and all(isinstance(head.get(k), int) for k in _INT_FIELDS)
          and isinstance(head.get("tensor_crc32c"), dict) and isinstance(head.get("optimizer"), dict))
    if not ok:
        raise ResumeError(f"{path} is not a checkpoint written by Recorder.checkpoint (or of an unknown version)")
    return head


def _check_history(path: Path, head: dict, store: DeltaStore) -> None:
    if head.get("run_uid") != store.uid:
        raise ResumeError(f"checkpoint {path} belongs to another run than {store.path}")
    if head["step"] > store.num_steps:
        raise ResumeError(f"checkpoint {path} was taken at step {head['step']}, but {store.path} has only "
                          f"{store.num_steps} committed steps: it comes from a history that was since cut "
                          "back. Resume from a checkpoint taken at or before the last committed step.")
    if (store.commit_record["log_bytes"] < head["log_bytes"]
            or log_tail_crc32c(store, head["log_bytes"]) != head["log_tail_crc32c"]):
        raise ResumeError(f"checkpoint {path} does not match the steps {store.path} committed before it (a "
                          "checkpoint from another history of this run)")


# ---------------------------------------------------------------- the optimizer as tensors + JSON
def _jsonable(value, where: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v, where) for k, v in value.items()}
    raise RecorderError(f"cannot checkpoint the optimizer: {where} holds a {type(value).__name__}, which is "
                        "neither a tensor nor plain JSON (checkpoints never pickle)")


def optimizer_to_tensors(optimizer: torch.optim.Optimizer, tensors: dict) -> dict:
    """Split the optimizer's state_dict into tensors (added to ``tensors``) and a JSON description."""
    def split(entry: dict, prefix: str, where: str) -> dict:
        out = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/{key}"] = value
                out[key] = {"tensor": f"{prefix}/{key}"}
            else:
                out[key] = {"value": _jsonable(value, f"{where}[{key!r}]")}
        return out

    sd = optimizer.state_dict()
    return {"state": {str(pid): split(entry, f"optim/{pid}", f"state[{pid}]") for pid, entry in sd["state"].items()},
            "param_groups": [split(group, f"optim_group/{i}", f"param_groups[{i}]")
                             for i, group in enumerate(sd["param_groups"])]}


def _like(value, template):
    """JSON gives lists where the optimizer had tuples (Adam's betas): give them back their type."""
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, desc: dict, tensors: dict) -> None:
    """Load the state described by :func:`optimizer_to_tensors` into ``optimizer`` (:class:`ResumeError` if it
    does not fit)."""
    def unpack(item):
        if not isinstance(item, dict) or len(item) != 1:
            raise ResumeError("the checkpoint's optimizer description is malformed")
        if "tensor" in item:
            try:
                return tensors[item["tensor"]]
            except (KeyError, TypeError):
                raise ResumeError("the checkpoint lacks an optimizer tensor it names") from None
        return item.get("value")

    current = optimizer.state_dict()
    try:
        state = {int(pid): {k: unpack(v) for k, v in entry.items()} for pid, entry in desc["state"].items()}
        groups = []
        for group, template in zip(desc["param_groups"], current["param_groups"], strict=True):
            groups.append({k: _like(unpack(v), template.get(k)) for k, v in group.items()})
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except ResumeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ResumeError(f"the checkpoint's optimizer state does not fit this optimizer: {e}") from None
