"""The parts of a training run that the loop (``train.train``) calls, each short: ``Run`` for one
stage in one workdir; ``train.sweep.SweepRun`` gives the same parts for N members in one step.

A run's counters and running sums are scalars, a sweep's one value per member; the parts below
treat both alike (numpy arrays of shape () or (N,)).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import numpy as np
import optax

from gattanet_jax import count_params, site_alphas
from train import (
    checkpoints,
    compilation,
    guards,
    history,
    models,
    parallel,
    pin,
    progress,
    selection,
    signals,
    steps,
    validate,
)
from train.addon_tasks import addon_task
from train.data import input_pipeline
from train.errors import UserError
from train.tasks import attention_task, backbone_task, evaluate
from train.workdir import WorkdirParts, check_record, epoch_arrays


class Run(WorkdirParts):
    """One stage in one workdir: what the loop reads and updates (task, data, state, the
    early-stopping record ``meta``, the checkpoint managers) and its parts."""

    label = None  # the progress lines' tag (default: the stage)

    def __init__(self, config, workdir: str, compiles: compilation.CompileLog | None = None):
        self.start_time = time.time()
        self.compiles = compiles or compilation.CompileLog()  # (inactive: records nothing)
        self.config = config
        self.label = self.label or config.stage
        self.place = place = parallel.placement(config)
        parallel.check_batch_sizes(config, place)
        self.path = validate.prepare_workdir(workdir)
        self.config_changes = pin.check(config, self.path)  # a refusal before any work
        backbone = models.build_backbone(config)
        if config.stage == "attention":  # site names and d are checked before any data is read
            models.attention_from_shapes(config, backbone)
        self.seed_key = jax.random.key(config.seed)
        make_task = {"backbone": backbone_task, "attention": attention_task, "addon": addon_task}
        # reads the backbone's weights (if any) before the data: a wrong file fails fast
        task = make_task[config.stage](config, backbone, jax.random.fold_in(self.seed_key, 0))
        pin.check_backbone(self.path, task.backbone_source and task.backbone_source[2])
        signals.phase("data")
        self._set_data(task, input_pipeline.load(config, models.image_shape(config)))
        self.tx = task.tx or optax.adam(self.recipe.learning_rate, eps=1e-7)  # Keras' defaults
        self.task = dataclasses.replace(task, frozen=place.replicate(task.frozen), place=place)
        self.state = place.replicate(steps.init_state(task.params, self.tx, task.extra))
        self.meta = {"epoch": 0, "best_val": -1.0, "bad_epochs": 0, "done": False}
        self._log_sizes(count_params(task.params), count_params(task.frozen))

    def _set_data(self, task, data):
        self.recipe = task.recipe
        self.steps_per_epoch = len(data.train) // self.recipe.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(
                f"batch size {self.recipe.batch_size} exceeds the {len(data.train)} training "
                "examples"
            )
        if isinstance(data.validation, input_pipeline.Split):  # evaluated from device memory
            size, put = self.config.eval_batch_size, self.place.replicate
            data = dataclasses.replace(
                data,
                validation=input_pipeline.on_device(data.validation, size, put),
                test=input_pipeline.on_device(data.test, size, put),
            )
        self.data = data
        self.selected_on = selection.selected_on(
            self.config.dataset.validation, len(data.validation)
        )

    def _log_sizes(self, trainable: int, frozen: int):
        data = self.data
        notes = {
            selection.TEST: " (validation = the test split)",
            selection.TRAINING: " (no validation split: epochs are selected on the training data)",
        }.get(self.selected_on, "")
        if quality := self.config.dataset.jpeg_quality:
            notes += f" (images re-encoded as JPEG at quality {quality})"
        progress.log(
            f"[{self.label}] trainable parameters: {trainable:,}; frozen: {frozen:,}; "
            f"train/val/test: {len(data.train)}/{len(data.validation)}/{len(data.test)}{notes}"
        )

    # --- what differs between a run and a sweep ---------------------------------------------

    def stopped(self) -> bool:
        """Early stopping has ended the run (every member of a sweep)."""
        return bool(np.all(self.meta["done"]))

    def meta_arrays(self, meta: dict) -> dict:
        return progress.meta_arrays(meta)

    def meta_values(self, arrays: dict) -> dict:
        return progress.meta_values(arrays)

    def fresh_sums(self) -> dict:
        """The running sums of an epoch before its first step."""
        return {"loss": 0.0, "accuracy": 0.0}

    def best_managers(self) -> list:
        return [checkpoints.manager(self.path / "best", keep=1)]

    def check_alpha_zero(self, images):
        guards.check_alpha_zero_is_backbone(
            self.task, steps.variables(self.state), images, self.config.model.dtype
        )

    def compile_step(self):
        """The compiled ``(state, frozen, *batch arguments) -> (state, metrics)``."""
        in_memory = isinstance(self.data.train, input_pipeline.Split)
        return self.place.compile(
            functools.partial(
                steps.train_step,
                self.task.loss_fn,
                self.tx,
                self.recipe.augment and in_memory,  # streamed data is augmented on the host
                self.recipe.batch_size,
                self.seed_key,
                skip_nonfinite=self.skip,
            ),
            donate_state=True,
        )

    def batches(self):
        config = self.config
        return steps.Batches(
            self.data.train, self.place, self.seed_key, config.seed, self.recipe.batch_size,
            self.recipe.augment,
        )  # fmt: skip

    # --- the parts the loop calls ------------------------------------------------------------

    def step_count(self) -> int:
        return int(np.max(self.state["step"]))

    def skipped_count(self) -> np.ndarray:
        return np.asarray(jax.device_get(self.state["skipped"]))

    def report_compiles(self):
        """A line for each compilation since the last report (and the small ones together)."""
        for line in self.compiles.new_lines():
            progress.log(f"[{self.label}] {line}")

    def prepare(self):
        """The alpha-zero guard, config.json, the compiled step, the batches and the logs."""
        config, data = self.config, self.data
        if self.step_count() == 0:
            probe = data.validation if len(data.validation) else data.test
            self.check_alpha_zero(probe.head(config.eval_batch_size))  # uint8, model-sized
        # The run's config: written by the process that starts it (pinned once it has saved a
        # checkpoint); a later process's safe changes go to its own record.
        if not pin.started(self.path):
            pin.record_config(self.path, config)
        self.skip = config.on_nonfinite == "skip"
        history.keep_until(self.path, int(np.max(self.meta["epoch"])))
        self.step_fn = self.compile_step()
        self.batch_args = self.batches()
        self.writer = progress.Writer(self.path)
        self.step_log = progress.StepLog(
            self.label, self.steps_per_epoch, self.recipe.num_epochs, self.writer,
            config.log_every_steps,
        )  # fmt: skip
        self.epoch_times = []
        self.first_step_s = None

    def train_epoch(self, stop: progress.Preemption) -> tuple[dict, np.ndarray]:
        """The epoch's steps (from where a resumed epoch stopped); returns the summed loss and
        accuracy and the number of skipped updates."""
        config, epoch, every = self.config, self.meta["epoch"], self.config.checkpoint_every_steps
        sums, skipped_before = self.epoch_start["sums"], self.epoch_start["skipped"]
        self.step_log.start_epoch(self.resume_at)
        first_step, finite = self.step_count(), []
        steps_left = range(self.resume_at, self.steps_per_epoch)
        self.steps_this_epoch = len(steps_left)  # fewer than an epoch's when resumed within it
        for i, args in zip(steps_left, self.batch_args.epoch(epoch, self.resume_at), strict=False):
            if stop.signum is not None:  # preempted: save here, exit; a rerun resumes here
                if not self.skip:
                    guards.check_finite(finite, first_step, epoch, self.ckpt)
                self.mid = self.mid or checkpoints.manager(self.path / "checkpoints_mid", keep=1)
                if self.step_count() > self.saved_step:  # (nothing new: nothing to save)
                    self._save_mid(sums, skipped_before)
                self.writer.close()
                stop.exit(config.stage, self.step_count())
            if self.first_step_s is None:
                signals.phase("compile")  # the first call compiles the step, then runs it
            self.state, metrics = self.step_fn(self.state, self.task.frozen, *args)
            signals.unsaved(True)
            del args
            if self.first_step_s is None:  # compiled and run: the time a user waits for it
                jax.block_until_ready(metrics["loss"])
                self.first_step_s = time.time() - self.start_time
                self.report_compiles()
                progress.log(
                    f"[{self.label}] time to the first training step: {self.first_step_s:.1f} s"
                )
                signals.phase("first_step")
            else:
                signals.phase("step")
            sums = {k: sums[k] + metrics[k] for k in sums}
            finite.append(metrics["finite"])  # read back only at the checks: no sync per step
            at_mid = bool(every) and (i + 1) % every == 0 and i + 1 < self.steps_per_epoch
            last = i + 1 == self.steps_per_epoch
            if not self.skip and ((i + 1) % config.log_every_steps == 0 or last or at_mid):
                guards.check_finite(finite, first_step, epoch, self.ckpt)
            if at_mid:
                self._save_mid(sums, skipped_before)
            if self.step_log.due(i):
                skipped_now = self.skipped_count() - skipped_before
                self.step_log.report(epoch, i, self.step_count(), sums, skipped_now)
        self.resume_at = 0
        self.epoch_start = {"sums": self.fresh_sums(), "skipped": self.skipped_count()}
        skipped = self.skipped_count() - skipped_before
        if np.any(skipped == self.steps_per_epoch):
            guards.check_finite(finite, first_step, epoch, self.ckpt, every=True)
        return sums, skipped

    def _save_mid(self, sums: dict, skipped_before):
        saved = {"state": self.state, "meta": self.meta_arrays(self.meta)}
        epoch_now = epoch_arrays({"sums": sums, "skipped": skipped_before})
        self._save(self.mid, self.step_count(), saved | epoch_now)

    def epoch_means(self, sums: dict, skipped) -> dict:
        """The epoch's mean loss and accuracy over its applied updates."""
        return {k: np.asarray(v, np.float64) / (self.steps_per_epoch - skipped) for k, v in
                sums.items()}  # fmt: skip

    def save_periodic(self):
        """The epoch's checkpoint, if one is due (early stopping, every
        ``checkpoint_every_epochs`` epochs, the last epoch)."""
        meta, num_epochs = self.meta, self.recipe.num_epochs
        if (
            self.stopped()
            or meta["epoch"] % self.config.checkpoint_every_epochs == 0
            or meta["epoch"] == num_epochs
        ):
            saved = {"state": self.state, "meta": self.meta_arrays(meta)}
            self._save(self.ckpt, meta["epoch"], saved, "save_periodic")

    def save_now(self):
        """At a preemption after an epoch's end: its checkpoint, if the schedule did not save
        one."""
        if self.step_count() > self.saved_step:
            saved = {"state": self.state, "meta": self.meta_arrays(self.meta)}
            self._save(self.ckpt, self.meta["epoch"], saved, "save_periodic")

    def timing(self, t0: float) -> tuple[float, str]:
        """Steps/s of the epoch that started at ``t0`` (counting only the steps this process ran
        in a resumed epoch), and the ETA of the run from the median time per step of the last
        five epochs (an epoch slowed by a pause of the process or a busy machine moves it less)."""
        self.epoch_times.append((time.time() - t0, self.steps_this_epoch))
        per_step = [seconds / max(steps_run, 1) for seconds, steps_run in self.epoch_times[-5:]]
        self.epoch_seconds = self.steps_per_epoch * float(np.median(per_step))
        epochs_left = self.recipe.num_epochs - self.meta["epoch"]
        last_s, last_steps = self.epoch_times[-1]
        return last_steps / last_s, progress.duration(float(epochs_left * self.epoch_seconds))

    def end_epoch(self, sums: dict, skipped, t0: float):
        """Validation, the best checkpoint, early stopping, the periodic checkpoint, the log."""
        config, meta, state = self.config, self.meta, self.state
        means = {k: float(v) for k, v in self.epoch_means(sums, skipped).items()}
        signals.phase("eval")
        val = (
            evaluate(self.task, steps.variables(state), self.data.validation,
                     config.eval_batch_size)
            if len(self.data.validation)
            else {"accuracy": means["accuracy"], "loss": means["loss"]}
        )  # fmt: skip
        test = (
            evaluate(self.task, steps.variables(state), self.data.test, config.eval_batch_size)
            if self.recipe.test_each_epoch
            else {}
        )  # recorded for analyses only: never selects
        meta["epoch"] += 1
        improved = selection.update(meta, val, self.recipe.monitor, self.recipe.patience)
        # the epoch's record before its checkpoints: a rerun from an earlier checkpoint drops it
        history.append(self.path, history.record(meta["epoch"], means, val, test))
        if selection.keeps(self.recipe.restore, improved):
            variables = {"variables": steps.variables(state)}
            checkpoints.save(self.bests[0], meta["epoch"], variables, "save_best")
        self.save_periodic()
        rate, eta = self.timing(t0)
        progress.log(
            f"[{self.label}] epoch {meta['epoch']}/{self.recipe.num_epochs} "
            f"loss {means['loss']:.4f} acc {means['accuracy']:.4f} val_acc {val['accuracy']:.4f}"
            + (f" val_loss {val['loss']:.4f}" if self.recipe.monitor == "val_loss" else "")
            + f"{' *' if improved else ''} | {rate:.1f} steps/s, ETA {eta} (at most)"
            + self._early_stop_eta()
            + (f" | skipped {int(skipped)} non-finite updates" if skipped else ""),
            flush=True,
        )
        self.writer.scalars(
            self.step_count(),
            {
                "train/loss": means["loss"],
                "train/accuracy": means["accuracy"],
                "val/accuracy": val["accuracy"],
                "val/loss": val["loss"],
                "steps_per_s": rate,
            },
        )

    def _early_stop_eta(self) -> str:
        """When early stopping comes before the last epoch if validation does not improve."""
        meta, patience = self.meta, self.recipe.patience
        stop_at = meta["epoch"] + patience - meta["bad_epochs"]
        if meta["done"] or stop_at >= self.recipe.num_epochs:
            return ""
        eta = progress.duration((stop_at - meta["epoch"]) * self.epoch_seconds)
        watched = "val_loss" if self.recipe.monitor == "val_loss" else "val_acc"
        return f", early stop at epoch {stop_at} ({eta}) unless {watched} improves"

    def finish(self) -> tuple[dict, dict]:
        """Evaluates the best variables on the test split and writes results.json."""
        config, task, state, meta = self.config, self.task, self.state, self.meta
        best = self.bests[0]
        signals.phase("results")
        guards.check_backbone_unchanged(task)
        best_vars = checkpoints.restore(
            best, best.latest_step(), {"variables": steps.variables(state)}, "best checkpoint"
        )
        variables = best_vars["variables"]
        params = variables["params"]
        test = evaluate(task, variables, self.data.test, config.eval_batch_size)
        results = {
            "stage": config.stage,
            "test_accuracy": test["accuracy"],
            "test_loss": test["loss"],
            **selection.results(
                self.recipe.monitor, self.recipe.restore, meta["best_val"], self.selected_on
            ),
            "best_epoch": best.latest_step(),
            "epochs": meta["epoch"],
            "steps": int(state["step"]),
            "skipped_updates": int(state["skipped"]),
            "early_stopped": bool(meta["done"]),
            "trainable_params": count_params(params),
            "frozen_params": count_params(task.frozen),
            **self.wall_time(),
            "environment": progress.environment(),
        }
        if task.baseline_logits_fn is not None:
            results |= _baseline_results(config, task, variables, self.data.test)
        signals.phase("results")
        check_record(self.path / "results.json", results)  # a rerun never replaces a record
        progress.write_text(self.path / "results.json", json.dumps(results, indent=2))
        line = f"[{config.stage}] test accuracy {results['test_accuracy']:.4f}"
        if self.selected_on in selection.CAVEATS:
            line += f" ({selection.CAVEATS[self.selected_on]})"
        if "backbone_test_accuracy" in results:
            line += f" (frozen backbone alone: {results['backbone_test_accuracy']:.4f})"
        progress.log(line + f"; results in {self.path / 'results.json'}", flush=True)
        return {"params": params, "variables": variables, "state": state}, results


def _baseline_results(config, task, variables, test_split) -> dict:
    """The frozen backbone's test accuracy, the trained alphas and the backbone's source."""
    base = evaluate(task, variables, test_split, config.eval_batch_size, task.baseline_logits_fn)
    results = {"backbone_test_accuracy": base["accuracy"], "backbone_test_loss": base["loss"]}
    if task.stage == "attention":
        params = variables["params"]
        att_params = params["attention"] if config.attention_training.finetune_backbone else params
        results["alpha"] = {k: np.asarray(v).tolist() for k, v in site_alphas(att_params).items()}
    where, step, sha = task.backbone_source
    results["backbone_checkpoint"] = where if step is None else f"{where}/{step}"
    results["backbone_checkpoint_sha256"] = sha
    return results
