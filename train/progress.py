"""Progress of a training stage: TensorBoard scalars, the resumable counters, durations."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Writer:
    """TensorBoard event files in the workdir (written by process 0 only)."""

    def __init__(self, path: Path):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(path / "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        for k, v in values.items():
            self._writer.add_scalar(k, float(v), step)
        self._writer.flush()

    def close(self):
        self._writer.close()


def meta_arrays(meta):
    return {
        "epoch": np.asarray(meta["epoch"], np.int32),
        "best_val": np.asarray(meta["best_val"], np.float64),
        "bad_epochs": np.asarray(meta["bad_epochs"], np.int32),
        "done": np.asarray(meta["done"], np.int32),
    }


def meta_values(meta):
    return {
        "epoch": int(meta["epoch"]),
        "best_val": float(meta["best_val"]),
        "bad_epochs": int(meta["bad_epochs"]),
        "done": bool(meta["done"]),
    }


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )
