"""``amnesiac train``: record a training run; Ctrl-C stops it cleanly and ``--resume`` continues it.

Ctrl-C (SIGINT) lets the current step finish, waits until it is committed, writes a checkpoint and exits with status
130, printing the command that continues. A checkpoint (model, optimizer, and a lossy codec's residual, at a
committed step; safetensors + JSON) is also written when the run starts and after every epoch (or every
``--checkpoint-every`` steps), so a run killed outright (SIGKILL, power loss) resumes from the last one. ``--resume``
replays the data order from the run's seed, so a resumed run records the same steps, with the same samples, as an
uninterrupted one. The checkpoint is deleted when the run completes.
"""

from __future__ import annotations

import math
import shlex
import signal
import sys
from pathlib import Path

import torch

from .cli_args import UsageError, check_keep_class, parse_device
from .progress import interactive, say

CHECKPOINT_NAME = "checkpoint.safetensors"
# the options that define a run: a resumed run must be continued with the same ones
RUN_OPTIONS = ("dataset", "model", "codec", "backend", "epochs", "batch_size", "optimizer", "lr", "seed",
               "keep_class", "keep_count", "size", "data_path")


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C; the message (one line) says what was kept and how to continue."""


class _StopRequest:
    """While active, the first SIGINT asks the training to stop after the current step; a second one interrupts at
    once (KeyboardInterrupt), as Python's default handler would."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if interactive():  # in a terminal, say at once that the key was heard; a log gets the one final line
            say("stopping after the current step (Ctrl-C again to stop at once)")

    def __enter__(self) -> _StopRequest:
        if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started with Ctrl-C ignored (nohup, `&`): keep it so
            return self
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C keeps its default behaviour
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def continue_command(argv: list[str]) -> str:
    """The command line that continues the run: the same options, with ``--resume``."""
    args = list(argv)
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["amnesiac", *args])


def cmd_train(args) -> dict:
    from .data import load_dataset
    from .models import build_model, model_spec
    from .recorder import Recorder
    from .setting import TrainingSetting
    from .training import accuracy, make_optimizer, train
    device = parse_device(args.device)
    run_dir = Path(args.run)
    options = {k: getattr(args, k) for k in RUN_OPTIONS}
    options["data_path"] = str(Path(args.data_path).resolve()) if args.data_path else None
    if args.resume:
        _check_resumable(run_dir, options)
    elif (run_dir / "store.json").exists():
        raise UsageError(f"{run_dir} already holds a run; to continue an interrupted one add --resume, otherwise "
                         "choose a new --run")
    bundle = load_dataset(args.dataset, data_dir=args.data_dir, download=args.download, seed=args.seed,
                          path=args.data_path, size=args.size)
    data_spec = dict(bundle.spec)
    if args.keep_class is not None:
        check_keep_class(bundle.train.labels, bundle.num_classes, args.keep_class, args.keep_count, args.dataset)
        bundle.train = bundle.train.keep_few_of_class(args.keep_class, args.keep_count, args.seed)
        data_spec.update(keep_class=args.keep_class, keep_count=args.keep_count)
    spec = model_spec(args.model, bundle.input_shape, bundle.num_classes)
    torch.manual_seed(args.seed)
    model = build_model(spec).to(device)
    opt = make_optimizer(model, args.optimizer, args.lr)
    checkpoint = run_dir / CHECKPOINT_NAME
    if args.resume:
        rec = Recorder(model, opt, run_dir, resume=True, checkpoint=checkpoint)
    else:
        setting = TrainingSetting(model_spec=spec, data=data_spec, optimizer=args.optimizer, lr=args.lr,
                                  batch_size=args.batch_size, epochs=args.epochs, seed=args.seed)
        stored = setting.recorder_options()
        stored["extra"]["train_options"] = options  # what --resume checks it is given again
        rec = Recorder(model, opt, run_dir, codec=args.codec, backend=args.backend, **stored)
    steps_per_epoch = math.ceil(len(bundle.train) / args.batch_size)
    total = args.epochs * steps_per_epoch
    resumed_at = rec.steps_submitted
    every = args.checkpoint_every
    done = resumed_at
    try:
        if not args.resume:
            rec.checkpoint(checkpoint)  # a run killed before its first epoch ends can resume from the start

        def after_step(steps_done: int, epoch: int, end_of_epoch: bool) -> bool:
            nonlocal done
            done = steps_done
            if stop.requested:
                return True
            if (end_of_epoch if every is None else every and steps_done % every == 0):
                rec.checkpoint(checkpoint)
            return False

        if args.resume and not args.json:
            say(f"resuming {run_dir} at step {resumed_at} of {total} (epoch {resumed_at // steps_per_epoch + 1})")
        with _StopRequest() as stop:
            seconds = train(model, opt, bundle.train, epochs=args.epochs, batch_size=args.batch_size,
                            seed=args.seed, recorder=rec, progress=not args.json, start_step=resumed_at,
                            after_step=after_step)
        if stop.requested and done < total:
            at = rec.checkpoint(checkpoint)
            rec.close(finalize=False)
            raise TrainingInterrupted(f"amnesiac train: interrupted: {at} of {total} steps are committed in "
                                      f"{run_dir}, with a checkpoint; continue with: "
                                      f"{continue_command(args.argv)}")
    except KeyboardInterrupt:
        rec.close(finalize=False)
        raise TrainingInterrupted(f"amnesiac train: interrupted at once: {rec.store.num_steps} of {total} steps are "
                                  f"committed in {run_dir}; continue from its last checkpoint with: "
                                  f"{continue_command(args.argv)}") from None
    except BaseException:
        rec.close(finalize=False)
        raise
    rec.close()
    checkpoint.unlink(missing_ok=True)  # a complete run cannot be resumed: the checkpoint is of no further use
    acc = accuracy(model, bundle.test)
    result = {"run": str(args.run), "steps": rec.store.num_steps, "train_seconds": seconds,
              "test_accuracy": acc["overall"], "codec": rec.store.codec.name, "resumed_at_step": resumed_at}
    if not args.json:
        print(f"recorded {result['steps']} steps into {args.run} in {seconds:.1f} s"
              + (f" (resumed at step {resumed_at})" if args.resume else "")
              + f"; test accuracy {acc['overall']:.1%}")
    return result


def _check_resumable(run_dir: Path, options: dict) -> None:
    """Refuse ``--resume`` unless ``run_dir`` is an interrupted run recorded with these same options."""
    from .run import open_run
    if not (run_dir / "store.json").exists():
        raise UsageError(f"--resume: {run_dir} holds no run; leave out --resume to start one")
    run = open_run(run_dir)
    if run.complete:
        raise UsageError(f"--resume: {run_dir} is complete ({run.num_steps} steps), there is nothing to continue; "
                         "record a new run to train longer")
    stored = run.spec.get("extra", {}).get("train_options")
    if not isinstance(stored, dict):
        raise UsageError(f"--resume: {run_dir} was not recorded by `amnesiac train` (or by an older version); "
                         "resume it from Python with Recorder(..., resume=True, checkpoint=PATH)")
    if not (run_dir / CHECKPOINT_NAME).is_file():
        raise UsageError(f"--resume: {run_dir} has no {CHECKPOINT_NAME} to continue from; record a new run")
    for key in RUN_OPTIONS:
        if stored.get(key) != options[key]:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"--resume: {run_dir} was recorded with {flag} {_shown(stored.get(key))}, this command "
                             f"says {_shown(options[key])}; resume with the options the run was started with")


def _shown(value) -> str:
    return "(not given)" if value is None else str(value)


def interrupted_exit(error: TrainingInterrupted) -> int:
    """Print the one line and give the exit status of an interrupted command (128 + SIGINT)."""
    print(str(error), file=sys.stderr, flush=True)
    return 130
