"""The attention system: a Flax module of its own, separate from any backbone.

Its variable tree holds, for every site, the key and query projections K, Q (c x d) with their
biases (d) and the site's modulation strength alpha. Given the sites' pass-1 activations it
returns keys, queries, the global query and the agreement maps; it never touches the backbone.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from gattanet_jax import agreement as agr
from gattanet_jax import dropout
from gattanet_jax.sites import SiteSpec


@flax.struct.dataclass
class Attention:
    """What the attention system computes from one pass: per-site dicts keyed by site name."""

    keys: dict[str, jax.Array]
    queries: dict[str, jax.Array]
    q_avg: jax.Array  # (B, d)
    gatta: dict[str, jax.Array]  # (B, H, W) at conv sites, (B, C) at dense sites
    alpha: dict[str, jax.Array]  # scalars


def param_name(site_name: str) -> str:
    """Site paths may contain '/', which Flax reserves in names."""
    return site_name.replace("/", ".")


class SiteParams(nn.Module):
    """The parameters of one site: K and Q (c x d) with their biases (d), and alpha."""

    channels: int
    d: int
    alpha_init: float = 0.0
    kernel_init: nn.initializers.Initializer = nn.initializers.glorot_uniform()

    @nn.compact
    def __call__(self) -> dict[str, jax.Array]:
        c, d = self.channels, self.d
        zeros = nn.initializers.zeros_init()
        return {
            "K": self.param("K", self.kernel_init, (c, d), jnp.float32),
            "K_bias": self.param("K_bias", zeros, (d,), jnp.float32),
            "Q": self.param("Q", self.kernel_init, (c, d), jnp.float32),
            "Q_bias": self.param("Q_bias", zeros, (d,), jnp.float32),
            "alpha": self.param(
                "alpha", nn.initializers.constant(self.alpha_init), (), jnp.float32
            ),
        }


class AttentionSystem(nn.Module):
    """GAttANet's global attention agreement system over a fixed list of sites.

    Attributes:
      sites: the sites, in the order of the lesion notation.
      d: attention dimension of keys and queries.
      dropout_rate: dropout on keys and queries while training (the paper: 0.25).
      alpha_init: initial alpha of every site. 0 starts training exactly at the backbone.
    """

    sites: tuple[SiteSpec, ...]
    d: int = 16
    dropout_rate: float = 0.25
    alpha_init: float = 0.0

    @nn.compact
    def __call__(
        self, site_acts: Mapping[str, jax.Array], train: bool = False, internals: bool = True
    ) -> Attention:
        """Keys, queries, q_avg and agreement maps from the sites' pass-1 activations.

        With ``internals=False`` outside training, keys and queries are not materialised (the
        returned dicts are empty) and q_avg and gatta come from the activations directly.
        """
        use_dropout = train and self.dropout_rate > 0
        materialise = internals or use_dropout
        key = self.make_rng("dropout") if use_dropout else None
        params, keys, queries, means = {}, {}, {}, []
        for i, site in enumerate(self.sites):
            p = SiteParams(site.channels, self.d, self.alpha_init, name=param_name(site.name))()
            acts = site_acts[site.name]
            p = {k: v.astype(acts.dtype) if v.ndim else v for k, v in p.items()}
            params[site.name] = p
            if materialise:
                k = agr.project(acts, p["K"], p["K_bias"], site.kind)
                q = agr.project(acts, p["Q"], p["Q_bias"], site.kind)
                if use_dropout:
                    k = dropout.dropout(jax.random.fold_in(key, 2 * i), k, self.dropout_rate)
                    q = dropout.dropout(jax.random.fold_in(key, 2 * i + 1), q, self.dropout_rate)
                keys[site.name], queries[site.name] = k, q
                means.append(agr.site_query(q))
            else:
                means.append(agr.mean_query(acts, p["Q"], p["Q_bias"], site.kind))
        q_avg = jnp.mean(jnp.stack(means), axis=0)  # Eq. 3
        gatta = {}
        for site in self.sites:
            if materialise:
                gatta[site.name] = agr.agreement(keys[site.name], q_avg)
            else:
                p = params[site.name]
                gatta[site.name] = agr.agreement_from_acts(
                    site_acts[site.name], p["K"], p["K_bias"], q_avg, site.kind
                )
        alpha = {name: p["alpha"] for name, p in params.items()}
        return Attention(keys=keys, queries=queries, q_avg=q_avg, gatta=gatta, alpha=alpha)


def example_activations(sites: tuple[SiteSpec, ...], batch: int = 1) -> dict[str, jax.Array]:
    return {s.name: jnp.zeros((batch, *s.shape), jnp.float32) for s in sites}


def init_attention(attention: AttentionSystem, rng: jax.Array) -> dict:
    """The attention system's variables (a tree of its own: never mixed with the backbone's)."""
    init = jax.jit(attention.init, static_argnames="train")
    return init({"params": rng}, example_activations(attention.sites), train=False)


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
