"""Sweeps: N members of one stage trained at once, in one compiled step.

The config's ``sweep`` section lists per-member values; every non-empty list gives one value per
member (or a single value for all), empty lists keep the config's own value:

  sweep.seeds           config.seed per member: initialisation, data order, augmentation and
                        dropout streams
  sweep.learning_rates  the stage recipe's learning_rate per member
  sweep.alpha_inits     attention.alpha_init per member (attention stage)
  sweep.lesions         attention.lesion per member ('' = every site modulated; attention stage)
  sweep.backbones       backbone_checkpoint per member: member i trains on frozen backbone i
                        (attention stage, add-ons to a frozen backbone)

Any stage sweeps: backbones of several seeds (stage 'backbone'), GAttANet and its controls
(stage 'attention'), GALA, SE or GSA (stage 'addon'). d, the architecture and the schedule are
shared. One compiled step runs ``steps.train_step`` for every member (``train.members``: vmapped,
or looped inside the program with ``sweep.layout='loop'``), so member i follows exactly the run of
the plain stage with member i's values (tests/test_sweep.py, tests/test_seeds.py). Each member
keeps its own validation, best checkpoint and early stopping: once a member has not improved for
``patience`` epochs its state stops changing and its best checkpoint is final; the sweep stops
when every member has stopped.

The workdir holds the stacked state in ``checkpoints/`` (resumable like any stage),
``results.json`` and ``sweep.md`` (every member), and ``members/<i>/``: each member as a plain
workdir of its stage (config.json, best/, results.json), which ``--config.backbone_checkpoint``,
``train.compare --backbones`` and ``train.analyze`` take.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gattanet_jax import count_params, site_alphas, sites, two_pass
from train import (
    checkpoints,
    compilation,
    guards,
    models,
    parallel,
    pin,
    progress,
    signals,
    steps,
    validate,
)
from train.addon_tasks import addon_task
from train.data import input_pipeline
from train.errors import UserError
from train.history import append as append_history
from train.history import keep_until as keep_history_until
from train.history import record as history_record
from train.members import MemberBatches, MemberEval, members_step, results_table
from train.run import Run
from train.tasks import attention_loss_fn, attention_task, backbone_task
from train.workdir import check_record

FIELDS = {  # sweep list -> the config field it replaces per member
    "seeds": "seed",
    "learning_rates": "<recipe>.learning_rate",
    "alpha_inits": "attention.alpha_init",
    "lesions": "attention.lesion",
    "backbones": "backbone_checkpoint",
}
MAKE_TASK = {"backbone": backbone_task, "attention": attention_task, "addon": addon_task}


def size(config) -> int:
    """The number of sweep members (0: no sweep)."""
    sweep = config.get("sweep")
    if not sweep:
        return 0
    lengths = {len(sweep[k]) for k in FIELDS if sweep.get(k)}
    if not lengths:
        return 0
    n = max(lengths)
    if lengths - {1, n}:
        raise UserError(
            "config.sweep: every non-empty list must have one value per member or a single "
            f"value; got lengths {sorted(lengths)}"
        )
    return n


def member_configs(config) -> list[ml_collections.ConfigDict]:
    """The plain config of each member (its stage's, without a sweep)."""
    n = size(config)
    members = []
    for i in range(n):
        member = ml_collections.ConfigDict(config.to_dict())
        for key, field in FIELDS.items():
            values = config.sweep.get(key) or ()
            if values:
                field = field.replace("<recipe>", validate.recipe_name(config))
                section, _, name = field.rpartition(".")
                target = member[section] if section else member
                target[name] = values[i if len(values) > 1 else 0]
        for key in FIELDS:
            member.sweep[key] = ()
        member.sweep.layout = "auto"
        members.append(member)
    return members


class SweepRun(Run):
    """The loop's parts (``train.run.Run``) for N members trained at once: a stacked state, one
    step for all, per-member data orders, validation, best checkpoints and early stopping."""

    label = "sweep"

    def __init__(self, config, workdir: str, compiles: compilation.CompileLog | None = None):
        self.start_time = time.time()
        self.compiles = compiles or compilation.CompileLog()
        self.config = config
        validate.check_sweep(config)
        self.members = members = member_configs(config)
        for member in members:
            validate.check_config(member)
        self.n = n = len(members)
        self.stage = stage = config.stage
        self.place = parallel.placement(config)
        self.path = validate.prepare_workdir(workdir)
        self.config_changes = pin.check(config, self.path)
        self.backbone = backbone = models.build_backbone(config)
        masks = np.ones((n, 1), np.float32)
        if stage == "attention":  # lesions are checked before any backbone or data is read
            shaped = models.attention_from_shapes(config, backbone)
            try:
                lesions = [m.attention.lesion or None for m in members]
                masks = [sites.lesion_mask(lesion, shaped.sites) for lesion in lesions]
            except ValueError as e:
                raise UserError(f"config.sweep.lesions: {e}") from None
            masks = np.stack([sites.as_mask_array(m) for m in masks])
        self.masks = jnp.asarray(masks)
        self.own_backbones = bool(config.sweep.get("backbones"))
        self.tasks = tasks = []
        for member in members:  # each reads its frozen backbone (if any) before the data
            init = jax.random.fold_in(jax.random.key(member.seed), 0)  # the plain run's
            task = MAKE_TASK[stage](member, backbone, init)
            if tasks and not self.own_backbones and task.frozen:
                task = dataclasses.replace(task, frozen=tasks[0].frozen)  # one copy, shared
            tasks.append(task)
        shas = [t.backbone_source[2] for t in tasks if t.backbone_source]
        pin.check_backbone(self.path, ",".join(dict.fromkeys(shas)) if shas else None)
        self.frozen_axis = 0 if self.own_backbones else None
        frozen = tasks[0].frozen
        if self.own_backbones:
            frozen = jax.tree.map(lambda *xs: jnp.stack(xs), *(t.frozen for t in tasks))
        self.attention = None
        if stage == "attention":
            self.attention = models.build_attention(config, backbone, tasks[0].frozen["backbone"])
        signals.phase("data")
        data = input_pipeline.load(config, models.image_shape(config))
        if not isinstance(data.train, input_pipeline.Split):
            raise UserError(
                "config.sweep needs an in-memory dataset (config.dataset.pipeline='memory')"
            )
        self._set_data(tasks[0], data)
        self.task = dataclasses.replace(tasks[0], frozen=self.place.replicate(frozen))
        self.seed_keys = jnp.stack([jax.random.key_data(jax.random.key(m.seed)) for m in members])
        recipe = validate.recipe_name(config)
        lrs = [m[recipe].learning_rate for m in members]
        self.lrs = jnp.asarray(lrs, jnp.float32)
        stacked = jax.tree.map(
            lambda *xs: jnp.stack(xs),
            *(
                steps.init_state(t.params, optax.adam(lr, eps=1e-7), t.extra)
                for t, lr in zip(tasks, lrs, strict=True)
            ),
        )
        self.state = self.place.replicate(stacked)  # committed, as its step's outputs are
        self.meta = {
            "epoch": 0,
            "best_val": np.full((n,), -1.0),
            "best_epoch": np.zeros((n,), np.int32),
            "bad_epochs": np.zeros((n,), np.int32),
            "done": np.zeros((n,), bool),
        }
        baseline = tasks[0].baseline_logits_fn
        self.member_eval = MemberEval(self._logits_for, baseline, self.frozen_axis)
        per_member = count_params(self.state["params"]) // n
        progress.log(f"[sweep] {n} {stage} members x {per_member:,} trainable parameters")
        self._log_sizes(per_member * n, count_params(tasks[0].frozen))

    # --- one member's loss and logits, by its lesion mask ------------------------------------

    def _loss_for(self, mask):
        if self.stage != "attention":
            return self.tasks[0].loss_fn
        a, t = self.config.attention, self.config.attention_training
        return attention_loss_fn(
            self.backbone, self.attention, t.weight_decay, lesion=mask,
            cue_fraction=a.cue_fraction if a.cue_classes else 0.0, cue_weight=a.cue_weight,
        )  # fmt: skip

    def _logits_for(self, mask):
        if self.stage != "attention":
            return self.tasks[0].logits_fn
        backbone, attention = self.backbone, self.attention

        def logits(variables, frozen, x):
            out = two_pass(backbone, attention, variables, frozen["backbone"], x, lesion=mask)
            return out.logits

        return logits

    def member(self, tree, m: int):
        return jax.tree.map(lambda x: x[m], tree)

    def member_frozen(self, m: int):
        """Member m's frozen variables (its own backbone, or the shared one)."""
        return self.member(self.task.frozen, m) if self.own_backbones else self.task.frozen

    def member_task(self, m: int):
        return dataclasses.replace(
            self.task, frozen=self.member_frozen(m), backbone_source=self.tasks[m].backbone_source
        )

    # --- the parts the loop calls -------------------------------------------------------------

    def meta_arrays(self, meta: dict) -> dict:
        return {
            "epoch": np.asarray(meta["epoch"], np.int32),
            "best_val": np.asarray(meta["best_val"], np.float64),
            "best_epoch": np.asarray(meta["best_epoch"], np.int32),
            "bad_epochs": np.asarray(meta["bad_epochs"], np.int32),
            "done": np.asarray(meta["done"], np.int32),
        }

    def meta_values(self, arrays: dict) -> dict:
        values = {k: np.array(v) for k, v in arrays.items() if k != "epoch"}
        return values | {"epoch": int(arrays["epoch"]), "done": values["done"].astype(bool)}

    def fresh_sums(self) -> dict:
        return {"loss": np.zeros(self.n, np.float32), "accuracy": np.zeros(self.n, np.float32)}

    def best_managers(self) -> list:
        return [checkpoints.manager(self.member_path(m) / "best", keep=1) for m in range(self.n)]

    def check_alpha_zero(self, images):
        variables = steps.variables(self.state)
        for m in range(self.n):  # members whose alphas start at 0
            guards.check_alpha_zero_is_backbone(
                self.member_task(m), self.member(variables, m), images, self.config.model.dtype
            )

    def member_path(self, m: int):
        return self.path / "members" / str(m)

    def prepare(self):
        super().prepare()
        for m, member in enumerate(self.members):  # each member a plain workdir of its stage
            record = self.member_path(m) / "config.json"
            if not record.is_file():
                pin.record_config(self.member_path(m), member)
            keep_history_until(self.member_path(m), int(self.meta["epoch"]))

    def compile_step(self):
        recipe = self.recipe
        compiled = members_step(
            self._loss_for, recipe.augment, recipe.batch_size, skip_nonfinite=self.skip,
            frozen_axis=self.frozen_axis, layout=self.layout(),
        )  # fmt: skip

        def step(state, frozen, images, labels, perms, index):
            training = tuple(int(m) for m in np.flatnonzero(~self.meta["done"]))
            return compiled(state, self.seed_keys, self.lrs, self.masks, frozen, images, labels,
                            perms, index, members=training)  # fmt: skip

        return step

    def layout(self) -> str:
        """config.sweep.layout; 'auto': 'loop' on a CPU where the members' convolution weights
        differ (a vmapped one is a grouped convolution, 2 to 3 times slower there:
        benchmarks/RESULTS.md), else 'vmap'."""
        layout = self.config.sweep.get("layout", "auto")
        if layout != "auto":
            return layout
        scratch = self.stage == "addon" and self.config.addon.from_scratch
        own_weights = self.stage == "backbone" or scratch or self.own_backbones
        return "loop" if own_weights and jax.default_backend() == "cpu" else "vmap"

    def batches(self):
        return MemberBatches(self.data.train, self.seed_keys, self.recipe.batch_size)

    def end_epoch(self, sums: dict, skipped, t0: float):
        """Each member's validation, best checkpoint and early stopping; the periodic
        checkpoint; the log."""
        config, meta, state = self.config, self.meta, self.state
        means = self.epoch_means(sums, skipped)
        signals.phase("eval")
        variables = steps.variables(state)
        evaluate, frozen, batch = self.member_eval.all, self.task.frozen, config.eval_batch_size
        if len(self.data.validation):
            val_metrics = evaluate(variables, self.masks, frozen, self.data.validation, batch)
        else:  # no validation split: the training means select (selected_on says so)
            val_metrics = {k: np.asarray(v) for k, v in means.items()}
        val, on_test = val_metrics["accuracy"], self.recipe.test_each_epoch
        test = evaluate(variables, self.masks, frozen, self.data.test, batch) if on_test else None
        meta["epoch"] += 1
        for m in np.flatnonzero(~meta["done"]):  # each training member's own history.jsonl
            own = [d and {k: v[m] for k, v in d.items()} for d in (means, val_metrics, test)]
            append_history(self.member_path(m), history_record(meta["epoch"], *own))
        for m in np.flatnonzero(~meta["done"]):
            if val[m] > meta["best_val"][m]:
                meta["best_val"][m], meta["bad_epochs"][m] = val[m], 0
                meta["best_epoch"][m] = meta["epoch"]
                saved = {"variables": self.member(variables, m)}
                checkpoints.save(self.bests[m], meta["epoch"], saved, "save_best")
            else:
                meta["bad_epochs"][m] += 1
            meta["done"][m] = meta["bad_epochs"][m] >= self.recipe.patience
        self.save_periodic()
        rate, eta = self.timing(t0)
        progress.log(
            f"[sweep] epoch {meta['epoch']}/{self.recipe.num_epochs} loss "
            + " ".join(f"{v:.4f}" for v in means["loss"])
            + " val_acc "
            + " ".join(f"{v:.4f}" for v in val)
            + f" | {rate:.1f} steps/s, {int(meta['done'].sum())}/{self.n} members stopped, "
            f"ETA {eta} (at most)"
            + (f" | skipped {skipped.tolist()} non-finite updates" if skipped.any() else ""),
            flush=True,
        )
        self.writer.scalars(
            self.step_count(),
            {f"member{m}/train_loss": means["loss"][m] for m in range(self.n)}
            | {f"member{m}/val_accuracy": val[m] for m in range(self.n)},
        )

    def finish(self) -> tuple[dict, dict]:
        """Each member's best variables on the test split, the frozen backbones' accuracy,
        results.json and sweep.md, and each member's own results.json."""
        config, meta, state = self.config, self.meta, self.state
        test_split, batch = self.data.test, config.eval_batch_size
        signals.phase("results")
        base = None
        if self.task.baseline_logits_fn is not None:
            base = self.member_eval.backbones(self.task.frozen, test_split, batch, self.n)
        rows = []
        for m in range(self.n):
            guards.check_backbone_unchanged(self.tasks[m])
            rows.append(self._member_result(m, None if base is None else float(base[m])))
        results = {
            "stage": "sweep",
            "members_stage": self.stage,
            "members": rows,
            "epochs": meta["epoch"],
            "steps_per_member": self.step_count(),
            "selected_on": self.selected_on,
            **self.wall_time(),
            "environment": progress.environment(),
        }
        if base is not None and not self.own_backbones:
            results["backbone_test_accuracy"] = float(base[0])
            results["backbone_checkpoint"] = rows[0]["backbone_checkpoint"]
            results["backbone_checkpoint_sha256"] = rows[0]["backbone_checkpoint_sha256"]
        signals.phase("results")
        check_record(self.path / "results.json", results)  # a rerun never replaces a record
        progress.write_text(self.path / "results.json", json.dumps(results, indent=2))
        table = results_table(results)
        progress.write_text(self.path / "sweep.md", table)
        progress.log(table, flush=True)
        return {"state": state}, results

    def _member_result(self, m: int, base: float | None) -> dict:
        """Member m's row of results.json, also written as its own workdir's results.json."""
        meta, member, best = self.meta, self.members[m], self.bests[m]
        abstract = self.member(steps.variables(self.state), m)
        best_vars = checkpoints.restore(
            best, best.latest_step(), {"variables": abstract}, "member best checkpoint"
        )["variables"]
        test = self.member_eval.one(
            best_vars, self.masks[m], self.member_frozen(m), self.data.test,
            self.config.eval_batch_size,
        )  # fmt: skip
        done = bool(meta["done"][m])
        row = {
            "member": m,
            "seed": member.seed,
            "learning_rate": float(self.lrs[m]),
            "test_accuracy": test,
            "best_validation_accuracy": float(meta["best_val"][m]),
            "best_epoch": int(meta["best_epoch"][m]),
            "epochs": int(meta["best_epoch"][m]) + self.recipe.patience if done else meta["epoch"],
            "early_stopped": done,
            "skipped_updates": int(self.state["skipped"][m]),
            "trainable_params": count_params(best_vars["params"]),
        }
        if self.stage == "attention":
            row["alpha_init"] = member.attention.alpha_init
            row["lesion"] = member.attention.lesion
            alphas = site_alphas(best_vars["params"]).items()
            row["alpha"] = {k: np.asarray(v).tolist() for k, v in alphas}
        if base is not None:
            where, step, sha = self.tasks[m].backbone_source
            row["backbone_test_accuracy"] = base
            row["backbone_checkpoint"] = where if step is None else f"{where}/{step}"
            row["backbone_checkpoint_sha256"] = sha
        own = dict(row, stage=self.stage, sweep="../..", selected_on=self.selected_on)
        own_path = self.member_path(m) / "results.json"
        check_record(own_path, own)
        progress.write_text(own_path, json.dumps(own, indent=2))
        return row
