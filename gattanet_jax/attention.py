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


class SiteProjection(nn.Module):
    """K and Q of one site, with biases and alpha (Eqs. 1-2)."""

    kind: str
    d: int
    alpha_init: float = 0.0
    kernel_init: nn.initializers.Initializer = nn.initializers.glorot_uniform()

    @nn.compact
    def __call__(self, acts: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        c = acts.shape[-1]
        dtype = acts.dtype
        kernel_k = self.param("K", self.kernel_init, (c, self.d), jnp.float32)
        bias_k = self.param("K_bias", nn.initializers.zeros_init(), (self.d,), jnp.float32)
        kernel_q = self.param("Q", self.kernel_init, (c, self.d), jnp.float32)
        bias_q = self.param("Q_bias", nn.initializers.zeros_init(), (self.d,), jnp.float32)
        alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), (), jnp.float32)
        keys = agr.project(acts, kernel_k.astype(dtype), bias_k.astype(dtype), self.kind)
        queries = agr.project(acts, kernel_q.astype(dtype), bias_q.astype(dtype), self.kind)
        return keys, queries, alpha


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
    def __call__(self, site_acts: Mapping[str, jax.Array], train: bool = False) -> Attention:
        keys, queries, alpha = {}, {}, {}
        drop = nn.Dropout(self.dropout_rate, deterministic=not train)
        for site in self.sites:
            proj = SiteProjection(site.kind, self.d, self.alpha_init, name=param_name(site.name))
            k, q, a = proj(site_acts[site.name])
            keys[site.name], queries[site.name], alpha[site.name] = drop(k), drop(q), a
        q_avg = agr.global_query([queries[s.name] for s in self.sites])
        gatta = {s.name: agr.agreement(keys[s.name], q_avg) for s in self.sites}
        return Attention(keys=keys, queries=queries, q_avg=q_avg, gatta=gatta, alpha=alpha)


def example_activations(sites: tuple[SiteSpec, ...], batch: int = 1) -> dict[str, jax.Array]:
    return {s.name: jnp.zeros((batch, *s.shape), jnp.float32) for s in sites}


def init_attention(attention: AttentionSystem, rng: jax.Array) -> dict:
    """The attention system's variables (a tree of its own: never mixed with the backbone's)."""
    init = jax.jit(attention.init, static_argnames="train")
    return init({"params": rng}, example_activations(attention.sites), train=False)


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
