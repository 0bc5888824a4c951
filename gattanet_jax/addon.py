"""Feed-forward attention modules (GALA, SE, GSA) attached to a backbone's sites, as a pure
function of (add-on variables, backbone variables, images).

The same mechanism as GAttANet's modulation: the backbone is an ordinary Flax module; each site's
output y (or, for a replacing module such as GSA, the site itself) is reached through
``flax.linen.intercept_methods`` and becomes ``module(y)``. So GALA goes after each conv block of
the toy CNN (sites conv1..conv3) or before the residual addition of a ResNet block (its last
BatchNorm, e.g. 'layer1/0/bn2'), all without touching the backbone's code. One pass, unlike
GAttANet's two.
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
        output to a tensor of the same shape, e.g. ``lambda s, name: GALA(name=name)``.
    """

    sites: tuple[sites_lib.SiteSpec, ...]
    make: Callable[[sites_lib.SiteSpec, str], nn.Module]

    @nn.compact
    def __call__(self, name: str, y: jax.Array) -> jax.Array:
        site = {s.name: s for s in self.sites}[name]
        return self.make(site, param_name(name))(y)

    def init_all(self, y_by_site: dict[str, jax.Array]) -> list[jax.Array]:
        """Runs every site's module once (for ``init``)."""
        return [self(s.name, y_by_site[s.name]) for s in self.sites]


def addon_modules(sites: Sequence[sites_lib.SiteSpec], make) -> AddOns:
    return AddOns(tuple(sites), make)


def init_addons(addons: AddOns, rng: jax.Array) -> dict:
    example = {s.name: jnp.zeros((1, *s.shape), jnp.float32) for s in addons.sites}
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
) -> jax.Array:
    """The backbone's logits with every site's output y replaced by its add-on module's output
    module(y). Gradients reach ``addon_vars`` and, if the caller lets them, ``backbone_vars``
    (trained together from scratch). ``train`` runs the backbone in training mode (its dropout,
    with ``rngs``); a frozen backbone runs with the default, inference mode."""

    def apply_addon(name, y):
        return addons.apply(addon_vars, name, y).astype(y.dtype)

    with sites_lib.intercept_sites([s.name for s in addons.sites], apply_addon) as seen:
        logits = backbone.apply(backbone_vars, images, train=train, rngs=rngs or {})
    sites_lib.check_seen(seen)
    return logits
