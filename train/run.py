"""The parts of a training run that the loop (``train.train``) calls, each short: ``Run`` for one
stage in one workdir; ``train.sweep.SweepRun`` gives the same parts for N vmapped members.

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
    models,
    parallel,
    pin,
    progress,
    selection,
    steps,
    validate,
)
from train.addon_tasks import addon_task
from train.data import input_pipeline
from train.errors import UserError
from train.tasks import attention_task, backbone_task, evaluate

ELAPSED = (
    "elapsed.json"  # training time and code of the processes before this one, at their last save
)


class Run:
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

    def _log_sizes(self, trainable: int, frozen: int):
        data = self.data
        on_test = self.config.dataset.validation == "test"
        on_test = " (validation = the test split)" if on_test else ""
        progress.log(
            f"[{self.label}] trainable parameters: {trainable:,}; frozen: {frozen:,}; "
            f"train/val/test: {len(data.train)}/{len(data.validation)}/{len(data.test)}{on_test}"
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

    def resume(self):
        """Restores the latest checkpoint, and the within-epoch one if it is later."""
        config, path = self.config, self.path
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
            self.mid, "within-epoch checkpoint in this workdir", within_epoch=True
        )
        if restored:
            self.epoch_start = {"sums": restored["sums"], "skipped": restored["skipped"]}
            self.resume_at = self.step_count() - self.meta["epoch"] * self.steps_per_epoch
            progress.log(
                f"[{self.label}] resumed within epoch {self.meta['epoch'] + 1} at its step "
                f"{self.resume_at} (step {self.step_count()})"
            )
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

    def _restore_newest_good(self, manager, what: str, within_epoch: bool = False):
        """Restores the newest undamaged step of ``manager`` (a damaged one is said in one line
        and set aside as ``<step>.damaged``); returns what was restored, or None if none is
        left."""
        for step in sorted(manager.all_steps(), reverse=True):
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
            target |= _epoch_arrays(self.epoch_start)
        step = manager.latest_step() if step is None else step
        restored = checkpoints.restore(manager, step, target, what)
        self.state, self.meta = restored["state"], self.meta_values(restored["meta"])
        return restored

    def _save(self, manager, step: int, tree: dict):
        """A checkpoint, and the training time up to it (``results.json``'s ``wall_time_s``
        counts every process that trained this workdir, up to its last save)."""
        checkpoints.save(manager, step, tree)
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
            progress.write_text(self.path / "config.json", config.to_json_best_effort(indent=2))
        self.skip = config.on_nonfinite == "skip"
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
                if self.mid.latest_step() != self.step_count():
                    self._save_mid(sums, skipped_before)
                self.writer.close()
                stop.exit(config.stage, self.step_count())
            self.state, metrics = self.step_fn(self.state, self.task.frozen, *args)
            del args
            if self.first_step_s is None:  # compiled and run: the time a user waits for it
                jax.block_until_ready(metrics["loss"])
                self.first_step_s = time.time() - self.start_time
                self.report_compiles()
                progress.log(
                    f"[{self.label}] time to the first training step: {self.first_step_s:.1f} s"
                )
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
        epoch_now = _epoch_arrays({"sums": sums, "skipped": skipped_before})
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
            self._save(self.ckpt, meta["epoch"], saved)

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
        val = (
            evaluate(self.task, steps.variables(state), self.data.validation,
                     config.eval_batch_size)
            if len(self.data.validation)
            else {"accuracy": means["accuracy"], "loss": means["loss"]}
        )  # fmt: skip
        meta["epoch"] += 1
        improved = selection.update(meta, val, self.recipe.monitor, self.recipe.patience)
        if selection.keeps(self.recipe.restore, improved):
            checkpoints.save(self.bests[0], meta["epoch"], {"variables": steps.variables(state)})
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
        return f", early stop at epoch {stop_at} ({eta}) unless val_acc improves"

    def wall_time(self) -> dict:
        """Training time of every process that trained this workdir, up to now, and each one's
        code (a rerun of a finished run adds nothing); recorded for the next rerun."""
        return self._write_elapsed(trained=bool(self.epoch_times) or self.step_count() == 0)

    def finish(self) -> tuple[dict, dict]:
        """Evaluates the best variables on the test split and writes results.json."""
        config, task, state, meta = self.config, self.task, self.state, self.meta
        best = self.bests[0]
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
                self.recipe.monitor,
                self.recipe.restore,
                meta["best_val"],
                config.dataset.validation,
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
        progress.write_text(self.path / "results.json", json.dumps(results, indent=2))
        line = f"[{config.stage}] test accuracy {results['test_accuracy']:.4f}"
        if config.dataset.validation == "test":
            line += " (selected on the test set: not a held-out figure)"
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


def _epoch_arrays(epoch_state: dict) -> dict:
    """The running sums and skip count of an epoch in progress, as checkpointable arrays."""
    return {
        "sums": {k: np.asarray(v, np.float32) for k, v in epoch_state["sums"].items()},
        "skipped": np.asarray(epoch_state["skipped"], np.int32),
    }
