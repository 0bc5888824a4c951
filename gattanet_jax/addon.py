"""Feed-forward attention modules (GALA, SE, GSA) attached to a backbone's sites, as a pure
function of (add-on variables, backbone variables, images).

The same mechanism as GAttANet's modulation: the backbone is an ordinary Flax module; each site's
output y is reached through ``flax.linen.intercept_methods`` and becomes ``module(y)``. So GALA
goes after each conv block of the toy CNN (sites conv1..conv3) or before the residual addition of
a ResNet block (its last BatchNorm: sites 'layer*/*/bn2' for BasicBlocks, 'layer*/*/bn3' for
Bottlenecks), all without touching the backbone's code. With ``replace=True`` the site's module
does not run and ``module(x)`` of its input stands in for it: GSA in place of the toy CNN's
convolutions or of a Bottleneck's 3x3 convolution ('layer*/*/conv2'), i.e. GSA-ResNet. One pass,
unlike GAttANet's two.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gattanet_jax import sites as sites_lib
from gattanet_jax.attention import param_name


class AddOns(nn.Module):
    """One module per site, made by ``make(site, name)``; ``__call__(name, y, train)`` applies
    site ``name``'s module (its variables live under the site's name).

    Attributes:
      sites: the SiteSpecs the modules attach to.
      make: (SiteSpec, name) -> a Flax module (constructed with that name) mapping the site's
        output to a tensor of the same shape, e.g. ``lambda s, name: GALA(name=name)``; with
        ``replace``, mapping the site's input (``SiteSpec.input_shape``) to its output's shape.
        A module whose ``__call__`` takes ``train`` gets it (GSA's BatchNorm); others are
        called as ``module(y)``.
      replace: the modules stand in for the sites' modules instead of following them.
    """

    sites: tuple[sites_lib.SiteSpec, ...]
    make: Callable[[sites_lib.SiteSpec, str], nn.Module]
    replace: bool = False

    @nn.compact
    def __call__(self, name: str, y: jax.Array, train: bool = False) -> jax.Array:
        site = {s.name: s for s in self.sites}[name]
        module = self.make(site, param_name(name))
        if "train" in inspect.signature(type(module).__call__).parameters:
            return module(y, train=train)
        return module(y)

    def init_all(self, y_by_site: dict[str, jax.Array]) -> list[jax.Array]:
        """Runs every site's module once (for ``init``)."""
        return [self(s.name, y_by_site[s.name]) for s in self.sites]


def addon_modules(sites: Sequence[sites_lib.SiteSpec], make, replace: bool = False) -> AddOns:
    return AddOns(tuple(sites), make, replace)


def init_addons(addons: AddOns, rng: jax.Array) -> dict:
    """The modules' variables: 'params', and 'batch_stats' where a module has BatchNorm (GSA)."""

    def example(s):
        shape = s.input_shape if addons.replace else s.shape
        if shape is None:
            raise ValueError(f"site {s.name!r}: its module's input is not an array")
        return jnp.zeros((1, *shape), jnp.float32)

    example = {s.name: example(s) for s in addons.sites}
    return jax.jit(lambda r: addons.init(r, example, method=AddOns.init_all))(rng)


def forward(
    backbone: nn.Module,
    addons: AddOns,
    addon_vars,
    backbone_vars,
    images,
    *,
    train: bool = False,
    train_addons: bool | None = None,
    rngs: dict | None = None,
    mutable: Sequence[str] = (),
):
    """The backbone's logits with every site's output y replaced by its add-on module's output
    module(y) (with ``addons.replace``: the site's module replaced by module(x) of its input).

    Gradients reach ``addon_vars`` and, if the caller lets them, ``backbone_vars`` (trained
    together from scratch). ``train`` runs the backbone in training mode (its dropout, with
    ``rngs``; its BatchNorm statistics, made mutable by naming them in ``mutable``); a frozen
    backbone runs in inference mode, the default. ``train_addons`` (default: ``train``) runs
    the modules in training mode: those with BatchNorm normalise with the batch's statistics
    and update the running averages in ``addon_vars``' other collections.

    Returns the logits, or ``(logits, updates)`` when ``mutable`` names backbone collections
    or the modules have statistics to update in training mode: ``updates`` holds 'backbone'
    (the backbone's mutated collections) and 'addon' (the modules'), each where present.
    """
    names = [s.name for s in addons.sites]
    train_addons = train if train_addons is None else train_addons
    state = [k for k in addon_vars if k != "params"]
    update_addons = train_addons and bool(state)
    addon_updates = {k: dict(addon_vars[k]) for k in state}

    def apply_addon(name, y):
        if update_addons:
            out, new = addons.apply(addon_vars, name, y, True, mutable=state)
            for k in state:  # each call returns the whole collection; keep this site's part
                key = param_name(name)
                if key in new[k]:
                    addon_updates[k][key] = new[k][key]
        else:
            out = addons.apply(addon_vars, name, y, train_addons)
        return out if addons.replace else out.astype(y.dtype)

    out, seen = sites_lib.call(
        backbone, backbone_vars, images, names, apply_addon, replace=addons.replace, train=train,
        rngs=rngs, mutable=mutable,
    )  # fmt: skip
    sites_lib.check_seen(seen)
    if not mutable and not update_addons:
        return out
    logits, backbone_updates = out if mutable else (out, None)
    updates = {}
    if mutable:
        updates["backbone"] = dict(backbone_updates)
    if update_addons:
        updates["addon"] = addon_updates
    return logits, updates


def drop_replaced(params: dict, addons: AddOns) -> dict:
    """The backbone's parameters without those of the modules ``addons`` replaces (never read,
    so not trained or counted)."""
    if not addons.replace:
        return params
    out = jax.tree.map(lambda x: x, params)  # a copy of the nesting

    def drop(tree, path):
        if len(path) == 1:
            tree.pop(path[0], None)
        elif path[0] in tree:
            drop(tree[path[0]], path[1:])
            if not tree[path[0]]:
                del tree[path[0]]

    for s in addons.sites:
        drop(out, s.name.split("/"))
    return out
