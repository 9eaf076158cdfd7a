"""Stopping a run on purpose: SIGTERM and SIGINT, and fatal conditions.

Slurm's preemption, ``scancel``, ``timeout`` and Ctrl-C signal the whole process group, the data
loader's worker processes included. The main process turns the signal into a request the loop
honours at the end of the current step (it checkpoints, then exits 143 or 130); the workers
ignore both signals (``IgnoreStopSignals``) so that the batches the step still needs keep
coming. They are started with the signals blocked (``workers_starting``): a signal that arrives
while a worker is being created waits for the main process instead of killing the newborn
worker before it could set its handlers.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import signal
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Self

from automodel.training.guards import NonFiniteGuard

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# 128 + the signal, what a shell reports for a process the signal killed: a scheduler or a
# script sees a run that was stopped, not one that finished, and can requeue it.
SIGTERM_EXIT_CODE = 128 + signal.SIGTERM
SIGINT_EXIT_CODE = 128 + signal.SIGINT


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class StopOnSignal:
    """Turns SIGTERM and SIGINT into a request the loop honours at the end of the current step.

    A second SIGINT (Ctrl-C pressed twice) does not wait: it raises ``KeyboardInterrupt``. Use
    as a context manager around the loop: the previous handlers come back on exit. Outside the
    main thread (where Python cannot install handlers) it does nothing.

    Attributes:
        received: the first signal received, or None.
    """

    def __init__(self):
        self.received: signal.Signals | None = None
        self._previous: dict[int, Callable | int | None] = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = signal.Signals(signum)

    def __enter__(self) -> Self:
        if _main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def stop_reason(stop: StopOnSignal, guard: NonFiniteGuard) -> tuple[str, int] | None:
    """Why the run must stop after this step, as (message, exit code), or None."""
    if stop.received is not None:
        code = SIGINT_EXIT_CODE if stop.received == signal.SIGINT else SIGTERM_EXIT_CODE
        return f"{stop.received.name} received", code
    if guard.exhausted:
        why = (
            f"{guard.consecutive} steps in a row had a non-finite loss or grad norm "
            "(lower optimizer.lr, check the data or precision.autocast)"
        )
        return why, 1
    return None


class IgnoreStopSignals:
    """A DataLoader ``worker_init_fn`` that leaves SIGTERM and SIGINT to the main process, then
    runs the config's own ``worker_init_fn`` if any.

    A class rather than a closure so that it pickles for the spawn and forkserver start methods.
    """

    def __init__(self, then: Callable[[int], None] | None = None):
        self.then = then

    def __call__(self, worker_id: int) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        # Started with them blocked (``workers_starting``): ignored from here on, they may
        # be let through.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        if self.then is not None:
            self.then(worker_id)


@contextlib.contextmanager
def workers_starting() -> Iterator[None]:
    """Blocks SIGTERM and SIGINT in the main thread while loader workers start.

    Workers inherit the mask and unblock once they ignore both (``IgnoreStopSignals``); in the
    main process a signal received meanwhile stays pending and is handled on exit. The workers
    started inside are killed at the process's exit if still running (``_kill_workers``).
    """
    before = set(multiprocessing.active_children())
    try:
        if not _main_thread():
            yield
            return
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    finally:
        _track_workers(set(multiprocessing.active_children()) - before)


# Loader workers started by ``workers_starting``, and whether the exit hook is registered.
_workers: weakref.WeakSet = weakref.WeakSet()
_exit_hook_registered = False


def _track_workers(started: set) -> None:
    """Remembers ``started`` and registers, once, the exit hook that kills them.

    At exit, ``multiprocessing`` ends the daemonic processes that a DataLoader iterator still
    alive (in a reference cycle, or a global) left running with SIGTERM, then waits for them:
    workers that ignore SIGTERM would keep the process from ever exiting. Registered once
    workers exist, so after ``multiprocessing``'s own hook, this one runs first (``atexit``
    runs last-in first-out).
    """
    global _exit_hook_registered
    if started and not _exit_hook_registered:
        atexit.register(_kill_workers)
        _exit_hook_registered = True
    _workers.update(started)


def _kill_workers() -> None:
    alive = [worker for worker in _workers if worker.is_alive()]
    if alive and _main_thread():
        # torch's SIGCHLD handler would report each killed worker as a failure.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in alive:
        worker.kill()
