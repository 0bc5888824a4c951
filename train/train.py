"""``train_and_evaluate``: both training stages, and vmapped sweeps, on one loop.

stage='backbone'   trains the backbone from scratch (all its parameters).
stage='attention'  loads a frozen backbone and trains only GAttANet's attention tree; the
                   optimizer never sees the backbone's variables.
stage='both'       the first into <workdir>/backbone, then the second into <workdir>/attention.
config.sweep       N members of a stage at once, in one compiled step (``train.sweep``), on the
                   same loop.

The loop is ``_train_stage``; its parts are ``train.run.Run`` (one run) and
``train.sweep.SweepRun`` (a sweep).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import ml_collections

from train import (
    compilation,
    defaults,
    lock,
    parallel,
    precision,
    progress,
    signals,
    sweep,
    validate,
)
from train.errors import UserError
from train.run import Run


def train_stage(config, workdir: str, run_type: type[Run] = Run) -> tuple[dict, dict]:
    """Trains one stage (or a sweep) in ``workdir``, resuming from its latest checkpoint if there
    is one, holding the workdir's lock (``train.lock``). SIGTERM and SIGINT save the run at the
    next step boundary and exit (128 + the signal). A start refused in one line (a missing
    backbone checkpoint, data not prepared) leaves no new, empty workdir behind."""
    made = _folders_to_make(workdir)
    signals.label(f"[{run_type.label or config.stage}] ")
    try:
        with lock.hold(workdir), progress.Preemption() as stop, compilation.timed() as compiles:
            return _train_stage(run_type(config, workdir, compiles), stop)
    except UserError:
        _remove_unused(made)
        raise
    finally:
        signals.label("")


def _folders_to_make(workdir: str) -> list[Path]:
    """The folders of ``workdir``'s path that do not exist yet, deepest first."""
    path, missing = Path(workdir).expanduser().absolute(), []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_unused(made: list[Path]) -> None:
    """Removes the folders this run made, deepest first, while they hold nothing but an empty
    (released) lock file."""
    if not progress.is_main():
        return
    for folder in made:
        try:
            entries = list(folder.iterdir())
            if [e.name for e in entries] == [lock.LOCK] and entries[0].stat().st_size == 0:
                entries[0].unlink()
            folder.rmdir()
        except OSError:
            return  # in use, or not ours to remove


def _train_stage(run: Run, stop: progress.Preemption) -> tuple[dict, dict]:
    try:
        run.resume()
        run.prepare()
        while not run.stopped() and run.meta["epoch"] < run.recipe.num_epochs:
            t0 = time.time()
            sums, skipped = run.train_epoch(stop)
            run.end_epoch(sums, skipped, t0)
            run.report_compiles()
            if stop.signum is not None:  # came during the epoch's evaluation or saves
                run.save_now()
                run.writer.close()
                stop.exit(run.label, run.step_count())
        if run.stopped():
            watched = "loss" if run.recipe.monitor == "val_loss" else "accuracy"
            progress.log(
                f"[{run.label}] early stopping: no better validation {watched} for "
                f"{run.recipe.patience} epochs"
            )
    finally:  # an error too: the event file closed now, not by an exit hook
        if getattr(run, "writer", None) is not None:  # (opened by prepare)
            run.writer.close()
    return run.finish()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Runs ``config.stage`` in ``workdir`` under the config's precision policy
    (``train.precision``); returns (final state, metrics)."""
    config = defaults.complete(config)
    signals.phase("config")
    validate.check_before_work(config)
    if sweep.size(config):
        validate.check_sweep(config)
    parallel.initialize(config)
    parallel.check_batch_sizes(config, parallel.placement(config))  # before the workdir is made
    with precision.scope(config):
        return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    if sweep.size(config):
        return train_stage(config, workdir, sweep.SweepRun)
    if config.stage != "both":
        return train_stage(config, workdir)
    backbone_dir = os.path.join(workdir, "backbone")
    first = ml_collections.ConfigDict(config.to_dict())
    first.stage = "backbone"
    _, backbone_results = train_stage(first, backbone_dir)
    signals.label("")
    signals.phase("switch")
    second = ml_collections.ConfigDict(config.to_dict())
    second.stage = "attention"
    second.backbone_checkpoint = backbone_dir
    signals.phase("switch")
    state, results = train_stage(second, os.path.join(workdir, "attention"))
    results = dict(results, backbone_stage=backbone_results)
    progress.log(
        f"backbone test accuracy {backbone_results['test_accuracy']:.4f} -> with GAttANet "
        f"{results['test_accuracy']:.4f}"
    )
    signals.phase("end")
    return state, results
