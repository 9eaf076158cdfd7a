"""``--nproc-per-node N``: re-running the same command under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(nproc: int, args: list[str]) -> int:
    """Runs ``python -m automodel ARGS`` as ``nproc`` local processes through torchrun.

    Args:
        nproc: processes on this node.
        args: the command line without ``--nproc-per-node``.

    Returns:
        torchrun's exit code.
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
    return subprocess.call(cmd, env=env)
