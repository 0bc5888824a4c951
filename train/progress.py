"""Progress of a training stage: TensorBoard scalars, the resumable counters, durations."""

from __future__ import annotations

import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from train import files, signals


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
        "git_commit": git_commit(),
    }


def git_commit(root: Path | None = None) -> str | None:
    """The commit of the checkout (this code's, by default), with ``+changes`` when tracked
    files differ from it (None outside a git checkout, and where ``root`` is not the top of one:
    a copy of the code inside another repository is not that repository's commit)."""
    root = (root or Path(__file__).resolve().parent.parent).resolve()

    def git(*args):
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        return done.stdout.strip() if done.returncode == 0 else ""

    try:
        top = git("rev-parse", "--show-toplevel")
        if not top or Path(top).resolve() != root:
            return None
        commit = git("rev-parse", "HEAD")
        changed = commit and git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+changes" if changed else "")) or None


def write_text(path: Path, text: str) -> None:
    """Writes a result file, on process 0 only, complete or not at all (``files.write_atomic``)."""
    if is_main():
        files.write_atomic(path, text)


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch: where torch is installed and not
    yet imported, tensorboardX imports it (about a second and a few hundred MB per process) to
    convert torch tensors, and scalars need none of it."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class Writer:
    """TensorBoard event files in the workdir (written by process 0 only)."""

    def __init__(self, path: Path):
        self._writer = None
        if is_main():
            self._writer = _summary_writer()(str(path / "tensorboard"))

    def scalars(self, step: int, values: dict) -> None:
        if self._writer is None:
            return
        for k, v in values.items():
            self._writer.add_scalar(k, float(v), step)
        self._writer.flush()

    def close(self):
        """Flushes and closes the event file (again: nothing). Called on every way out of a
        stage, errors included: left to tensorboardX's exit hook, the close would start a
        thread at interpreter shutdown, which Python 3.12 refuses with a traceback."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


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


class StepLog:
    """Progress lines within an epoch, every ``every`` steps or ``seconds``, whichever comes
    first, printed in any output (a batch scheduler's log too): step, running loss and
    accuracy, steps/s and ETAs; the same running values go to TensorBoard."""

    def __init__(self, stage: str, steps_per_epoch: int, epochs: int, writer, every: int,
                 seconds: float = 30.0):  # fmt: skip
        self.stage, self.steps_per_epoch, self.epochs = stage, steps_per_epoch, epochs
        self.writer, self.every, self.seconds = writer, max(1, every), seconds

    def start_epoch(self, first_index: int) -> None:
        self.t0 = self.last = time.time()
        self.first = first_index

    def due(self, index: int) -> bool:
        last_of_epoch = index + 1 == self.steps_per_epoch  # the epoch line follows
        periodic = (index + 1) % self.every == 0 or time.time() - self.last >= self.seconds
        return periodic and not last_of_epoch

    def report(self, epoch: int, index: int, step: int, sums: dict, skipped: int) -> None:
        now = time.time()
        self.last = now
        done = np.maximum(1, index + 1 - np.asarray(skipped))  # a sweep: the members' means
        loss, acc = (
            float(np.mean(np.asarray(sums[k], np.float64) / done)) for k in ("loss", "accuracy")
        )
        rate = (index + 1 - self.first) / max(now - self.t0, 1e-9)
        epoch_left = (self.steps_per_epoch - index - 1) / rate
        run_left = epoch_left + (self.epochs - epoch - 1) * self.steps_per_epoch / rate
        log(
            f"[{self.stage}] epoch {epoch + 1}/{self.epochs} step {index + 1}/"
            f"{self.steps_per_epoch} loss {loss:.4f} acc {acc:.4f} | {rate:.1f} steps/s, epoch "
            f"ETA {duration(epoch_left)}, run ETA {duration(run_left)} (at most)",
            flush=True,
        )
        self.writer.scalars(
            step, {"train/running_loss": loss, "train/running_accuracy": acc, "steps_per_s": rate}
        )


class Preemption:
    """The training loop's view of SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C)
    (``train.signals``): ``signum`` is a signal kept for the loop, which checkpoints at the next
    step boundary and calls ``exit``. A signal while nothing is unsaved, or a second one, stops
    the process at once in one line. Handlers are installed here where no command installed
    them (in the main thread only)."""

    def __enter__(self):
        self._handled = signals.handled()
        self._handled.__enter__()
        signals.unsaved(False)
        return self

    def __exit__(self, *exc):
        signals.unsaved(False)
        signals.S.pending = None
        return self._handled.__exit__(*exc)

    @property
    def signum(self) -> int | None:
        return signals.pending()

    def exit(self, stage: str, step: int) -> None:
        """Exits once the run's state at ``step`` is in a checkpoint (saved here, or by the
        epoch's own save)."""
        signum = self.signum
        name = signal.Signals(signum).name
        log(
            f"[{stage}] {name}: checkpoint saved at step {step}; rerun the same command to resume",
            flush=True,
        )
        raise SystemExit(128 + signum)
