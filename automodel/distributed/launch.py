"""``--nproc-per-node N``: re-running the same command under torchrun."""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(nproc: int, args: list[str]) -> int:
    """Runs ``python -m automodel ARGS`` as ``nproc`` local processes through torchrun.

    SIGTERM and SIGINT sent to this process go on to torchrun, which passes them to every rank:
    the ranks checkpoint and stop at the same step.

    Args:
        nproc: processes on this node.
        args: the command line without ``--nproc-per-node``.

    Returns:
        torchrun's exit code, or 143 after a SIGTERM (as a single process exits).
    """
    env = dict(os.environ)
    # One BLAS thread per process unless the user chose: N processes already share the cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "automodel",
        *args,
    ]
    child = subprocess.Popen(cmd, env=env)
    received = []

    def forward(signum, frame):
        received.append(signum)
        child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if signal.SIGTERM in received and code != 0:
        return 128 + signal.SIGTERM
    return code
