"""Progress on stderr for long work: a live bar on a terminal, a few plain lines in a log, never a leftover bar.

On a terminal, training shows one bar (epoch, loss, steps per second) that is cleared at the end; in a log file or
a pipe, where a bar cannot be redrawn, a line per epoch is printed at most every :data:`LOG_EVERY_SECONDS`. Either
way a summary line stays.

Example (stderr here is not a terminal, so only the summary line is printed):
    >>> import torch
    >>> meter = TrainingProgress(epochs=1, steps_per_epoch=2)
    >>> meter.step(0, torch.tensor(0.5)); meter.step(0, torch.tensor(0.25)); meter.end_epoch(0)
    >>> meter.summary(2).startswith("trained 2 steps in ")
    True
    >>> meter.close(2)  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import time

import torch

LOG_EVERY_SECONDS = 10.0
_POSTFIX_EVERY = 10  # steps between loss updates on the bar (each one waits for the device)


def interactive() -> bool:
    """True when stderr is a terminal, where a progress bar can be redrawn in place."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def bar(total: int, desc: str, unit: str):
    """A tqdm bar on a terminal (cleared when done), or None where it would only leave clutter (a log, no work)."""
    if total <= 0 or not interactive():
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def say(text: str) -> None:
    """One line on stderr, above a live bar if there is one."""
    from tqdm import tqdm
    tqdm.write(text, file=sys.stderr)
    sys.stderr.flush()


class TrainingProgress:
    """Epoch, loss and steps per second of a training loop (see the module docstring)."""

    def __init__(self, epochs: int, steps_per_epoch: int, start_step: int = 0):
        self.epochs, self.steps_per_epoch, self.start_step = epochs, steps_per_epoch, start_step
        self.started = self.last_line = time.perf_counter()
        self.loss_sum: torch.Tensor | None = None
        self.loss_count = 0
        self.last_loss = float("nan")
        self.steps = 0
        total = epochs * steps_per_epoch
        self.bar = bar(total - min(start_step, total), "training", "step")

    def step(self, epoch: int, loss: torch.Tensor) -> None:
        """Count one step; ``loss`` is the step's (detached) loss tensor, read from the device only now and then."""
        self.loss_sum = loss.float() if self.loss_sum is None else self.loss_sum + loss.float()
        self.loss_count += 1
        self.steps += 1
        if self.bar is not None:
            self.bar.update()
            if self.steps % _POSTFIX_EVERY == 1:
                self.bar.set_description(f"epoch {epoch + 1}/{self.epochs}", refresh=False)
                self.bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)

    def end_epoch(self, epoch: int) -> None:
        """Close the epoch's loss average; in a log, print a line now and then."""
        if self.loss_count:
            self.last_loss = (self.loss_sum / self.loss_count).item()
        self.loss_sum, self.loss_count = None, 0
        now = time.perf_counter()
        if self.bar is None and epoch + 1 < self.epochs and now - self.last_line >= LOG_EVERY_SECONDS:
            say(f"epoch {epoch + 1}/{self.epochs}: loss {self.last_loss:.4f}, {self.rate():.1f} steps/s")
            self.last_line = now

    def rate(self) -> float:
        return self.steps / max(time.perf_counter() - self.started, 1e-9)

    def summary(self, steps_done: int) -> str:
        """``trained 8 steps in 0.1 s (80.0 steps/s); 2 epochs done; mean loss of the last epoch 0.4123``."""
        seconds = time.perf_counter() - self.started
        epochs_done = steps_done / max(1, self.steps_per_epoch)
        shown = f"{epochs_done:.0f} epoch{'s' if round(epochs_done) != 1 else ''}" \
            if epochs_done == int(epochs_done) else f"{epochs_done:.2f} epochs"
        resumed = f", continuing from step {self.start_step}" if self.start_step else ""
        loss = f"; mean loss of the last epoch {self.last_loss:.4f}" if self.last_loss == self.last_loss else ""
        return (f"trained {self.steps} steps in {seconds:.1f} s ({self.rate():.1f} steps/s){resumed}; {shown} "
                f"done{loss}")

    def close(self, steps_done: int) -> None:
        """Clear the bar and leave the summary line."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        say(self.summary(steps_done))
