"""Progress of a training stage: TensorBoard scalars, the resumable counters, durations."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import jax
import numpy as np


def is_main() -> bool:
    """Process 0 writes logs, summaries and result files; every process computes."""
    return jax.process_index() == 0


def log(*args, **kwargs) -> None:
    """print, on process 0 only."""
    if is_main():
        print(*args, **kwargs)


def environment() -> dict:
    """What produced a result: software versions, devices, and the code's git commit (None
    outside a git checkout)."""
    import flax
    import jaxlib
    import optax

    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "device_count": jax.device_count(),
        "process_count": jax.process_count(),
        "git_commit": commit or None,
    }


def write_text(path: Path, text: str) -> None:
    """Writes a result file, on process 0 only."""
    if is_main():
        path.write_text(text)


class Writer:
    """TensorBoard event files in the workdir (written by process 0 only)."""

    def __init__(self, path: Path):
        self._writer = None
        if is_main():
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(path / "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        if self._writer is None:
            return
        for k, v in values.items():
            self._writer.add_scalar(k, float(v), step)
        self._writer.flush()

    def close(self):
        if self._writer is not None:
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
