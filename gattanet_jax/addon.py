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

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gattanet_jax import sites as sites_lib
from gattanet_jax.attention import param_name


class AddOns(nn.Module):
    """One module per site, made by ``make(site, name)``; ``__call__(name, y)`` applies site
    ``name``'s module (its parameters live under the site's name).

    Attributes:
      sites: the SiteSpecs the modules attach to.
      make: (SiteSpec, name) -> a Flax module (constructed with that name) mapping the site's
        output to a tensor of the same shape, e.g. ``lambda s, name: GALA(name=name)``; with
        ``replace``, mapping the site's input (``SiteSpec.input_shape``) to its output's shape.
      replace: the modules stand in for the sites' modules instead of following them.
    """

    sites: tuple[sites_lib.SiteSpec, ...]
    make: Callable[[sites_lib.SiteSpec, str], nn.Module]
    replace: bool = False

    @nn.compact
    def __call__(self, name: str, y: jax.Array) -> jax.Array:
        site = {s.name: s for s in self.sites}[name]
        return self.make(site, param_name(name))(y)

    def init_all(self, y_by_site: dict[str, jax.Array]) -> list[jax.Array]:
        """Runs every site's module once (for ``init``)."""
        return [self(s.name, y_by_site[s.name]) for s in self.sites]


def addon_modules(sites: Sequence[sites_lib.SiteSpec], make, replace: bool = False) -> AddOns:
    return AddOns(tuple(sites), make, replace)


def init_addons(addons: AddOns, rng: jax.Array) -> dict:
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
    rngs: dict | None = None,
    mutable: Sequence[str] = (),
):
    """The backbone's logits with every site's output y replaced by its add-on module's output
    module(y) (with ``addons.replace``: the site's module replaced by module(x) of its input).
    Gradients reach ``addon_vars`` and, if the caller lets them, ``backbone_vars`` (trained
    together from scratch). ``train`` runs the backbone in training mode (its dropout, with
    ``rngs``; its BatchNorm statistics, returned as ``(logits, updates)`` when ``mutable``
    names them); a frozen backbone runs with the default, inference mode."""
    names = [s.name for s in addons.sites]

    def apply_addon(name, y):
        out = addons.apply(addon_vars, name, y)
        return out if addons.replace else out.astype(y.dtype)

    with sites_lib.intercept_sites(names, apply_addon, replace=addons.replace) as seen:
        out = backbone.apply(
            backbone_vars, images, train=train, rngs=rngs or {}, mutable=list(mutable) or False
        )
    sites_lib.check_seen(seen)
    return out


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
