"""A run's workdir, as the run sees it: resuming from its newest good checkpoint, what a lost
part of it means, saving, and the records of the processes that trained it (``elapsed.json``).

``WorkdirParts`` is the part of ``train.run.Run`` (and so of ``train.sweep.SweepRun``) that
reads and writes the workdir; the run supplies its state, ``meta`` and managers' contents.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from train import checkpoints, progress, signals
from train.errors import UserError

ELAPSED = (
    "elapsed.json"  # training time and code of the processes before this one, at their last save
)


class WorkdirParts:
    """Resume, save and record: the workdir side of a run."""

    def resume(self):
        """Restores the latest checkpoint, and the within-epoch one if it is later."""
        config, path = self.config, self.path
        signals.phase("restore")
        self.ckpt = checkpoints.manager(path / "checkpoints", keep=config.keep_checkpoints)
        self.bests = self.best_managers()
        if self._restore_newest_good(self.ckpt, "checkpoint in this workdir"):
            progress.log(
                f"[{self.label}] resumed from epoch {self.meta['epoch']} (step {self.step_count()})"
            )
        # Within an epoch (config.checkpoint_every_steps): a later state than the epoch's start,
        # with the epoch's running sums, so that a resumed epoch ends exactly as an uninterrupted
        # one (also where a SIGTERM or SIGINT saves the run at a step boundary).
        has_mid = config.checkpoint_every_steps or (path / "checkpoints_mid").is_dir()
        self.mid = checkpoints.manager(path / "checkpoints_mid", keep=1) if has_mid else None
        self.epoch_start = {"sums": self.fresh_sums(), "skipped": self.skipped_count()}
        self.resume_at = 0
        mid_ahead = self.mid is not None and (self.mid.latest_step() or -1) > self.step_count()
        restored = mid_ahead and self._restore_newest_good(
            self.mid, "within-epoch checkpoint in this workdir", True, after=self.step_count()
        )
        if restored:
            self.epoch_start = {"sums": restored["sums"], "skipped": restored["skipped"]}
            self.resume_at = self.step_count() - self.meta["epoch"] * self.steps_per_epoch
            progress.log(
                f"[{self.label}] resumed within epoch {self.meta['epoch'] + 1} at its step "
                f"{self.resume_at} (step {self.step_count()})"
            )
        self.saved_step = self.step_count()  # the state on disk: nothing new to save yet
        self._check_parts()
        # A crash between a best/ save and the periodic save of the same epoch leaves best/
        # ahead of the state resumed from (or started afresh); the deterministic replay writes
        # it again.
        for best in self.bests:
            for ahead in [s for s in best.all_steps() if s > self.meta["epoch"]]:
                best.delete(ahead)
                progress.log(
                    f"[{self.label}] removed {best.directory}/{ahead}: written after the last "
                    "complete checkpoint"
                )
        self.elapsed_before, self.processes_before = (
            _read_elapsed(path) if self.step_count() else (0.0, [])
        )
        self.process = {
            "git_commit": progress.git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.start_time)),
            "from_step": self.step_count(),
        } | ({"config_changes": self.config_changes} if self.config_changes else {})

    def _restore_newest_good(self, manager, what: str, within_epoch: bool = False, after=-1):
        """Restores the newest undamaged step of ``manager`` later than ``after`` (a damaged one
        is said in one line and set aside as ``<step>.damaged``); returns what was restored, or
        None if none is left."""
        for step in sorted((s for s in manager.all_steps() if s > after), reverse=True):
            try:
                return self._restore(manager, what, within_epoch, step)
            except checkpoints.DamagedCheckpoint as e:
                aside = checkpoints.set_aside(manager, step)
                progress.log(f"[{self.label}] {e}; set aside as {aside}; trying the one before")
        return None

    def _check_parts(self):
        """A workdir that lost its periodic checkpoints (after a run that saved some) or its
        best checkpoint is refused with what to do; nothing of it is deleted."""
        path, epoch = self.path, self.meta["epoch"]
        recorded = (path / ELAPSED).is_file() or (path / "results.json").is_file()
        if self.step_count() == 0 and recorded:
            kept = [str(b.directory) for b in self.bests if b.latest_step() is not None]
            kept += [str(path / "results.json")] if (path / "results.json").is_file() else []
            raise UserError(
                f"{path / 'checkpoints'} holds no usable checkpoint, but this run saved some: "
                f"training cannot resume. Kept as they are: {', '.join(kept) or 'nothing else'} "
                f"(the analyses and the attention stage read best/ as it is). To train again, "
                f"use a new workdir with the same command"
            )
        missing = [str(b.directory) for b in self.bests if b.latest_step() is None]
        if epoch > 0 and missing:
            raise UserError(
                f"{missing[0]} is missing or empty, but this run has trained {epoch} epochs: the "
                "best checkpoint cannot be rebuilt from the periodic ones (it holds an earlier "
                "epoch's weights). Rebuild it by training again in a new workdir with the same "
                "command (same seed and data: the same best checkpoint)"
            )

    def _restore(self, manager, what: str, within_epoch: bool = False, step=None) -> dict:
        target = {"state": self.state, "meta": self.meta_arrays(self.meta)}
        if within_epoch:
            target |= epoch_arrays(self.epoch_start)
        step = manager.latest_step() if step is None else step
        restored = checkpoints.restore(manager, step, target, what)
        self.state, self.meta = restored["state"], self.meta_values(restored["meta"])
        return restored

    def _save(self, manager, step: int, tree: dict, what: str = "save_mid"):
        """A full checkpoint of the run's state, and the training time up to it
        (``results.json``'s ``wall_time_s`` counts every process that trained this workdir, up
        to its last save)."""
        checkpoints.save(manager, step, tree, what)
        self.saved_step = self.step_count()
        signals.unsaved(False)
        self._write_elapsed(trained=True)

    def _write_elapsed(self, trained: bool) -> dict:
        """``elapsed.json``: the training time of every process that trained this workdir, and
        each one's code (``processes``: its git commit, start and steps); this process counts
        if it trained."""
        elapsed, processes = self.elapsed_before, list(self.processes_before)
        if trained:
            now = time.time() - self.start_time
            elapsed += now
            processes.append(
                self.process
                | {"to_step": self.step_count(), "wall_time_s": round(now, 1)}
                | self.compile_record()
            )
        record = {"wall_time_s": round(elapsed, 1), "processes": processes}
        progress.write_text(self.path / ELAPSED, json.dumps(record, indent=1))
        return record

    def compile_record(self) -> dict:
        """This process's compilations (totals) and the seconds from its start to the end of
        its first training step."""
        first = getattr(self, "first_step_s", None)
        return {"compile": self.compiles.summary()} | (
            {"first_step_s": round(first, 2)} if first is not None else {}
        )

    def wall_time(self) -> dict:
        """Training time of every process that trained this workdir, up to now, and each one's
        code (a rerun of a finished run adds nothing); recorded for the next rerun."""
        return self._write_elapsed(trained=bool(self.epoch_times) or self.step_count() == 0)


# What a rerun of a finished run may change in its results.json: the record of time and code.
NOT_RESULTS = {"wall_time_s", "processes", "environment", "compile", "first_step_s"}


def check_record(record: Path, results: dict) -> None:
    """Before ``results`` replace ``record`` (a finished run's results.json, rerun or resumed):
    every number it holds, and the backbone's sha256, must be what this process computed
    (counts exactly, other numbers to 1e-6 relative); else a UserError naming both values,
    and the record is kept. A record of fewer steps (the run trained on, with more epochs or
    patience) is kept beside it as ``results.steps<N>.json``; an unreadable one is set aside
    (``results.json.unreadable``)."""
    try:
        old = json.loads(record.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        aside = record.with_name(record.name + ".unreadable")
        record.replace(aside)
        progress.log(f"note: {record} was not readable ({e}): set aside as {aside}")
        return
    if not isinstance(old, dict):
        return
    steps = "steps" if "steps" in results else "steps_per_member"
    if steps in old and old[steps] != results.get(steps):  # trained on: a longer schedule
        aside = record.with_name(f"results.{steps}{old[steps]}.json")
        record.replace(aside)
        progress.log(f"note: the run trained on from the result in {record}: kept as {aside}")
        return
    for field, was, now in _differences(old, results):
        raise UserError(
            f"{record} records {field} = {_shown(was)}, but this run computes {_shown(now)} "
            "from the workdir's checkpoints: the record is kept. If the checkpoints are the ones "
            f"it was computed from, they were damaged; move {record.name} aside to record the "
            "new result"
        )


def _differences(old, new, prefix=""):
    """(field, recorded, computed) for every number (and sha256) both hold that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() & new.keys()):
            if key not in NOT_RESULTS:
                yield from _differences(old[key], new[key], f"{prefix}{key}" if not prefix
                                        else f"{prefix}.{key}")  # fmt: skip
    elif isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            yield prefix, f"{len(old)} entries", f"{len(new)} entries"
            return
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            yield from _differences(a, b, f"{prefix}[{i}]")
    elif isinstance(old, bool) or isinstance(new, bool):
        if old != new:
            yield prefix, old, new
    elif isinstance(old, int | float) and isinstance(new, int | float):
        if not _same_number(old, new):
            yield prefix, old, new
    elif prefix.endswith("sha256") and old != new:
        yield prefix, old, new


def _same_number(a, b) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    a, b = float(a), float(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b)) or a == b


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str) and len(value) > 16:
        return value[:12] + "..."
    return str(value)


def _read_elapsed(path) -> tuple[float, list]:
    """The training time and the processes recorded in the workdir: its ``elapsed.json``, else
    (a workdir from before that file) its ``results.json``'s, else 0 and none (a workdir from
    before the process records has a time and no processes)."""
    for name in (ELAPSED, "results.json"):
        try:
            record = json.loads((path / name).read_text())
            processes = record.get("processes", [])
            return float(record["wall_time_s"]), processes if isinstance(processes, list) else []
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return 0.0, []


def epoch_arrays(epoch_state: dict) -> dict:
    """The running sums and skip count of an epoch in progress, as checkpointable arrays."""
    return {
        "sums": {k: np.asarray(v, np.float32) for k, v in epoch_state["sums"].items()},
        "skipped": np.asarray(epoch_state["skipped"], np.int32),
    }
