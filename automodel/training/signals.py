"""Stopping a run on purpose: SIGTERM (preemption, ``scancel``, ``kill``) and fatal conditions."""

from __future__ import annotations

import signal
import threading
from typing import Self

from automodel.training.guards import NonFiniteGuard

# 128 + SIGTERM, what a shell reports for a process killed by SIGTERM: a scheduler or a script
# sees a run that was stopped, not one that finished, and can requeue it.
SIGTERM_EXIT_CODE = 143


class StopOnSigterm:
    """Turns SIGTERM into a request the loop honours at the end of the current step.

    Use as a context manager around the loop: the previous handler comes back on exit. Outside the
    main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def stop_reason(sigterm: StopOnSigterm, guard: NonFiniteGuard) -> tuple[str, int] | None:
    """Why the run must stop after this step, as (message, exit code), or None."""
    if sigterm.requested:
        return "SIGTERM received", SIGTERM_EXIT_CODE
    if guard.exhausted:
        why = (
            f"{guard.consecutive} steps in a row had a non-finite loss or grad norm "
            "(lower optimizer.lr, check the data or precision.autocast)"
        )
        return why, 1
    return None
