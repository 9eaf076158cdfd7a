"""``--nproc-per-node N``: re-running the same command as N ranks under torch's elastic agent."""

from __future__ import annotations

import os
import signal

# How long the ranks get to finish their step and checkpoint after SIGTERM or SIGINT before the
# agent kills them (torch's own default is 30 s, short for a multi-gigabyte checkpoint). The same
# wait applies to the other ranks when one fails: they may be stuck in a collective meanwhile.
SHUTDOWN_TIMEOUT_S = 120


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(nproc: int, args: list[str]) -> int:
    """Runs ``python -m automodel ARGS`` as ``nproc`` local processes, as torchrun would.

    This process is the agent (torchrun's, run in-process): each rank leads a process group of
    its own, so a signal sent to this command's group (Ctrl-C, ``timeout``, a scheduler) reaches
    the agent, which passes it to every rank and its loader workers; the ranks checkpoint and
    stop at the same step. The agent's own stop is reported as an exit code, not a traceback.

    Args:
        nproc: processes on this node.
        args: the command line without ``--nproc-per-node``.

    Returns:
        0; 128 + the signal after SIGTERM or SIGINT (as a single process exits); else the first
        failed rank's exit code (its error was printed by the rank).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    # One BLAS thread per process unless the user chose: N processes already share the cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    timeout = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    torchrun_args = parse_args(
        [
            "--standalone",
            f"--nproc-per-node={nproc}",
            f"--shutdown-timeout={timeout}",
            "--signals-to-handle=SIGTERM,SIGINT",
            "-m",
            "automodel",
            *args,
        ]
    )
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        run(torchrun_args)
    except SignalException as e:
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return 128 - code if code < 0 else code  # killed by a signal: as a shell reports it
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return 0
