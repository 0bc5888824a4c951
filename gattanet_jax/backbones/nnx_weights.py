"""Linen variables in and out of an NNX twin (a model with the same module paths and parameter
names): the project's NNX backbones load whatever the Linen ones load (torchvision state dicts
through ``gattanet_jax.weights``, the project's checkpoints) by way of this copy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gattanet_jax.nnx_backbone import variables_of


def _child(module, key: str):
    if isinstance(module, nnx.List):
        return module[int(key)]
    return getattr(module, key, None)


def load_linen_variables(model: nnx.Module, variables) -> None:
    """Copies every leaf of ``variables`` (collection -> module path -> name, as Linen nests
    them) into ``model``'s variable of the same path and name; one error listing every missing,
    unexpected and mis-shaped name."""
    missing, shapes, targets = [], [], []
    for collection, tree in variables.items():
        for path, value in jax.tree_util.tree_leaves_with_path(tree):
            keys = [str(getattr(k, "key", k)) for k in path]
            module = model
            for key in keys[:-1]:
                module = _child(module, key) if module is not None else None
            variable = getattr(module, keys[-1], None) if module is not None else None
            name = f"{collection}/{'/'.join(keys)}"
            if not isinstance(variable, nnx.Variable):
                missing.append(name)
            elif tuple(variable[...].shape) != tuple(jnp.shape(value)):
                shapes.append(f"{name} {tuple(jnp.shape(value))} -> {tuple(variable[...].shape)}")
            else:
                targets.append((variable, value))
    if missing or shapes:
        raise ValueError(
            f"these variables do not fit {type(model).__name__}: "
            + "; ".join([*(f"no {n}" for n in missing), *(f"shape {s}" for s in shapes)])
        )
    for variable, value in targets:
        variable[...] = jnp.asarray(value, variable[...].dtype)


def linen_variables(model: nnx.Module) -> dict:
    """The model's parameters and batch statistics nested as Linen's ('params', 'batch_stats')."""
    return variables_of(nnx.state(model))
