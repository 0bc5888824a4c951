"""GAttANet's equations as pure functions over arrays (VanRullen & Alamia 2021, Eqs. 1-5).

Everything is batch-first. A *conv site* carries activations of shape (B, H, W, C) and gets one
key/query vector per spatial position; a *dense site* carries (B, C) and gets one key/query vector
per unit. The functions work for any number of leading spatial axes between the batch and the
channel axis, so a conv site is simply a site with spatial axes and a dense site one without.

Shapes are checked with chex; nothing here knows about modules, sites or training.
"""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp


def conv_project(acts: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Eq. 1: k(x, y, m) = sum_c A(x, y, c) K(c, m) (+ b(m)).

    Args:
      acts: (B, *spatial, C) activations of a conv site.
      kernel: (C, d) projection K or Q.
      bias: optional (d,) bias.
    Returns:
      (B, *spatial, d) keys or queries, one vector per position.
    """
    chex.assert_rank(kernel, 2)
    chex.assert_axis_dimension(acts, -1, kernel.shape[0])
    out = jnp.einsum("...c,cd->...d", acts, kernel)
    if bias is not None:
        chex.assert_shape(bias, (kernel.shape[1],))
        out = out + bias
    return out


def dense_project(acts: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Eq. 2: k(c, m) = A(c) K(c, m) (+ b(m)): one d-vector per unit, no sum over units.

    Args:
      acts: (B, C) activations of a dense site.
      kernel: (C, d) per-unit projection K or Q.
      bias: optional (d,) bias, shared by the units of the site.
    Returns:
      (B, C, d) keys or queries.
    """
    chex.assert_rank(acts, 2)
    chex.assert_shape(kernel, (acts.shape[1], None))
    out = jnp.einsum("bc,cd->bcd", acts, kernel)
    if bias is not None:
        chex.assert_shape(bias, (kernel.shape[1],))
        out = out + bias
    return out


def project(acts: jax.Array, kernel: jax.Array, bias: jax.Array | None, kind: str) -> jax.Array:
    """Eq. 1 for kind 'conv', Eq. 2 for kind 'dense'."""
    if kind == "conv":
        return conv_project(acts, kernel, bias)
    if kind == "dense":
        return dense_project(acts, kernel, bias)
    raise ValueError(f"site kind must be 'conv' or 'dense', got {kind!r}")


def site_query(queries: jax.Array) -> jax.Array:
    """The mean of one site's queries over its positions (conv) or units (dense).

    Args:
      queries: (B, *positions, d) with any number of position axes (H, W for a conv site, C for a
        dense site).
    Returns:
      (B, d).
    """
    chex.assert_rank(queries, {3, 4, 5})
    return jnp.mean(queries, axis=tuple(range(1, queries.ndim - 1)))


def global_query(
    queries: Sequence[jax.Array], heads: int = 1, kinds: Sequence[str] | None = None
) -> jax.Array:
    """Eq. 3: q_avg = mean over sites of (mean over the site's positions or units of q).

    Every site weighs the same whatever its number of positions.

    Args:
      queries: per-site queries, each (B, *positions, d).
      heads, kinds: multi-head agreement (beyond the paper): with heads > 1 the queries are
        per head (``head_keys``) and ``kinds`` gives each site's kind; q_avg is then (B, h, d).
    Returns:
      (B, d) global query ((B, h, d) with heads > 1).
    """
    if not queries:
        raise ValueError("global_query needs the queries of at least one site")
    if heads == 1:
        return average_sites([site_query(q) for q in queries])
    return average_sites([head_site_query(q, kind) for q, kind in zip(queries, kinds, strict=True)])


def average_sites(means: Sequence[jax.Array]) -> jax.Array:
    """The last step of Eq. 3: the mean of the sites' mean queries, each (B, d) (or (B, h, d))."""
    chex.assert_equal_shape(means)
    return jnp.mean(jnp.stack(means, axis=0), axis=0)


def agreement(keys: jax.Array, q_avg: jax.Array) -> jax.Array:
    """Eq. 4: gatta(position) = k(position, :) . q_avg.

    Args:
      keys: (B, *positions, d).
      q_avg: (B, d).
    Returns:
      (B, *positions) agreement map.
    """
    chex.assert_rank(q_avg, 2)
    chex.assert_axis_dimension(keys, 0, q_avg.shape[0])
    chex.assert_axis_dimension(keys, -1, q_avg.shape[1])
    return jnp.einsum("b...d,bd->b...", keys, q_avg)


def modulation(gatta: jax.Array, alpha: jax.Array, kind: str) -> jax.Array:
    """The multiplicative factor of Eq. 5, (1 + alpha * gatta), shaped to broadcast over a site.

    For a conv site the factor is shared by all channels of a position: (B, H, W) -> (B, H, W, 1).
    For a dense site each unit has its own factor: (B, C) stays (B, C).
    """
    chex.assert_rank(alpha, 0)
    factor = 1.0 + alpha * gatta
    if kind == "conv":
        return factor[..., None]
    if kind == "dense":
        return factor
    raise ValueError(f"site kind must be 'conv' or 'dense', got {kind!r}")


def modulate(acts: jax.Array, gatta: jax.Array, alpha: jax.Array, kind: str) -> jax.Array:
    """Eq. 5: A := A * (1 + alpha * gatta).

    Args:
      acts: (B, *spatial, C) for a conv site, (B, C) for a dense site.
      gatta: (B, *spatial) for a conv site, (B, C) for a dense site.
      alpha: scalar modulation strength of the site.
      kind: 'conv' or 'dense'.
    """
    if kind == "conv":
        chex.assert_shape(gatta, acts.shape[:-1])
    else:
        chex.assert_equal_shape([gatta, acts])
    return acts * modulation(gatta, alpha, kind).astype(acts.dtype)


# --- the same quantities without materialising keys and queries ------------------------------
# Without dropout, Eqs. 1-4 are linear in K and Q, so the mean query of a site and its agreement
# map follow from the activations directly: mean_x(A(x) Q + b) = mean_x(A(x)) Q + b and
# k(x) . q_avg = A(x) . (K q_avg) + b . q_avg. Inference uses these (a (B, C) vector per site
# instead of a (B, H, W, d) map); tests check them against the definitions above.


def mean_query(acts: jax.Array, kernel: jax.Array, bias: jax.Array, kind: str) -> jax.Array:
    """``site_query(project(acts, kernel, bias, kind))`` without the per-position queries."""
    if kind == "conv":
        return conv_project(jnp.mean(acts, axis=tuple(range(1, acts.ndim - 1))), kernel, bias)
    if kind == "dense":
        chex.assert_rank(acts, 2)
        return jnp.einsum("bc,cd->bd", acts, kernel) / acts.shape[1] + bias
    raise ValueError(f"site kind must be 'conv' or 'dense', got {kind!r}")


def agreement_from_acts(
    acts: jax.Array, kernel: jax.Array, bias: jax.Array, q_avg: jax.Array, kind: str
) -> jax.Array:
    """``agreement(project(acts, kernel, bias, kind), q_avg)`` without the per-position keys."""
    chex.assert_rank(q_avg, 2)
    per_channel = jnp.einsum("cd,bd->bc", kernel, q_avg)  # K q_avg, one value per channel
    offset = jnp.einsum("d,bd->b", bias, q_avg)
    if kind == "conv":
        spatial = (None,) * (acts.ndim - 2)
        return jnp.einsum("b...c,bc->b...", acts, per_channel) + offset[(slice(None), *spatial)]
    if kind == "dense":
        return acts * per_channel + offset[:, None]
    raise ValueError(f"site kind must be 'conv' or 'dense', got {kind!r}")


# --- multi-head agreement (beyond the paper) ----------------------------------------------------
# h heads, each with its own keys, queries, global query and alpha. At a conv site head j reads
# every channel (its own (C, d) slice of K and Q) and modulates the j-th group of C / h channels;
# at a dense site the units are split into h groups, and group j's keys and queries (the rows of
# the per-unit K and Q) belong to head j. h = 1 is Eqs. 1-5.


def head_keys(keys: jax.Array, heads: int, kind: str) -> jax.Array:
    """Per-head keys or queries: conv (B, *spatial, h*d) -> (B, *spatial, h, d); dense
    (B, C, d) -> (B, h, C/h, d)."""
    if kind == "conv":
        return keys.reshape(*keys.shape[:-1], heads, keys.shape[-1] // heads)
    b, c, d = keys.shape
    return keys.reshape(b, heads, c // heads, d)


def head_site_query(queries: jax.Array, kind: str) -> jax.Array:
    """(B, h, d): each head's mean query over the site's positions (conv) or its units (dense)."""
    if kind == "conv":
        return jnp.mean(queries, axis=tuple(range(1, queries.ndim - 2)))
    return jnp.mean(queries, axis=2)


def head_agreement(keys: jax.Array, q_avg: jax.Array, kind: str) -> jax.Array:
    """Each head's agreement with its own global query q_avg (B, h, d): conv (B, *spatial, h),
    dense (B, C) (unit c with its head's q_avg)."""
    if kind == "conv":
        return jnp.einsum("b...hd,bhd->b...h", keys, q_avg)
    g = jnp.einsum("bhud,bhd->bhu", keys, q_avg)
    return g.reshape(g.shape[0], -1)


def head_modulation(gatta: jax.Array, alpha: jax.Array, kind: str, channels: int) -> jax.Array:
    """(1 + alpha_j * gatta_j) on head j's channels (conv: (B, *spatial, h) -> (B, *spatial, C))
    or units (dense: alpha (h,) repeated over each group of units)."""
    heads = alpha.shape[0]
    if kind == "conv":
        return jnp.repeat(1.0 + alpha * gatta, channels // heads, axis=-1)
    return 1.0 + jnp.repeat(alpha, channels // heads) * gatta
