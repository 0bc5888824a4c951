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

import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from gattanet_jax import count_params, init_attention, site_alphas, sites, two_pass
from train import checkpoints, input_pipeline, models, progress, steps, validate
from train.errors import UserError

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


def train_sweep(config, workdir: str):
    """Trains every member of ``config.sweep`` in one vmapped step; returns (state, results)."""
    from train.tasks import attention_loss_fn, load_backbone

    start_time = time.time()
    if config.stage != "attention":
        raise UserError(
            f"config.sweep trains attention systems: needs stage 'attention', got {config.stage!r}"
        )
    if config.parallel != "none":
        raise UserError("config.sweep runs on one device: set config.parallel='none'")
    if config.attention_training.finetune_backbone:
        raise UserError(
            "config.sweep trains attention systems on a frozen backbone: set "
            "config.attention_training.finetune_backbone=False"
        )
    members = member_configs(config)
    for member in members:
        validate.check_config(member)
    n = len(members)
    path = validate.prepare_workdir(workdir)
    backbone = models.build_backbone(config)
    models.attention_from_shapes(config, backbone)
    backbone_vars, source = load_backbone(config, backbone)
    attention = models.build_attention(config, backbone, backbone_vars)
    try:
        masks = np.stack(
            [
                sites.as_mask_array(sites.lesion_mask(m.attention.lesion or None, attention.sites))
                for m in members
            ]
        )
    except ValueError as e:
        raise UserError(f"config.sweep.lesions: {e}") from None
    data = input_pipeline.load(config, models.image_shape(config))
    if not isinstance(data.train, input_pipeline.Split):
        raise UserError(
            "config.sweep needs an in-memory dataset (config.dataset.pipeline='memory')"
        )

    recipe = config.attention_training
    batch = recipe.batch_size
    steps_per_epoch = len(data.train) // batch
    if steps_per_epoch == 0:
        raise UserError(f"batch size {batch} exceeds the {len(data.train)} training examples")
    seed_keys = jnp.stack([jax.random.key_data(jax.random.key(m.seed)) for m in members])
    lrs = jnp.asarray([m.attention_training.learning_rate for m in members], jnp.float32)

    def init_member(m):
        key = jax.random.fold_in(jax.random.key(m.seed), 0)
        variables = dict(init_attention(attention.clone(alpha_init=m.attention.alpha_init), key))
        params = variables.pop("params")
        tx = optax.adam(m.attention_training.learning_rate, eps=1e-7)
        return steps.init_state(params, tx, variables)

    state = jax.tree.map(lambda *xs: jnp.stack(xs), *[init_member(m) for m in members])
    meta = {
        "epoch": np.asarray(0, np.int32),
        "best_val": np.full((n,), -1.0),
        "best_epoch": np.zeros((n,), np.int32),
        "bad_epochs": np.zeros((n,), np.int32),
        "done": np.zeros((n,), np.int32),
    }
    print(
        f"[sweep] {n} members x {count_params(state['params']) // n:,} trainable parameters; "
        f"train/val/test: {len(data.train)}/{len(data.validation)}/{len(data.test)}"
    )
    ckpt = checkpoints.manager(path / "checkpoints", keep=config.keep_checkpoints)
    bests = [checkpoints.manager(path / "members" / str(i) / "best", keep=1) for i in range(n)]
    if ckpt.latest_step() is not None:
        restored = checkpoints.restore(
            ckpt, ckpt.latest_step(), {"state": state, "meta": meta}, "sweep checkpoint"
        )
        state, meta = restored["state"], jax.tree.map(np.asarray, restored["meta"])
        print(f"[sweep] resumed from epoch {int(meta['epoch'])}")
    for best in bests:  # a crash between saves: replayed deterministically
        for ahead in [s for s in best.all_steps() if s > int(meta["epoch"])]:
            best.delete(ahead)
    (path / "config.json").write_text(config.to_json_best_effort(indent=2))

    def member_step(state, seed_data, lr, mask, frozen, images, labels, perm, index):
        a = config.attention
        loss_fn = attention_loss_fn(
            backbone,
            attention,
            recipe.weight_decay,
            lesion=mask,
            cue_fraction=a.cue_fraction if a.cue_classes else 0.0,
            cue_weight=a.cue_weight,
        )
        tx = optax.adam(lr, eps=1e-7)
        seed_key = jax.random.wrap_key_data(seed_data)
        return steps.train_step(
            loss_fn, tx, recipe.augment, batch, seed_key, state, frozen, images, labels, perm, index
        )

    step_fn = jax.jit(
        jax.vmap(member_step, in_axes=(0, 0, 0, 0, None, None, None, 0, None)),
        donate_argnums=(0,),
    )

    def member_perm(seed_data, epoch):
        key = jax.random.fold_in(jax.random.wrap_key_data(seed_data), 2)
        return steps.epoch_permutation(key, epoch, len(data.train))

    perm_fn = jax.jit(jax.vmap(member_perm, in_axes=(0, None)))
    images, labels = jax.device_put((data.train.images, data.train.labels))
    frozen = jax.device_put(backbone_vars)
    masks = jnp.asarray(masks)
    member_eval = _MemberEval(backbone, attention)
    writer = progress.Writer(path)
    epoch_times = []
    while not meta["done"].all() and int(meta["epoch"]) < recipe.num_epochs:
        t0, epoch = time.time(), int(meta["epoch"])
        perms = perm_fn(seed_keys, jnp.int32(epoch))
        losses = []
        for i in tqdm.tqdm(
            range(steps_per_epoch),
            desc=f"[sweep] epoch {epoch + 1}",
            leave=False,
            disable=not sys.stderr.isatty(),
        ):
            state, metrics = step_fn(
                state, seed_keys, lrs, masks, frozen, images, labels, perms, jnp.int32(i)
            )
            losses.append(metrics["loss"])
        if not np.isfinite(np.asarray(jax.device_get(losses))).all():
            raise UserError(
                f"non-finite loss in epoch {epoch + 1} of the sweep; stopped without saving "
                f"anything from this epoch; last good checkpoint: {ckpt.directory}/"
                f"{ckpt.latest_step()}"
            )
        val = member_eval.all(
            steps.variables(state), masks, frozen, data.validation, config.eval_batch_size
        )
        meta["epoch"] = np.asarray(epoch + 1, np.int32)
        for m in range(n):
            if meta["done"][m]:
                continue
            if val[m] > meta["best_val"][m]:
                meta["best_val"][m], meta["bad_epochs"][m] = val[m], 0
                meta["best_epoch"][m] = epoch + 1
                member_vars = jax.tree.map(lambda x, m=m: x[m], steps.variables(state))
                checkpoints.save(bests[m], epoch + 1, {"variables": member_vars})
            else:
                meta["bad_epochs"][m] += 1
            meta["done"][m] = int(meta["bad_epochs"][m] >= recipe.patience)
        epoch_times.append(time.time() - t0)
        checkpoints.save(ckpt, epoch + 1, {"state": state, "meta": meta})
        mean_loss = np.mean(np.asarray(jax.device_get(losses)), axis=0)
        print(
            f"[sweep] epoch {epoch + 1}/{recipe.num_epochs} val_acc "
            + " ".join(f"{v:.4f}" for v in val)
            + f" | {steps_per_epoch / epoch_times[-1]:.1f} steps/s, {int(meta['done'].sum())}"
            f"/{n} members stopped, ETA "
            f"{progress.duration((recipe.num_epochs - epoch - 1) * np.mean(epoch_times[-5:]))}",
            flush=True,
        )
        writer.scalars(
            int(state["step"][0]),
            {f"member{m}/train_loss": mean_loss[m] for m in range(n)}
            | {f"member{m}/val_accuracy": val[m] for m in range(n)},
        )
    writer.close()

    # each member's best variables on the test split, and the frozen backbone's accuracy
    backbone_acc = member_eval.backbone(frozen, data.test, config.eval_batch_size)
    rows = []
    for m, member in enumerate(members):
        abstract = jax.tree.map(lambda x, m=m: x[m], steps.variables(state))
        best_vars = checkpoints.restore(
            bests[m], bests[m].latest_step(), {"variables": abstract}, "member best checkpoint"
        )["variables"]
        test = member_eval.one(best_vars, masks[m], frozen, data.test, config.eval_batch_size)
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
                "alpha": {
                    k: np.asarray(v).tolist() for k, v in site_alphas(best_vars["params"]).items()
                },
            }
        )
    results = {
        "stage": "sweep",
        "members": rows,
        "backbone_test_accuracy": backbone_acc,
        "epochs": int(meta["epoch"]),
        "steps_per_member": int(state["step"][0]),
        "backbone_checkpoint": source[0] if source[1] is None else f"{source[0]}/{source[1]}",
        "backbone_checkpoint_sha256": source[2],
        "wall_time_s": round(time.time() - start_time, 1),
        "environment": progress.environment(),
    }
    (path / "results.json").write_text(json.dumps(results, indent=2))
    table = results_table(results)
    (path / "sweep.md").write_text(table)
    print(table, flush=True)
    return {"state": state}, results


class _MemberEval:
    """Accuracy of every member (vmapped), of one member, and of the frozen backbone."""

    def __init__(self, backbone, attention):
        self.backbone_module = backbone

        def batch_fn(batch_size, variables, mask, frozen, images, labels, start):
            def logits(v, f, x):
                return two_pass(backbone, attention, v, f, x, lesion=mask).logits

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
        for start in range(0, len(split), batch_size):
            _, c = fn(variables, mask, frozen, split.images, split.labels, jnp.int32(start))
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
            return self.backbone_module.apply(f, x, train=False)

        fn = jax.jit(functools.partial(steps.eval_batch, logits, batch_size))
        correct = 0
        for start in range(0, len(split), batch_size):
            correct += fn({}, frozen, split.images, split.labels, jnp.int32(start))[1]
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
