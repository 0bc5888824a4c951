"""vmap meta-experiments: N attention systems trained at once on one frozen backbone.

The config's ``sweep`` section lists per-member values; every non-empty list gives one value per
member (or a single value for all), empty lists keep the config's own value:

  sweep.seeds           config.seed per member: attention initialisation, data order,
                        augmentation and key/query dropout
  sweep.learning_rates  attention_training.learning_rate per member
  sweep.alpha_inits     attention.alpha_init per member
  sweep.lesions         attention.lesion per member ('' = every site modulated)

d and the schedule are shared. One compiled step runs ``train_step`` for every member under
``jax.vmap`` (each member with its own state, data order, random streams, learning rate and
lesion mask), so member i follows exactly the run of the plain attention stage with member i's
values (tests/test_sweep.py). Each member keeps its own early stopping: once a member has not
improved for ``patience`` epochs its best checkpoint is final; the sweep stops when every member
has stopped.

The workdir holds the stacked state in ``checkpoints/`` (resumable like any stage),
``members/<i>/best`` (each member's best variables), ``results.json`` (per-member results) and
``sweep.md`` (a results table).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gattanet_jax import count_params, init_attention, site_alphas, sites, two_pass
from train import (
    checkpoints,
    compilation,
    guards,
    models,
    parallel,
    pin,
    progress,
    steps,
    validate,
)
from train.data import input_pipeline
from train.errors import UserError
from train.run import Run
from train.tasks import attention_loss_fn, attention_task

FIELDS = {  # sweep list -> the config field it replaces per member
    "seeds": "seed",
    "learning_rates": "attention_training.learning_rate",
    "alpha_inits": "attention.alpha_init",
    "lesions": "attention.lesion",
}


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
    """The plain attention-stage config of each member."""
    n = size(config)
    members = []
    for i in range(n):
        member = ml_collections.ConfigDict(config.to_dict())
        for key, field in FIELDS.items():
            values = config.sweep.get(key) or ()
            if values:
                section, _, name = field.rpartition(".")
                target = member[section] if section else member
                target[name] = values[i if len(values) > 1 else 0]
        for key in FIELDS:
            member.sweep[key] = ()
        members.append(member)
    return members


class SweepRun(Run):
    """The loop's parts (``train.run.Run``) for N members trained at once: a stacked state, one
    vmapped step, per-member data orders, validation, best checkpoints and early stopping."""

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
        self.place = parallel.placement(config)
        self.path = validate.prepare_workdir(workdir)
        self.config_changes = pin.check(config, self.path)
        self.backbone = backbone = models.build_backbone(config)
        models.attention_from_shapes(config, backbone)
        task = attention_task(config, backbone, jax.random.key(config.seed))
        pin.check_backbone(self.path, task.backbone_source[2])
        self.attention = attention = models.build_attention(
            config, backbone, task.frozen["backbone"]
        )
        try:
            lesions = [m.attention.lesion or None for m in members]
            masks = [sites.lesion_mask(lesion, attention.sites) for lesion in lesions]
        except ValueError as e:
            raise UserError(f"config.sweep.lesions: {e}") from None
        self.masks = jnp.asarray(np.stack([sites.as_mask_array(m) for m in masks]))
        data = input_pipeline.load(config, models.image_shape(config))
        if not isinstance(data.train, input_pipeline.Split):
            raise UserError(
                "config.sweep needs an in-memory dataset (config.dataset.pipeline='memory')"
            )
        self._set_data(task, data)
        self.task = dataclasses.replace(task, frozen=self.place.replicate(task.frozen))
        self.seed_keys = jnp.stack([jax.random.key_data(jax.random.key(m.seed)) for m in members])
        self.lrs = jnp.asarray([m.attention_training.learning_rate for m in members], jnp.float32)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *map(self._init_member, members))
        self.state = self.place.replicate(stacked)  # committed, as its step's outputs are
        self.meta = {
            "epoch": 0,
            "best_val": np.full((n,), -1.0),
            "best_epoch": np.zeros((n,), np.int32),
            "bad_epochs": np.zeros((n,), np.int32),
            "done": np.zeros((n,), bool),
        }
        self.member_eval = _MemberEval(backbone, attention)
        per_member = count_params(self.state["params"]) // n
        progress.log(f"[sweep] {n} members x {per_member:,} trainable parameters")
        self._log_sizes(per_member * n, count_params(task.frozen))

    def _init_member(self, member):
        key = jax.random.fold_in(jax.random.key(member.seed), 0)
        attention = self.attention.clone(alpha_init=member.attention.alpha_init)
        variables = dict(init_attention(attention, key))
        params = variables.pop("params")
        tx = optax.adam(member.attention_training.learning_rate, eps=1e-7)
        return steps.init_state(params, tx, variables)

    def member(self, tree, m: int):
        return jax.tree.map(lambda x: x[m], tree)

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
        return [
            checkpoints.manager(self.path / "members" / str(m) / "best", keep=1)
            for m in range(self.n)
        ]

    def check_alpha_zero(self, images):
        variables = steps.variables(self.state)
        for m in range(self.n):  # members whose alphas start at 0
            guards.check_alpha_zero_is_backbone(
                self.task, self.member(variables, m), images, self.config.model.dtype
            )

    def compile_step(self):
        a, recipe = self.config.attention, self.recipe
        compiled = members_step(
            self.backbone, self.attention, recipe.weight_decay, recipe.augment, recipe.batch_size,
            cues=(a.cue_fraction if a.cue_classes else 0.0, a.cue_weight),
            skip_nonfinite=self.skip,
        )  # fmt: skip

        def step(state, frozen, images, labels, perms, index):
            return compiled(state, self.seed_keys, self.lrs, self.masks, frozen, images, labels,
                            perms, index)  # fmt: skip

        return step

    def batches(self):
        return _MemberBatches(self.data.train, self.seed_keys, self.recipe.batch_size)

    def end_epoch(self, sums: dict, skipped, t0: float):
        """Each member's validation, best checkpoint and early stopping; the periodic
        checkpoint; the log."""
        config, meta, state = self.config, self.meta, self.state
        means = self.epoch_means(sums, skipped)
        variables = steps.variables(state)
        val = self.member_eval.all(
            variables, self.masks, self.task.frozen, self.data.validation, config.eval_batch_size
        )
        meta["epoch"] += 1
        for m in np.flatnonzero(~meta["done"]):
            if val[m] > meta["best_val"][m]:
                meta["best_val"][m], meta["bad_epochs"][m] = val[m], 0
                meta["best_epoch"][m] = meta["epoch"]
                saved = {"variables": self.member(variables, m)}
                checkpoints.save(self.bests[m], meta["epoch"], saved)
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
        """Each member's best variables on the test split, the frozen backbone's accuracy,
        results.json and sweep.md."""
        config, meta, state, frozen = self.config, self.meta, self.state, self.task.frozen
        guards.check_backbone_unchanged(self.task)
        test_split, batch = self.data.test, config.eval_batch_size
        rows = []
        for m, member in enumerate(self.members):
            abstract = self.member(steps.variables(state), m)
            best = self.bests[m]
            best_vars = checkpoints.restore(
                best, best.latest_step(), {"variables": abstract}, "member best checkpoint"
            )["variables"]
            test = self.member_eval.one(best_vars, self.masks[m], frozen, test_split, batch)
            rows.append(
                {
                    "member": m,
                    "seed": member.seed,
                    "learning_rate": member.attention_training.learning_rate,
                    "alpha_init": member.attention.alpha_init,
                    "lesion": member.attention.lesion,
                    "test_accuracy": test,
                    "best_validation_accuracy": float(meta["best_val"][m]),
                    "best_epoch": int(meta["best_epoch"][m]),
                    "early_stopped": bool(meta["done"][m]),
                    "skipped_updates": int(state["skipped"][m]),
                    "alpha": {
                        k: np.asarray(v).tolist()
                        for k, v in site_alphas(best_vars["params"]).items()
                    },
                }
            )
        where, step, sha = self.task.backbone_source
        results = {
            "stage": "sweep",
            "members": rows,
            "backbone_test_accuracy": self.member_eval.backbone(frozen, test_split, batch),
            "epochs": meta["epoch"],
            "steps_per_member": self.step_count(),
            "backbone_checkpoint": where if step is None else f"{where}/{step}",
            "backbone_checkpoint_sha256": sha,
            **self.wall_time(),
            "environment": progress.environment(),
        }
        progress.write_text(self.path / "results.json", json.dumps(results, indent=2))
        table = results_table(results)
        progress.write_text(self.path / "sweep.md", table)
        progress.log(table, flush=True)
        return {"state": state}, results


def members_step(
    backbone, attention, weight_decay: float, augment: bool, batch_size: int,
    cues=(0.0, 0.0), skip_nonfinite: bool = False,
):  # fmt: skip
    """The sweep's compiled step: ``steps.train_step`` of the attention stage for every member
    under ``jax.vmap``, ``(states, seed key data, learning rates, lesion masks, frozen, images,
    labels, permutations, index) -> (states, metrics)``; per member (leading axis): the state,
    seed, learning rate, lesion mask and data order."""

    def member_step(state, seed_data, lr, mask, frozen, images, labels, perm, index):
        loss_fn = attention_loss_fn(
            backbone, attention, weight_decay, lesion=mask, cue_fraction=cues[0],
            cue_weight=cues[1],
        )  # fmt: skip
        return steps.train_step(
            loss_fn, optax.adam(lr, eps=1e-7), augment, batch_size,
            jax.random.wrap_key_data(seed_data), state, frozen, images, labels, perm, index,
            skip_nonfinite=skip_nonfinite,
        )  # fmt: skip

    vmapped = jax.vmap(member_step, in_axes=(0, 0, 0, 0, None, None, None, 0, None))
    return jax.jit(vmapped, donate_argnums=(0,))


class _MemberBatches:
    """The sweep's step arguments (images, labels, one permutation per member, index): each
    member its own data order, that of the plain run with its seed."""

    def __init__(self, split, seed_keys, batch: int):
        self.n, self.batch = len(split), batch
        self.arrays = jax.device_put((split.images, split.labels), parallel.one_device())
        self.seed_keys = seed_keys

        def member_perm(seed_data, epoch):
            key = jax.random.fold_in(jax.random.wrap_key_data(seed_data), 2)
            return steps.epoch_permutation(key, epoch, self.n)

        self.perm_fn = jax.jit(jax.vmap(member_perm, in_axes=(0, None)))

    def epoch(self, epoch: int, start: int = 0):
        perms = self.perm_fn(self.seed_keys, jnp.int32(epoch))
        for i in range(start, self.n // self.batch):
            yield (*self.arrays, perms, jnp.int32(i))


class _MemberEval:
    """Accuracy of every member (vmapped), of one member, and of the frozen backbone."""

    def __init__(self, backbone, attention):
        self.backbone_module = backbone

        def batch_fn(batch_size, variables, mask, frozen, images, labels, start):
            def logits(v, f, x):
                return two_pass(backbone, attention, v, f["backbone"], x, lesion=mask).logits

            return steps.eval_batch(logits, batch_size, variables, frozen, images, labels, start)

        self._batch_fn = batch_fn

    @functools.lru_cache(maxsize=8)  # noqa: B019  (one per batch size; lives with the sweep)
    def _compiled(self, batch_size: int, vmapped: bool):
        fn = functools.partial(self._batch_fn, batch_size)
        if vmapped:
            fn = jax.vmap(fn, in_axes=(0, 0, None, None, None, None))
        return jax.jit(fn)

    def _accuracy(self, fn, variables, mask, frozen, split, batch_size):
        correct = 0
        for images, labels in split.eval_batches(batch_size):  # on the device, padded
            _, c = fn(variables, mask, frozen, images, labels, jnp.int32(0))
            correct = correct + c
        return np.asarray(correct) / len(split)

    def all(self, variables, masks, frozen, split, batch_size) -> np.ndarray:
        fn = self._compiled(batch_size, True)
        return self._accuracy(fn, variables, masks, frozen, split, batch_size)

    def one(self, variables, mask, frozen, split, batch_size) -> float:
        fn = self._compiled(batch_size, False)
        return float(self._accuracy(fn, variables, mask, frozen, split, batch_size))

    def backbone(self, frozen, split, batch_size) -> float:
        def logits(v, f, x):
            del v
            return self.backbone_module.apply(f["backbone"], x, train=False)

        fn = jax.jit(functools.partial(steps.eval_batch, logits, batch_size))
        correct = 0
        for images, labels in split.eval_batches(batch_size):
            correct += fn({}, frozen, images, labels, jnp.int32(0))[1]
        return float(correct) / len(split)


def results_table(results: dict) -> str:
    lines = [
        f"frozen backbone test accuracy: {100 * results['backbone_test_accuracy']:.2f} %",
        "",
        "| member | seed | learning rate | alpha init | lesion | best epoch | val acc. | test acc. "
        "| gain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = results["backbone_test_accuracy"]
    for r in results["members"]:
        lines.append(
            f"| {r['member']} | {r['seed']} | {r['learning_rate']:g} | {r['alpha_init']:g} | "
            f"{r['lesion'] or 'full'} | {r['best_epoch']} | "
            f"{100 * r['best_validation_accuracy']:.2f} | {100 * r['test_accuracy']:.2f} | "
            f"{100 * (r['test_accuracy'] - base):+.2f} |"
        )
    return "\n".join(lines) + "\n"
