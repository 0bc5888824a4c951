"""What a training run trains: the tasks of each stage (losses, logits, initial parameters, the
frozen backbone) and their evaluation, apart from the loop that runs them (``train.train``).

The loop, sweeps (``train.sweep``), analyses (``train.tools``) and benchmarks import this
module; it imports none of them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from gattanet_jax import init_attention, two_pass, weights
from gattanet_jax import sites as sites_lib
from train import checkpoints, models, parallel, progress, steps
from train.errors import UserError


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between the stages."""

    stage: str
    params: dict  # initial trainable parameters
    loss_fn: steps.LossFn  # training mode (see steps.LossFn)
    logits_fn: steps.LogitsFn  # (variables, frozen, x) -> logits, inference mode
    recipe: ml_collections.ConfigDict  # backbone_training or attention_training
    frozen: dict  # {'backbone': the frozen backbone's variables} (attention, add-on), else {}
    baseline_logits_fn: steps.LogitsFn | None = None
    backbone_source: tuple[str, int | None, str] | None = None  # (dir or file, step, sha256)
    place: parallel.Placement = dataclasses.field(default_factory=lambda: parallel.Placement(None))
    extra: dict = dataclasses.field(default_factory=dict)  # initial non-parameter collections
    tx: optax.GradientTransformation | None = None  # default: Adam at recipe.learning_rate


def backbone_loss_fn(backbone, weight_decay: float) -> steps.LossFn:
    """The backbone's own training loss: all its parameters train, dropout on; BatchNorm
    statistics (in ``extra``) are updated by the forward pass."""

    def loss_fn(params, extra, frozen, x, y, rngs):
        del frozen  # the backbone's own dropout is drawn per call
        logits, updates = backbone.apply(
            {"params": params, **extra},
            x,
            train=True,
            rngs={"dropout": rngs["step"]},
            mutable=list(extra),
        )
        loss = jnp.mean(steps.cross_entropy(logits, y))
        return loss + weight_decay * steps.l2_penalty(params, ("kernel",)), (logits, updates)

    return loss_fn


def true_class_cues(example_keys, fraction: float, weight: float):
    """Per-example cue weights: ``weight`` for a ``fraction`` of the examples, else 0. Each
    example draws from its own key (one per example), however the batch is split."""
    u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 0x0C0E)))(example_keys)
    return jnp.where(u < fraction, jnp.float32(weight), jnp.float32(0))


def attention_loss_fn(
    backbone, attention, weight_decay: float, lesion=None, cue_fraction=0.0, cue_weight=0.0
) -> steps.LossFn:
    """GAttANet's training loss; ``frozen`` holds the backbone's variables (no gradient).
    ``lesion``: sites trained without modulation (a lesion string, or a float mask).
    ``cue_fraction`` > 0: that fraction of the examples is cued with its true class at
    ``cue_weight`` (needs ``attention.cue_classes``)."""

    def loss_fn(params, extra, frozen, x, y, rngs):
        variables = {"params": params, **extra}
        cues = (cue_fraction, cue_weight)
        out = training_two_pass(
            backbone,
            attention,
            variables,
            frozen["backbone"],
            x,
            y,
            rngs["examples"],
            lesion,
            cues,
        )
        loss = jnp.mean(steps.cross_entropy(out.logits, y))
        return loss + weight_decay * steps.l2_penalty(params, ("K", "Q")), (out.logits, out.updates)

    return loss_fn


def training_two_pass(
    backbone, attention, att_vars, bb_vars, x, y, example_keys, lesion, cues, **kw
):
    """The two-pass forward of a training step; ``cues`` = (fraction, weight): that fraction of
    the examples is cued with its true class at that weight (none if the fraction is 0)."""
    fraction, weight = cues
    cue = {}
    if fraction > 0:
        w = true_class_cues(example_keys, fraction, weight)
        cue = {"cue": y, "cue_weight": w}
    return two_pass(
        backbone,
        attention,
        att_vars,
        bb_vars,
        x,
        train=True,
        rng=example_keys,
        lesion=lesion,
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
    _check_trained_like(config, directory)
    if (epoch := checkpoints.unfinished_training(path)) is not None:
        progress.log(
            f"note: the backbone in {path} has not finished training (no results.json; its last "
            f"checkpoint is of epoch {epoch}): its best checkpoint so far, of epoch {step}, is "
            "the frozen backbone"
        )
    abstract = {"variables": models.backbone_shapes(backbone, config)}
    mngr = checkpoints.manager(directory, keep=1, create=False)
    sha = checkpoints.digest(directory, step)
    restored = checkpoints.restore(mngr, step, abstract, "backbone checkpoint")
    if bad := checkpoints.nonfinite(restored["variables"]):
        raise UserError(
            f"the backbone checkpoint at {directory}/{step} holds non-finite values (NaN or "
            f"infinity) in {len(bad)} arrays: {'; '.join(bad[:4])}: it is not a trained model"
        )
    logging.info("frozen backbone from %s/%d", directory, step)
    return restored["variables"], (directory, step, sha)


def _check_trained_like(config, checkpoint_dir) -> None:
    """A toy backbone trained on images of another scale (model.pixel_scale) is refused: frozen,
    it would see inputs it never saw in training. Fine-tuned with the attention system, it trains
    with its dropout again, so one trained with its dropout elsewhere (model.dropout_after) is
    refused too."""
    if config.model.backbone != "toy":
        return
    try:
        trained = json.loads((Path(checkpoint_dir).parent / "config.json").read_text())["model"]
        recorded = {
            "pixel_scale": float(trained.get("pixel_scale", 1.0)),
            "dropout_after": str(trained.get("dropout_after", "pooling")),
        }
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # no readable record of the backbone's config: nothing to compare
    fields = ["pixel_scale"]
    if config.attention_training.finetune_backbone:
        fields.append("dropout_after")
    for field in fields:
        ours = type(recorded[field])(config.model[field])
        if ours != recorded[field]:
            shown = f"{recorded[field]:g}" if field == "pixel_scale" else repr(recorded[field])
            mine = f"{ours:g}" if field == "pixel_scale" else repr(ours)
            raise UserError(
                f"the backbone in {config.backbone_checkpoint} was trained with model.{field}="
                f"{shown}; set --config.model.{field}={shown} (this config has {mine})"
            )


def attention_task(config, backbone, rng) -> Task:
    backbone_vars, source = load_backbone(config, backbone)
    attention = models.build_attention(config, backbone, backbone_vars)
    if config.parallel == "pmap":  # BatchNorm statistics of keys/queries over all devices
        attention = attention.clone(axis_name=parallel.AXIS)
    variables = dict(init_attention(attention, rng))
    params = variables.pop("params")
    lesion = config.attention.lesion or None
    try:
        sites_lib.lesion_mask(lesion, attention.sites)
    except ValueError as e:
        raise UserError(f"config.attention.lesion: {e}") from None
    a, t = config.attention, config.attention_training
    cue_fraction = a.cue_fraction if a.cue_classes else 0.0
    cue_weight = a.cue_weight

    def baseline(variables, frozen, x):
        del variables
        return backbone.apply(frozen["backbone"], x, train=False)

    if t.finetune_backbone:
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
        return two_pass(backbone, attention, variables, frozen["backbone"], x, lesion=lesion).logits

    return Task(
        "attention",
        params,
        loss_fn,
        logits_fn,
        config.attention_training,
        {"backbone": backbone_vars},
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
    mode = t.backbone_batch_stats
    lesion = config.attention.lesion or None
    a = config.attention
    cue_fraction = a.cue_fraction if a.cue_classes else 0.0
    stats = {k: v for k, v in backbone_vars.items() if k != "params"}
    # A copy: the training state is donated, the original stays for the baseline.
    params = {"attention": att_params, "backbone": jax.tree.map(jnp.copy, backbone_vars["params"])}
    extra = {}
    if att_extra:
        extra["attention_state"] = att_extra
    if mode == "update" and stats:
        extra["backbone_state"] = jax.tree.map(jnp.copy, stats)

    def loss_fn(params, extra, frozen, x, y, rngs):
        att_vars, bb_vars = split_finetuned({"params": params, **extra}, frozen)
        cues = (cue_fraction, a.cue_weight)
        out = training_two_pass(
            backbone,
            attention,
            att_vars,
            bb_vars,
            x,
            y,
            rngs["examples"],
            lesion,
            cues,
            train_backbone=True,
            backbone_batch_stats=mode,
        )
        new_extra = {}
        if "attention_state" in extra:
            new_extra["attention_state"] = out.updates
        if "backbone_state" in extra:
            new_extra["backbone_state"] = out.backbone_updates
        loss = jnp.mean(steps.cross_entropy(out.logits, y))
        l2 = steps.l2_penalty(params["attention"], ("K", "Q"))
        return loss + t.weight_decay * l2, (out.logits, new_extra)

    def logits_fn(variables, frozen, x):
        att_vars, bb_vars = split_finetuned(variables, frozen)
        return two_pass(backbone, attention, att_vars, bb_vars, x, lesion=lesion).logits

    def baseline(variables, frozen, x):
        del variables
        return backbone.apply(frozen["backbone"], x, train=False)

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
        tx=_two_adams(t.learning_rate, t.backbone_learning_rate),
    )


def _two_adams(attention_lr: float, backbone_lr: float) -> optax.GradientTransformation:
    """Adam (Keras' epsilon) with one learning rate for the 'attention' part of the parameters
    and another for the 'backbone' part."""
    return optax.multi_transform(
        {
            "attention": optax.adam(attention_lr, eps=1e-7),
            "backbone": optax.adam(backbone_lr, eps=1e-7),
        },
        lambda p: {k: jax.tree.map(lambda _, k=k: k, v) for k, v in p.items()},
    )


@functools.lru_cache(maxsize=16)
def _eval_step(logits_fn, batch_size: int, place: parallel.Placement):
    """One compiled evaluation step per (logits function, batch size), reused across epochs."""
    return place.compile(functools.partial(steps.eval_batch, logits_fn, batch_size))


def evaluate(task: Task, variables, split, batch_size: int, logits_fn=None) -> dict:
    step = _eval_step(logits_fn or task.logits_fn, batch_size, task.place)
    loss = correct = 0.0
    # each batch is the whole array given (padding labelled -1), read whole by every process:
    # one shape for every split, so one compiled step serves validation and test
    start = jnp.int32(0)
    for x, y in split.eval_batches(batch_size):
        images, labels = task.place.replicate((x, y))
        batch_loss, batch_correct = step(variables, task.frozen, images, labels, start)
        loss, correct = loss + batch_loss, correct + batch_correct
    n = len(split)
    return {"accuracy": float(correct) / n, "loss": float(loss) / n}
