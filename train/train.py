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
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from gattanet_jax import count_params, init_attention, site_alphas, two_pass, weights
from gattanet_jax import sites as sites_lib
from train import (
    checkpoints,
    guards,
    input_pipeline,
    models,
    parallel,
    progress,
    steps,
    sweep,
    validate,
)
from train.errors import UserError


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between the stages."""

    stage: str
    params: dict  # initial trainable parameters
    loss_fn: steps.LossFn  # training mode (see steps.LossFn)
    logits_fn: steps.LogitsFn  # (variables, frozen, x) -> logits, inference mode
    recipe: ml_collections.ConfigDict  # backbone_training or attention_training
    frozen: dict  # the frozen backbone's variables (attention stage), else empty
    baseline_logits_fn: steps.LogitsFn | None = None
    backbone_source: tuple[str, int | None, str] | None = None  # (dir or file, step, sha256)
    place: parallel.Placement = dataclasses.field(default_factory=lambda: parallel.Placement(None))
    extra: dict = dataclasses.field(default_factory=dict)  # initial non-parameter collections
    tx: optax.GradientTransformation | None = None  # default: Adam at recipe.learning_rate


def backbone_loss_fn(backbone, weight_decay: float) -> steps.LossFn:
    """The backbone's own training loss: all its parameters train, dropout on; BatchNorm
    statistics (in ``extra``) are updated by the forward pass."""

    def loss_fn(params, extra, frozen, x, y, rng, example_offset=0):
        del frozen, example_offset  # the backbone's own dropout is drawn per call
        logits, updates = backbone.apply(
            {"params": params, **extra}, x, train=True, rngs={"dropout": rng}, mutable=list(extra)
        )
        loss = jnp.mean(steps.cross_entropy(logits, y))
        return loss + weight_decay * steps.l2_penalty(params, ("kernel",)), (logits, updates)

    return loss_fn


def true_class_cues(rng, batch: int, fraction: float, weight: float, example_offset=0):
    """Per-example cue weights: ``weight`` for a ``fraction`` of the examples, else 0. Example i
    of the global batch draws from (rng, i), however the batch is split across devices."""
    index = example_offset + jnp.arange(batch)
    key = jax.random.fold_in(rng, 0x0C0E)
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i)))(index)
    return jnp.where(u < fraction, jnp.float32(weight), jnp.float32(0))


def attention_loss_fn(
    backbone, attention, weight_decay: float, lesion=None, cue_fraction=0.0, cue_weight=0.0
) -> steps.LossFn:
    """GAttANet's training loss; ``frozen`` holds the backbone's variables (no gradient).
    ``lesion``: sites trained without modulation (a lesion string, or a float mask).
    ``cue_fraction`` > 0: that fraction of the examples is cued with its true class at
    ``cue_weight`` (needs ``attention.cue_classes``)."""

    def loss_fn(params, extra, frozen, x, y, rng, example_offset=0):
        variables = {"params": params, **extra}
        cues = (cue_fraction, cue_weight)
        out = training_two_pass(
            backbone, attention, variables, frozen, x, y, rng, lesion, cues, example_offset
        )
        loss = jnp.mean(steps.cross_entropy(out.logits, y))
        return loss + weight_decay * steps.l2_penalty(params, ("K", "Q")), (out.logits, out.updates)

    return loss_fn


def training_two_pass(
    backbone, attention, att_vars, bb_vars, x, y, rng, lesion, cues, example_offset, **kw
):
    """The two-pass forward of a training step; ``cues`` = (fraction, weight): that fraction of
    the examples is cued with its true class at that weight (none if the fraction is 0)."""
    fraction, weight = cues
    cue = {}
    if fraction > 0:
        w = true_class_cues(rng, x.shape[0], fraction, weight, example_offset)
        cue = {"cue": y, "cue_weight": w}
    return two_pass(
        backbone,
        attention,
        att_vars,
        bb_vars,
        x,
        train=True,
        rng=rng,
        lesion=lesion,
        example_offset=example_offset,
        **cue,
        **kw,
    )


def backbone_task(config, backbone, rng) -> Task:
    x = jnp.zeros((1, *models.image_shape(config)), jnp.float32)
    variables = dict(jax.jit(backbone.init)(rng, x))
    params = variables.pop("params")
    loss_fn = backbone_loss_fn(backbone, config.backbone_training.weight_decay)

    def logits_fn(variables, frozen, x):
        del frozen
        return backbone.apply(variables, x, train=False)

    return Task(
        "backbone", params, loss_fn, logits_fn, config.backbone_training, {}, extra=variables
    )


def load_backbone(config, backbone) -> tuple[dict, tuple[str, int | None, str]]:
    """The frozen backbone's variables and where they came from: (directory, step, sha256), or
    (file, None, sha256) for pretrained weights in torchvision's format (.pth/.pt,
    .safetensors, .npz; see gattanet_jax.weights)."""
    path = config.backbone_checkpoint
    if os.path.splitext(path)[1].lower() in weights.SUFFIXES:
        abstract = models.backbone_shapes(backbone, config)
        try:
            state_dict = weights.read_state_dict(path)
            variables = weights.from_torchvision(
                state_dict,
                abstract,
                models.torch_module_name(config),
                where=f"the weights in {path}",
            )
        except weights.WeightsError as e:
            raise UserError(str(e)) from None
        logging.info("frozen backbone from pretrained weights %s", path)
        return jax.tree.map(jnp.asarray, variables), (path, None, checkpoints.digest_file(path))
    directory, step = checkpoints.find_model_checkpoint(path)
    abstract = {"variables": models.backbone_shapes(backbone, config)}
    mngr = checkpoints.manager(directory, keep=1, create=False)
    sha = checkpoints.digest(directory, step)
    restored = checkpoints.restore(mngr, step, abstract, "backbone checkpoint")
    logging.info("frozen backbone from %s/%d", directory, step)
    return restored["variables"], (directory, step, sha)


def attention_task(config, backbone, rng) -> Task:
    backbone_vars, source = load_backbone(config, backbone)
    attention = models.build_attention(config, backbone, backbone_vars)
    if config.parallel == "pmap":  # BatchNorm statistics of keys/queries over all devices
        attention = attention.clone(axis_name=parallel.AXIS)
    variables = dict(init_attention(attention, rng))
    params = variables.pop("params")
    lesion = config.attention.get("lesion") or None
    try:
        sites_lib.lesion_mask(lesion, attention.sites)
    except ValueError as e:
        raise UserError(f"config.attention.lesion: {e}") from None
    a, t = config.attention, config.attention_training
    cue_fraction = a.get("cue_fraction", 0.0) if a.get("cue_classes", False) else 0.0
    cue_weight = a.get("cue_weight", 0.0)

    def baseline(variables, frozen, x):
        del variables
        return backbone.apply(frozen, x, train=False)

    if t.get("finetune_backbone", False):
        return finetune_task(config, backbone, attention, params, variables, backbone_vars, source)
    loss_fn = attention_loss_fn(
        backbone,
        attention,
        t.weight_decay,
        lesion=lesion,
        cue_fraction=cue_fraction,
        cue_weight=cue_weight,
    )

    def logits_fn(variables, frozen, x):
        return two_pass(backbone, attention, variables, frozen, x, lesion=lesion).logits

    return Task(
        "attention",
        params,
        loss_fn,
        logits_fn,
        config.attention_training,
        backbone_vars,
        baseline,
        source,
        extra=variables,
    )


def split_finetuned(variables: dict, frozen: dict) -> tuple[dict, dict]:
    """(attention variables, backbone variables) of a jointly fine-tuned model: its variables
    are {'params': {'attention', 'backbone'}, 'attention_state'?, 'backbone_state'?} and
    ``frozen`` is {'backbone': the original backbone's variables} (BatchNorm statistics are read
    there unless they are trained, in 'backbone_state')."""
    original = {k: v for k, v in frozen["backbone"].items() if k != "params"}
    att = {"params": variables["params"]["attention"], **variables.get("attention_state", {})}
    bb = {**original, "params": variables["params"]["backbone"]}
    bb.update(variables.get("backbone_state", {}))
    return att, bb


def finetune_task(config, backbone, attention, att_params, att_extra, backbone_vars, source):
    """Joint fine-tuning (beyond the paper): the attention system and the backbone train
    together, each with its own Adam (optax.multi_transform): attention_training.learning_rate
    and .backbone_learning_rate. BatchNorm statistics of the backbone: 'frozen' (stored ones,
    unchanged) or 'update' (batch statistics in training, running averages trained). The
    original backbone stays in ``frozen`` for the baseline accuracy."""
    t = config.attention_training
    mode = t.get("backbone_batch_stats", "frozen")
    lesion = config.attention.get("lesion") or None
    a = config.attention
    cue_fraction = a.get("cue_fraction", 0.0) if a.get("cue_classes", False) else 0.0
    stats = {k: v for k, v in backbone_vars.items() if k != "params"}
    # A copy: the training state is donated, the original stays for the baseline.
    params = {"attention": att_params, "backbone": jax.tree.map(jnp.copy, backbone_vars["params"])}
    extra = {}
    if att_extra:
        extra["attention_state"] = att_extra
    if mode == "update" and stats:
        extra["backbone_state"] = jax.tree.map(jnp.copy, stats)

    def loss_fn(params, extra, frozen, x, y, rng, example_offset=0):
        att_vars, bb_vars = split_finetuned({"params": params, **extra}, frozen)
        cues = (cue_fraction, a.cue_weight)
        out = training_two_pass(
            backbone,
            attention,
            att_vars,
            bb_vars,
            x,
            y,
            rng,
            lesion,
            cues,
            example_offset,
            train_backbone=True,
            backbone_batch_stats=mode,
        )
        new_extra = {}
        if "attention_state" in extra:
            new_extra["attention_state"] = out.updates
        if "backbone_state" in extra:
            new_extra["backbone_state"] = out.backbone_updates
        loss = jnp.mean(steps.cross_entropy(out.logits, y))
        return loss + t.weight_decay * steps.l2_penalty(params["attention"], ("K", "Q")), (
            out.logits,
            new_extra,
        )

    def logits_fn(variables, frozen, x):
        att_vars, bb_vars = split_finetuned(variables, frozen)
        return two_pass(backbone, attention, att_vars, bb_vars, x, lesion=lesion).logits

    def baseline(variables, frozen, x):
        del variables
        return backbone.apply(frozen["backbone"], x, train=False)

    def adam(lr):
        return optax.adam(lr, eps=1e-7)

    tx = optax.multi_transform(
        {"attention": adam(t.learning_rate), "backbone": adam(t.backbone_learning_rate)},
        lambda p: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in p.items()},
    )
    return Task(
        "attention",
        params,
        loss_fn,
        logits_fn,
        t,
        {"backbone": backbone_vars},
        baseline,
        source,
        extra=extra,
        tx=tx,
    )


def addon_task(config, backbone, rng) -> Task:
    """A comparison system (config.addon: GALA, SE or residual GSA) at the backbone's sites.

    Protocol (a), ``addon.from_scratch=False``: an add-on to the frozen backbone at
    ``backbone_checkpoint``; only the modules' parameters train (the attention_training recipe).
    Protocol (b), ``from_scratch=True``: backbone and modules initialised afresh and trained
    together (the backbone_training recipe, the backbone's dropout on). Modules with BatchNorm
    (GSA) keep their statistics in 'addon_state' (the backbone's stay in 'batch_stats')."""
    from gattanet_jax import addon

    a = config.addon
    if a.from_scratch:
        x = jnp.zeros((1, *models.image_shape(config)), jnp.float32)
        backbone_vars = dict(jax.jit(backbone.init)(jax.random.fold_in(rng, 1), x))
        source = None
    else:
        backbone_vars, source = load_backbone(config, backbone)
    addons = models.build_addons(config, backbone, backbone_vars)
    addon_vars = dict(addon.init_addons(addons, rng))
    addon_params = addon_vars.pop("params")
    addon_state = {"addon_state": addon_vars} if addon_vars else {}
    recipe = config.backbone_training if a.from_scratch else config.attention_training
    wd = recipe.weight_decay

    def split(variables):
        """(the modules' variables, the backbone's statistics) of a model's variables."""
        module_vars = {"params": variables["params"], **variables.get("addon_state", {})}
        stats = {k: v for k, v in variables.items() if k not in ("params", "addon_state")}
        return module_vars, stats

    def new_extra(extra, updates):
        out = dict(updates.get("backbone", {}))
        if "addon_state" in extra:
            out["addon_state"] = updates["addon"]
        return out

    if a.from_scratch:
        stats = {k: v for k, v in backbone_vars.items() if k != "params"}  # BatchNorm's
        params = {
            "addon": addon_params,
            "backbone": addon.drop_replaced(backbone_vars["params"], addons),
        }

        def loss_fn(params, extra, frozen, x, y, rng, example_offset=0):
            del frozen, example_offset
            module_vars, stats = split({"params": params["addon"], **extra})
            out = addon.forward(
                backbone,
                addons,
                module_vars,
                {"params": params["backbone"], **stats},
                x,
                train=True,
                rngs={"dropout": rng},
                mutable=list(stats),
            )
            logits, updates = out if isinstance(out, tuple) else (out, {})
            loss = jnp.mean(steps.cross_entropy(logits, y))
            return loss + wd * steps.l2_penalty(params, ("kernel",)), (
                logits,
                new_extra(extra, updates),
            )

        def logits_fn(variables, frozen, x):
            del frozen
            p = variables["params"]
            module_vars, stats = split({**variables, "params": p["addon"]})
            return addon.forward(
                backbone, addons, module_vars, {"params": p["backbone"], **stats}, x
            )

        extra = {**stats, **addon_state}
        return Task("addon", params, loss_fn, logits_fn, recipe, {}, extra=extra)

    def loss_fn(params, extra, frozen, x, y, rng, example_offset=0):
        del rng, example_offset
        module_vars, _ = split({"params": params, **extra})
        out = addon.forward(backbone, addons, module_vars, frozen, x, train_addons=True)
        logits, updates = out if isinstance(out, tuple) else (out, {})
        loss = jnp.mean(steps.cross_entropy(logits, y))
        return loss + wd * steps.l2_penalty(params, ("kernel",)), (
            logits,
            new_extra(extra, updates),
        )

    def logits_fn(variables, frozen, x):
        return addon.forward(backbone, addons, split(variables)[0], frozen, x)

    def baseline(variables, frozen, x):
        del variables
        return backbone.apply(frozen, x, train=False)

    return Task(
        "addon",
        addon_params,
        loss_fn,
        logits_fn,
        recipe,
        backbone_vars,
        baseline,
        source,
        extra=addon_state,
    )


@functools.lru_cache(maxsize=16)
def _eval_step(logits_fn, batch_size: int, place: parallel.Placement):
    """One compiled evaluation step per (logits function, batch size), reused across epochs."""
    return place.compile(functools.partial(steps.eval_batch, logits_fn, batch_size))


def evaluate(task: Task, variables, split, batch_size: int, logits_fn=None) -> dict:
    step = _eval_step(logits_fn or task.logits_fn, batch_size, task.place)
    loss = correct = 0.0
    if isinstance(split, input_pipeline.Split):
        batches = (
            (split.images, split.labels, jnp.int32(start))
            for start in range(0, len(split), batch_size)
        )
    else:  # streamed: each batch is the whole array given (padding labelled -1)
        batches = (  # every process reads whole eval batches
            (*task.place.replicate((x, y)), jnp.int32(0)) for x, y in split.eval_batches(batch_size)
        )
    for images, labels, start in batches:
        batch_loss, batch_correct = step(variables, task.frozen, images, labels, start)
        loss, correct = loss + batch_loss, correct + batch_correct
    n = len(split)
    return {"accuracy": float(correct) / n, "loss": float(loss) / n}


def train_stage(config, workdir: str) -> tuple[dict, dict]:
    """Trains one stage in ``workdir``, resuming from its latest checkpoint if there is one.
    SIGTERM and SIGINT save the run at the next step boundary and exit (128 + the signal)."""
    with progress.Preemption() as stop:
        return _train_stage(config, workdir, stop)


def _train_stage(config, workdir: str, stop: progress.Preemption) -> tuple[dict, dict]:
    start_time = time.time()
    place = parallel.placement(config)
    parallel.check_batch_sizes(config, place)
    path = validate.prepare_workdir(workdir)
    backbone = models.build_backbone(config)
    if config.stage == "attention":  # site names and d are checked before any data is read
        models.attention_from_shapes(config, backbone)
    seed_key = jax.random.key(config.seed)
    init_key = jax.random.fold_in(seed_key, 0)
    make_task = {"backbone": backbone_task, "attention": attention_task, "addon": addon_task}
    task = make_task[config.stage](
        config, backbone, init_key
    )  # reads the backbone's weights (if any) before the data: a wrong file fails fast
    data = input_pipeline.load(config, models.image_shape(config))
    recipe = task.recipe
    batch = recipe.batch_size
    steps_per_epoch = len(data.train) // batch
    if steps_per_epoch == 0:
        raise UserError(f"batch size {batch} exceeds the {len(data.train)} training examples")

    tx = task.tx or optax.adam(recipe.learning_rate, eps=1e-7)  # Keras' Adam defaults
    task = dataclasses.replace(task, frozen=place.replicate(task.frozen), place=place)
    if isinstance(data.validation, input_pipeline.Split):  # evaluated from device memory
        data = dataclasses.replace(
            data,
            validation=input_pipeline.Split(*place.replicate(dataclasses.astuple(data.validation))),
            test=input_pipeline.Split(*place.replicate(dataclasses.astuple(data.test))),
        )
    state = place.replicate(steps.init_state(task.params, tx, task.extra))
    meta = {"epoch": 0, "best_val": -1.0, "bad_epochs": 0, "done": False}
    trainable = count_params(task.params)
    progress.log(
        f"[{config.stage}] trainable parameters: {trainable:,}; frozen: "
        f"{count_params(task.frozen):,}; "
        f"train/val/test: {len(data.train)}/{len(data.validation)}/{len(data.test)}"
    )

    ckpt = checkpoints.manager(path / "checkpoints", keep=config.keep_checkpoints)
    best = checkpoints.manager(path / "best", keep=1)
    if ckpt.latest_step() is not None:
        restored = checkpoints.restore(
            ckpt,
            ckpt.latest_step(),
            {"state": state, "meta": progress.meta_arrays(meta)},
            "checkpoint in this workdir",
        )
        state, meta = restored["state"], progress.meta_values(restored["meta"])
        progress.log(
            f"[{config.stage}] resumed from epoch {meta['epoch']} (step {int(state['step'])})"
        )
    # Within an epoch (config.checkpoint_every_steps): a later state than the epoch's start, with
    # the epoch's running sums, so that a resumed epoch ends exactly as an uninterrupted one.
    every = config.get("checkpoint_every_steps", 0)
    # (also where a SIGTERM or SIGINT saves the run at a step boundary)
    has_mid = every or (path / "checkpoints_mid").is_dir()
    mid = checkpoints.manager(path / "checkpoints_mid", keep=1) if has_mid else None
    epoch_start = {"sums": {"loss": 0.0, "accuracy": 0.0}, "skipped": int(state["skipped"])}
    resume_at = 0
    if mid is not None and (mid.latest_step() or -1) > int(state["step"]):
        restored = checkpoints.restore(
            mid,
            mid.latest_step(),
            {"state": state, "meta": progress.meta_arrays(meta), **_epoch_arrays(epoch_start)},
            "within-epoch checkpoint in this workdir",
        )
        state, meta = restored["state"], progress.meta_values(restored["meta"])
        epoch_start = {"sums": restored["sums"], "skipped": int(restored["skipped"])}
        resume_at = int(state["step"]) - meta["epoch"] * steps_per_epoch
        progress.log(
            f"[{config.stage}] resumed within epoch {meta['epoch'] + 1} at its step "
            f"{resume_at} (step {int(state['step'])})"
        )
    # A crash between a best/ save and the periodic save of the same epoch leaves best/ ahead of
    # the state resumed from (or started afresh); the deterministic replay writes it again.
    for ahead in [s for s in best.all_steps() if s > meta["epoch"]]:
        best.delete(ahead)
        progress.log(
            f"[{config.stage}] removed best/{ahead}: written after the last complete checkpoint"
        )

    if int(state["step"]) == 0:
        probe = data.validation if len(data.validation) else data.test
        guards.check_alpha_zero_is_backbone(
            task,
            steps.variables(state),
            input_pipeline.head(probe, config.eval_batch_size),
            config.model.dtype,
        )
    # Written only once the workdir's checkpoints are known to fit this config.
    progress.write_text(path / "config.json", config.to_json_best_effort(indent=2))
    skip = config.on_nonfinite == "skip"
    in_memory = isinstance(data.train, input_pipeline.Split)
    step_fn = place.compile(
        functools.partial(
            steps.train_step,
            task.loss_fn,
            tx,
            recipe.augment and in_memory,  # streamed data is augmented on the host
            batch,
            seed_key,
            skip_nonfinite=skip,
        ),
        donate_state=True,
    )
    batches = _Batches(data.train, place, seed_key, config.seed, batch, recipe.augment)
    writer = progress.Writer(path)
    step_log = progress.StepLog(
        config.stage, steps_per_epoch, recipe.num_epochs, writer, config.log_every_steps
    )
    epoch_times = []
    while not meta["done"] and meta["epoch"] < recipe.num_epochs:
        t0 = time.time()
        epoch = meta["epoch"]
        sums = epoch_start["sums"]
        skipped_before = epoch_start["skipped"]
        if skipped_before is None:  # a fresh epoch: skips counted from here
            skipped_before = int(state["skipped"])
        step_log.start_epoch(resume_at)
        first_step, finite = int(state["step"]), []
        steps_left = range(resume_at, steps_per_epoch)
        for i, step_args in zip(steps_left, batches.epoch(epoch, resume_at), strict=False):
            if stop.signum is not None:  # preempted: save here, exit; a rerun resumes here
                if not skip:
                    _check_finite(finite, first_step, epoch, ckpt)
                mid = mid or checkpoints.manager(path / "checkpoints_mid", keep=1)
                if mid.latest_step() != int(state["step"]):
                    epoch_now = {"sums": sums, "skipped": skipped_before}
                    saved = {"state": state, "meta": progress.meta_arrays(meta)}
                    checkpoints.save(mid, int(state["step"]), saved | _epoch_arrays(epoch_now))
                writer.close()
                stop.exit(config.stage, int(state["step"]))
            state, metrics = step_fn(state, task.frozen, *step_args)
            del step_args
            sums = {k: sums[k] + metrics[k] for k in sums}
            finite.append(metrics["finite"])  # read back only at the checks: no sync per step
            at_mid = bool(every) and (i + 1) % every == 0 and i + 1 < steps_per_epoch
            last_or_log = (i + 1) % config.log_every_steps == 0 or i + 1 == steps_per_epoch
            if not skip and (last_or_log or at_mid):
                _check_finite(finite, first_step, epoch, ckpt)
            if at_mid:
                epoch_now = {"sums": sums, "skipped": skipped_before}
                saved = {"state": state, "meta": progress.meta_arrays(meta)}
                checkpoints.save(mid, int(state["step"]), saved | _epoch_arrays(epoch_now))
            if step_log.due(i):
                skipped_now = int(state["skipped"]) - skipped_before
                step_log.report(epoch, i, int(state["step"]), sums, skipped_now)
        resume_at, epoch_start = 0, {"sums": {"loss": 0.0, "accuracy": 0.0}, "skipped": None}
        skipped = int(state["skipped"]) - skipped_before
        if skipped == steps_per_epoch:
            _check_finite(finite, first_step, epoch, ckpt, every=True)
        sums = {k: float(v) / (steps_per_epoch - skipped) for k, v in sums.items()}
        val = (
            evaluate(task, steps.variables(state), data.validation, config.eval_batch_size)
            if len(data.validation)
            else {"accuracy": sums["accuracy"], "loss": sums["loss"]}
        )
        meta["epoch"] = epoch + 1
        improved = val["accuracy"] > meta["best_val"]
        if improved:
            meta["best_val"], meta["bad_epochs"] = val["accuracy"], 0
            checkpoints.save(best, meta["epoch"], {"variables": steps.variables(state)})
        else:
            meta["bad_epochs"] += 1
        if meta["bad_epochs"] >= recipe.patience:
            meta["done"] = True
        epoch_times.append(time.time() - t0)
        if (
            meta["done"]
            or meta["epoch"] % config.checkpoint_every_epochs == 0
            or (meta["epoch"] == recipe.num_epochs)
        ):
            saved = {"state": state, "meta": progress.meta_arrays(meta)}
            checkpoints.save(ckpt, meta["epoch"], saved)
        remaining = (recipe.num_epochs - meta["epoch"]) * float(np.mean(epoch_times[-5:]))
        progress.log(
            f"[{config.stage}] epoch {meta['epoch']}/{recipe.num_epochs} "
            f"loss {sums['loss']:.4f} acc {sums['accuracy']:.4f} val_acc {val['accuracy']:.4f}"
            f"{' *' if improved else ''} | {steps_per_epoch / epoch_times[-1]:.1f} steps/s, "
            f"ETA {progress.duration(remaining)} (at most)"
            + (f" | skipped {skipped} non-finite updates" if skipped else ""),
            flush=True,
        )
        writer.scalars(
            int(state["step"]),
            {
                "train/loss": sums["loss"],
                "train/accuracy": sums["accuracy"],
                "val/accuracy": val["accuracy"],
                "val/loss": val["loss"],
                "steps_per_s": steps_per_epoch / epoch_times[-1],
            },
        )
    if meta["done"]:
        progress.log(
            f"[{config.stage}] early stopping: no better validation accuracy for "
            f"{recipe.patience} epochs"
        )
    writer.close()
    return _finish(config, task, state, data, best, path, meta, start_time)


class _Batches:
    """The train step's data arguments (images, labels, perm, index), step after step.

    In memory: the whole split stays on the device and each step gets the epoch's permutation
    and its index (a scalar from the host). Streamed: each step gets its batch, read and
    augmented on the host ahead of time, with an identity permutation and index 0.
    """

    def __init__(self, split, place, seed_key, seed: int, batch: int, augment: bool):
        self.split, self.place, self.seed = split, place, seed
        self.batch, self.augment = batch, augment
        self.perm_key = jax.random.fold_in(seed_key, 2)
        if isinstance(split, input_pipeline.Split):
            self.arrays = place.replicate((split.images, split.labels))
            self.perm_fn = jax.jit(steps.epoch_permutation, static_argnums=2)
        else:
            self.identity = place.replicate(jnp.arange(batch))

    def epoch(self, epoch: int, start: int = 0):
        """The epoch's steps from step ``start`` of the epoch on."""
        if isinstance(self.split, input_pipeline.Split):
            perm = self.perm_fn(self.perm_key, jnp.int32(epoch), len(self.split))
            for i in range(start, len(self.split) // self.batch):
                yield (*self.arrays, perm, jnp.int32(i))
        else:
            stream = self.split.train_batches(
                self.batch, self.seed, epoch, self.augment, self.place.process_shard, start
            )
            for x, y in stream:
                yield (*self.place.put_batch((x, y)), self.identity, jnp.int32(0))


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
            finetuned = config.attention_training.get("finetune_backbone", False)
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
    validate.check_config(config)
    parallel.initialize(config)
    if sweep.size(config):
        return sweep.train_sweep(config, workdir)
    if config.stage != "both":
        return train_stage(config, workdir)
    backbone_dir = os.path.join(workdir, "backbone")
    with config.unlocked():
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
