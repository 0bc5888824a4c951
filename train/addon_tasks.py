"""The comparison systems' task: GALA, SE or GSA modules at the backbone's sites, as an add-on to
a frozen backbone (protocol (a)) or trained with it from scratch (protocol (b))."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from train import models, steps
from train.tasks import Task, load_backbone


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
    if a.from_scratch:
        return _addon_from_scratch(
            backbone, addons, addon_params, addon_state, backbone_vars, recipe
        )
    return _addon_on_frozen(
        backbone, addons, addon_params, addon_state, backbone_vars, source, recipe
    )


def _addon_split(variables):
    """(the modules' variables, the backbone's statistics) of an add-on model's variables."""
    module_vars = {"params": variables["params"], **variables.get("addon_state", {})}
    stats = {k: v for k, v in variables.items() if k not in ("params", "addon_state")}
    return module_vars, stats


def _addon_loss(weight_decay, params, extra, out, y):
    """The loss and (logits, new statistics) of ``addon.forward``'s output in training."""
    logits, updates = out if isinstance(out, tuple) else (out, {})
    new_extra = dict(updates.get("backbone", {}))
    if "addon_state" in extra:
        new_extra["addon_state"] = updates["addon"]
    loss = jnp.mean(steps.cross_entropy(logits, y))
    return loss + weight_decay * steps.l2_penalty(params, ("kernel",)), (logits, new_extra)


def _addon_from_scratch(backbone, addons, addon_params, addon_state, backbone_vars, recipe):
    """Protocol (b): backbone and modules trained together from their initialisation."""
    from gattanet_jax import addon

    stats = {k: v for k, v in backbone_vars.items() if k != "params"}  # BatchNorm's
    params = {
        "addon": addon_params,
        "backbone": addon.drop_replaced(backbone_vars["params"], addons),
    }

    def loss_fn(params, extra, frozen, x, y, rngs):
        del frozen
        module_vars, stats = _addon_split({"params": params["addon"], **extra})
        out = addon.forward(
            backbone,
            addons,
            module_vars,
            {"params": params["backbone"], **stats},
            x,
            train=True,
            rngs={"dropout": rngs["step"]},
            mutable=list(stats),
        )
        return _addon_loss(recipe.weight_decay, params, extra, out, y)

    def logits_fn(variables, frozen, x):
        del frozen
        p = variables["params"]
        module_vars, stats = _addon_split({**variables, "params": p["addon"]})
        return addon.forward(backbone, addons, module_vars, {"params": p["backbone"], **stats}, x)

    extra = {**stats, **addon_state}
    return Task("addon", params, loss_fn, logits_fn, recipe, {}, extra=extra)


def _addon_on_frozen(backbone, addons, addon_params, addon_state, backbone_vars, source, recipe):
    """Protocol (a): only the modules train, on the frozen backbone."""
    from gattanet_jax import addon

    def loss_fn(params, extra, frozen, x, y, rngs):
        del rngs
        module_vars, _ = _addon_split({"params": params, **extra})
        bb_vars = frozen["backbone"]
        out = addon.forward(backbone, addons, module_vars, bb_vars, x, train_addons=True)
        return _addon_loss(recipe.weight_decay, params, extra, out, y)

    def logits_fn(variables, frozen, x):
        module_vars = _addon_split(variables)[0]
        return addon.forward(backbone, addons, module_vars, frozen["backbone"], x)

    def baseline(variables, frozen, x):
        del variables
        return backbone.apply(frozen["backbone"], x, train=False)

    return Task(
        "addon",
        addon_params,
        loss_fn,
        logits_fn,
        recipe,
        {"backbone": backbone_vars},
        baseline,
        source,
        extra=addon_state,
    )
