"""``train_and_evaluate``: both training stages on one code path.

stage='backbone'   trains the backbone from scratch (all its parameters).
stage='attention'  loads a frozen backbone and trains only GAttANet's attention tree; the
                   optimizer never sees the backbone's variables.
stage='both'       the first into <workdir>/backbone, then the second into <workdir>/attention.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import ml_collections
import numpy as np
import optax

from gattanet_jax import count_params, site_alphas
from train import (
    checkpoints,
    defaults,
    guards,
    input_pipeline,
    models,
    parallel,
    progress,
    steps,
    sweep,
    validate,
)
from train.addon_tasks import addon_task
from train.errors import UserError
from train.tasks import attention_task, backbone_task, evaluate


def train_stage(config, workdir: str) -> tuple[dict, dict]:
    """Trains one stage in ``workdir``, resuming from its latest checkpoint if there is one.
    SIGTERM and SIGINT save the run at the next step boundary and exit (128 + the signal)."""
    with progress.Preemption() as stop:
        return _train_stage(config, workdir, stop)


def _train_stage(config, workdir: str, stop: progress.Preemption) -> tuple[dict, dict]:
    run = _Run(config, workdir)
    run.resume()
    run.prepare()
    while not run.meta["done"] and run.meta["epoch"] < run.recipe.num_epochs:
        t0 = time.time()
        sums, skipped = run.train_epoch(stop)
        run.end_epoch(sums, skipped, t0)
    if run.meta["done"]:
        progress.log(
            f"[{config.stage}] early stopping: no better validation accuracy for "
            f"{run.recipe.patience} epochs"
        )
    run.writer.close()
    return _finish(
        config, run.task, run.state, run.data, run.best, run.path, run.meta, run.start_time
    )


_FRESH_EPOCH = {"sums": {"loss": 0.0, "accuracy": 0.0}, "skipped": None}


class _Run:
    """One stage in one workdir: what the loop reads and updates (task, data, state, the
    early-stopping record ``meta``, the checkpoint managers) and its parts, each short."""

    def __init__(self, config, workdir: str):
        self.start_time = time.time()
        self.config = config
        self.place = place = parallel.placement(config)
        parallel.check_batch_sizes(config, place)
        self.path = validate.prepare_workdir(workdir)
        backbone = models.build_backbone(config)
        if config.stage == "attention":  # site names and d are checked before any data is read
            models.attention_from_shapes(config, backbone)
        self.seed_key = jax.random.key(config.seed)
        make_task = {"backbone": backbone_task, "attention": attention_task, "addon": addon_task}
        # reads the backbone's weights (if any) before the data: a wrong file fails fast
        task = make_task[config.stage](config, backbone, jax.random.fold_in(self.seed_key, 0))
        data = input_pipeline.load(config, models.image_shape(config))
        self.recipe = task.recipe
        self.steps_per_epoch = len(data.train) // self.recipe.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"batch size {self.recipe.batch_size} exceeds the {len(data.train)} training "
                "examples"
            )
        self.tx = task.tx or optax.adam(self.recipe.learning_rate, eps=1e-7)  # Keras' defaults
        self.task = dataclasses.replace(task, frozen=place.replicate(task.frozen), place=place)
        if isinstance(data.validation, input_pipeline.Split):  # evaluated from device memory
            data = dataclasses.replace(
                data,
                validation=input_pipeline.Split(
                    *place.replicate(dataclasses.astuple(data.validation))
                ),
                test=input_pipeline.Split(*place.replicate(dataclasses.astuple(data.test))),
            )
        self.data = data
        self.state = place.replicate(steps.init_state(task.params, self.tx, task.extra))
        self.meta = {"epoch": 0, "best_val": -1.0, "bad_epochs": 0, "done": False}
        progress.log(
            f"[{config.stage}] trainable parameters: {count_params(task.params):,}; frozen: "
            f"{count_params(task.frozen):,}; "
            f"train/val/test: {len(data.train)}/{len(data.validation)}/{len(data.test)}"
        )

    def resume(self):
        """Restores the latest checkpoint, and the within-epoch one if it is later."""
        config, path = self.config, self.path
        self.ckpt = checkpoints.manager(path / "checkpoints", keep=config.keep_checkpoints)
        self.best = checkpoints.manager(path / "best", keep=1)
        if self.ckpt.latest_step() is not None:
            self._restore(self.ckpt, "checkpoint in this workdir")
            progress.log(
                f"[{config.stage}] resumed from epoch {self.meta['epoch']} "
                f"(step {int(self.state['step'])})"
            )
        # Within an epoch (config.checkpoint_every_steps): a later state than the epoch's start,
        # with the epoch's running sums, so that a resumed epoch ends exactly as an uninterrupted
        # one (also where a SIGTERM or SIGINT saves the run at a step boundary).
        has_mid = config.checkpoint_every_steps or (path / "checkpoints_mid").is_dir()
        self.mid = checkpoints.manager(path / "checkpoints_mid", keep=1) if has_mid else None
        self.epoch_start = {**_FRESH_EPOCH, "skipped": int(self.state["skipped"])}
        self.resume_at = 0
        if self.mid is not None and (self.mid.latest_step() or -1) > int(self.state["step"]):
            restored = self._restore(self.mid, "within-epoch checkpoint in this workdir", True)
            self.epoch_start = {"sums": restored["sums"], "skipped": int(restored["skipped"])}
            self.resume_at = int(self.state["step"]) - self.meta["epoch"] * self.steps_per_epoch
            progress.log(
                f"[{config.stage}] resumed within epoch {self.meta['epoch'] + 1} at its step "
                f"{self.resume_at} (step {int(self.state['step'])})"
            )
        # A crash between a best/ save and the periodic save of the same epoch leaves best/
        # ahead of the state resumed from (or started afresh); the deterministic replay writes
        # it again.
        for ahead in [s for s in self.best.all_steps() if s > self.meta["epoch"]]:
            self.best.delete(ahead)
            progress.log(
                f"[{config.stage}] removed best/{ahead}: written after the last complete checkpoint"
            )

    def _restore(self, manager, what: str, within_epoch: bool = False) -> dict:
        target = {"state": self.state, "meta": progress.meta_arrays(self.meta)}
        if within_epoch:
            target |= _epoch_arrays(self.epoch_start)
        restored = checkpoints.restore(manager, manager.latest_step(), target, what)
        self.state, self.meta = restored["state"], progress.meta_values(restored["meta"])
        return restored

    def prepare(self):
        """The alpha-zero guard, config.json, the compiled step, the batches and the logs."""
        config, task, data = self.config, self.task, self.data
        if int(self.state["step"]) == 0:
            probe = data.validation if len(data.validation) else data.test
            guards.check_alpha_zero_is_backbone(
                task,
                steps.variables(self.state),
                input_pipeline.head(probe, config.eval_batch_size),
                config.model.dtype,
            )
        # Written only once the workdir's checkpoints are known to fit this config.
        progress.write_text(self.path / "config.json", config.to_json_best_effort(indent=2))
        self.skip = config.on_nonfinite == "skip"
        in_memory = isinstance(data.train, input_pipeline.Split)
        batch, augment = self.recipe.batch_size, self.recipe.augment
        self.step_fn = self.place.compile(
            functools.partial(
                steps.train_step,
                task.loss_fn,
                self.tx,
                augment and in_memory,  # streamed data is augmented on the host
                batch,
                self.seed_key,
                skip_nonfinite=self.skip,
            ),
            donate_state=True,
        )
        self.batches = steps.Batches(
            data.train, self.place, self.seed_key, config.seed, batch, augment
        )
        self.writer = progress.Writer(self.path)
        self.step_log = progress.StepLog(
            config.stage, self.steps_per_epoch, self.recipe.num_epochs, self.writer,
            config.log_every_steps,
        )  # fmt: skip
        self.epoch_times = []

    def train_epoch(self, stop: progress.Preemption) -> tuple[dict, int]:
        """The epoch's steps (from where a resumed epoch stopped); returns the summed loss and
        accuracy and the number of skipped updates."""
        config, epoch, every = self.config, self.meta["epoch"], self.config.checkpoint_every_steps
        sums, skipped_before = self.epoch_start["sums"], self.epoch_start["skipped"]
        if skipped_before is None:  # a fresh epoch: skips counted from here
            skipped_before = int(self.state["skipped"])
        self.step_log.start_epoch(self.resume_at)
        first_step, finite = int(self.state["step"]), []
        steps_left = range(self.resume_at, self.steps_per_epoch)
        for i, args in zip(steps_left, self.batches.epoch(epoch, self.resume_at), strict=False):
            if stop.signum is not None:  # preempted: save here, exit; a rerun resumes here
                if not self.skip:
                    _check_finite(finite, first_step, epoch, self.ckpt)
                self.mid = self.mid or checkpoints.manager(self.path / "checkpoints_mid", keep=1)
                if self.mid.latest_step() != int(self.state["step"]):
                    self._save_mid(sums, skipped_before)
                self.writer.close()
                stop.exit(config.stage, int(self.state["step"]))
            self.state, metrics = self.step_fn(self.state, self.task.frozen, *args)
            del args
            sums = {k: sums[k] + metrics[k] for k in sums}
            finite.append(metrics["finite"])  # read back only at the checks: no sync per step
            at_mid = bool(every) and (i + 1) % every == 0 and i + 1 < self.steps_per_epoch
            last = i + 1 == self.steps_per_epoch
            if not self.skip and ((i + 1) % config.log_every_steps == 0 or last or at_mid):
                _check_finite(finite, first_step, epoch, self.ckpt)
            if at_mid:
                self._save_mid(sums, skipped_before)
            if self.step_log.due(i):
                skipped_now = int(self.state["skipped"]) - skipped_before
                self.step_log.report(epoch, i, int(self.state["step"]), sums, skipped_now)
        self.resume_at, self.epoch_start = 0, _FRESH_EPOCH
        skipped = int(self.state["skipped"]) - skipped_before
        if skipped == self.steps_per_epoch:
            _check_finite(finite, first_step, epoch, self.ckpt, every=True)
        return sums, skipped

    def _save_mid(self, sums: dict, skipped_before: int):
        saved = {"state": self.state, "meta": progress.meta_arrays(self.meta)}
        epoch_now = _epoch_arrays({"sums": sums, "skipped": skipped_before})
        checkpoints.save(self.mid, int(self.state["step"]), saved | epoch_now)

    def end_epoch(self, sums: dict, skipped: int, t0: float):
        """Validation, the best checkpoint, early stopping, the periodic checkpoint, the log."""
        config, meta, state, n = self.config, self.meta, self.state, self.steps_per_epoch
        sums = {k: float(v) / (n - skipped) for k, v in sums.items()}
        val = (
            evaluate(self.task, steps.variables(state), self.data.validation,
                     config.eval_batch_size)
            if len(self.data.validation)
            else {"accuracy": sums["accuracy"], "loss": sums["loss"]}
        )  # fmt: skip
        meta["epoch"] += 1
        improved = val["accuracy"] > meta["best_val"]
        if improved:
            meta["best_val"], meta["bad_epochs"] = val["accuracy"], 0
            checkpoints.save(self.best, meta["epoch"], {"variables": steps.variables(state)})
        else:
            meta["bad_epochs"] += 1
        meta["done"] = meta["done"] or meta["bad_epochs"] >= self.recipe.patience
        self.epoch_times.append(time.time() - t0)
        num_epochs = self.recipe.num_epochs
        if (
            meta["done"]
            or meta["epoch"] % config.checkpoint_every_epochs == 0
            or (meta["epoch"] == num_epochs)
        ):
            saved = {"state": state, "meta": progress.meta_arrays(meta)}
            checkpoints.save(self.ckpt, meta["epoch"], saved)
        remaining = (num_epochs - meta["epoch"]) * float(np.mean(self.epoch_times[-5:]))
        rate = n / self.epoch_times[-1]
        progress.log(
            f"[{config.stage}] epoch {meta['epoch']}/{num_epochs} "
            f"loss {sums['loss']:.4f} acc {sums['accuracy']:.4f} val_acc {val['accuracy']:.4f}"
            f"{' *' if improved else ''} | {rate:.1f} steps/s, "
            f"ETA {progress.duration(remaining)} (at most)"
            + (f" | skipped {skipped} non-finite updates" if skipped else ""),
            flush=True,
        )
        self.writer.scalars(
            int(state["step"]),
            {
                "train/loss": sums["loss"],
                "train/accuracy": sums["accuracy"],
                "val/accuracy": val["accuracy"],
                "val/loss": val["loss"],
                "steps_per_s": rate,
            },
        )


def _epoch_arrays(epoch_state: dict) -> dict:
    """The running sums and skip count of an epoch in progress, as checkpointable arrays."""
    return {
        "sums": {k: np.asarray(v, np.float32) for k, v in epoch_state["sums"].items()},
        "skipped": np.asarray(epoch_state["skipped"], np.int32),
    }


def _finish(config, task, state, data, best, path, meta, start_time):
    """Evaluates the best variables on the test split and writes results.json."""
    guards.check_backbone_unchanged(task)
    best_vars = checkpoints.restore(
        best, best.latest_step(), {"variables": steps.variables(state)}, "best checkpoint"
    )
    variables = best_vars["variables"]
    params = variables["params"]
    test = evaluate(task, variables, data.test, config.eval_batch_size)
    results = {
        "stage": config.stage,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "best_validation_accuracy": meta["best_val"],
        "best_epoch": best.latest_step(),
        "epochs": meta["epoch"],
        "steps": int(state["step"]),
        "skipped_updates": int(state["skipped"]),
        "early_stopped": bool(meta["done"]),
        "trainable_params": count_params(params),
        "frozen_params": count_params(task.frozen),
        "wall_time_s": round(time.time() - start_time, 1),
        "environment": progress.environment(),
    }
    if task.baseline_logits_fn is not None:
        base = evaluate(task, variables, data.test, config.eval_batch_size, task.baseline_logits_fn)
        results["backbone_test_accuracy"] = base["accuracy"]
        results["backbone_test_loss"] = base["loss"]
        if task.stage == "attention":
            finetuned = config.attention_training.finetune_backbone
            att_params = params["attention"] if finetuned else params
            results["alpha"] = {
                k: np.asarray(v).tolist() for k, v in site_alphas(att_params).items()
            }
        where, step, _ = task.backbone_source
        results["backbone_checkpoint"] = where if step is None else f"{where}/{step}"
        results["backbone_checkpoint_sha256"] = task.backbone_source[2]
    progress.write_text(path / "results.json", json.dumps(results, indent=2))
    line = f"[{config.stage}] test accuracy {results['test_accuracy']:.4f}"
    if "backbone_test_accuracy" in results:
        line += f" (frozen backbone alone: {results['backbone_test_accuracy']:.4f})"
    progress.log(line + f"; results in {path / 'results.json'}", flush=True)
    return {"params": params, "variables": variables, "state": state}, results


def _check_finite(finite: list, first_step: int, epoch: int, ckpt, every=False) -> None:
    """Stops at the first non-finite loss or gradient, naming its step; nothing is saved.
    ``every``: the skip mode's stop, when every update of an epoch was skipped."""
    flags = np.asarray(jax.device_get(finite))
    if flags.all():
        return
    step = first_step + int(np.argmin(flags)) + 1
    last = ckpt.latest_step()
    where = f"{ckpt.directory}/{last}" if last is not None else "none yet"
    what = (
        f"every update of epoch {epoch + 1} was non-finite and skipped (from step {step})"
        if every
        else f"non-finite loss or gradient at step {step} (epoch {epoch + 1})"
    )
    raise UserError(
        f"{what}; stopped without saving anything from this epoch; last good checkpoint: {where}"
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    """Runs ``config.stage`` in ``workdir``; returns (final state, metrics)."""
    config = defaults.complete(config)
    validate.check_config(config)
    parallel.initialize(config)
    if sweep.size(config):
        return sweep.train_sweep(config, workdir)
    if config.stage != "both":
        return train_stage(config, workdir)
    backbone_dir = os.path.join(workdir, "backbone")
    first = ml_collections.ConfigDict(config.to_dict())
    first.stage = "backbone"
    second = ml_collections.ConfigDict(config.to_dict())
    second.stage = "attention"
    second.backbone_checkpoint = backbone_dir
    _, backbone_results = train_stage(first, backbone_dir)
    state, results = train_stage(second, os.path.join(workdir, "attention"))
    results = dict(results, backbone_stage=backbone_results)
    progress.log(
        f"backbone test accuracy {backbone_results['test_accuracy']:.4f} -> with GAttANet "
        f"{results['test_accuracy']:.4f}"
    )
    return state, results
