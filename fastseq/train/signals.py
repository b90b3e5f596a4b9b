"""How a signal ends a run: the handlers (`Signals`), the error that ends it at once
(`Interrupted`) and the held-out collator that stops an evaluation (`StoppableCollator`). The
`fastseq` command installs `Signals` before it imports anything heavy (torch takes seconds), so
a signal at any moment of its start-up is the same one line; this module imports no torch."""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine

SIGNAL_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM", signal.SIGHUP: "SIGHUP"}


class Interrupted(KeyboardInterrupt):
    """A signal that ends the run at once: during start-up (nothing to save yet), or a second
    SIGINT (Ctrl-C pressed again) that will not wait for a checkpoint."""

    def __init__(self, number: int):
        super().__init__(SIGNAL_NAMES[number])
        self.number = number


class StopEvaluation(Exception):
    """A signal arrived during an evaluation: it is dropped, and the run ends with a checkpoint."""


class Signals:
    """SIGINT, SIGTERM (a scheduler's notice before preemption) and SIGHUP (a closed terminal or
    SSH session) end the run after the current step, with a checkpoint (an evaluation stops at its
    next batch). Before training starts there is nothing to save: a signal ends the run at once
    (`Interrupted`), and so does a second SIGINT. The handlers are this run's only while it runs."""

    def __init__(self):
        self.received: int | None = None
        self.training = False  # whether a signal waits for the step to end
        self.sigints = 0
        self._previous = {}

    def __enter__(self):
        for number in SIGNAL_NAMES:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number, frame) -> None:
        # Only a second SIGINT forces the exit: under the `deepspeed` launcher one Ctrl-C reaches a
        # rank as SIGINT from the terminal and SIGTERM from the launcher.
        self.sigints += number == signal.SIGINT
        if not self.training or self.sigints > 1:
            raise Interrupted(number)
        if self.received is None:
            self.received = number

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class StoppableCollator:
    """The held-out collator, asking before each evaluation batch whether a signal ends the run
    (every rank evaluates the same batches, so the ranks agree on it in one small collective)."""

    def __init__(self, collator, signals: Signals, engine: Engine):
        self.collator, self.signals, self.engine = collator, signals, engine

    def __call__(self, examples):
        if self.engine.sum_over_ranks([float(self.signals.received is not None)])[0]:
            raise StopEvaluation
        return self.collator(examples)

    def __getattr__(self, name):
        return getattr(self.collator, name)
