"""``python tests/kill_during_save.py DIR N <train.main flags>``: runs train.main, and in the middle
of writing the Nth checkpoint under a directory named DIR ('checkpoints' or 'best') truncates the
largest file written so far and SIGKILLs the process before orbax can finalize the step."""

import os
import runpy
import signal
import sys
from pathlib import Path

import orbax.checkpoint as ocp

target, n, args = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
original = ocp.StandardCheckpointHandler.async_save
seen = 0


async def async_save(self, directory, *a, **k):
    global seen
    futures = await original(self, directory, *a, **k)
    if Path(directory).parent.parent.name == target:
        seen += 1
        if seen == n:
            for f in futures or []:
                f.result()
            files = [p for p in Path(directory).rglob("*") if p.is_file()]
            largest = max(files, key=lambda p: p.stat().st_size)
            with open(largest, "r+b") as f:
                f.truncate(largest.stat().st_size // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    return futures


ocp.StandardCheckpointHandler.async_save = async_save
sys.argv = ["train.main", *args]
runpy.run_module("train.main", run_name="__main__")
