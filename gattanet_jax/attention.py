"""The attention system: a Flax module of its own, separate from any backbone.

Its variable tree holds, for every site, the key and query projections K, Q (c x d) with their
biases (d) and the site's modulation strength alpha. Given the sites' pass-1 activations it
returns keys, queries, the global query and the agreement maps; it never touches the backbone.
"""

from __future__ import annotations

import math
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
    """The parameters of one site: K and Q (c x d), their biases (d), alpha, and optionally the
    ResNet variant's normalisations.

    Attributes:
      channels, d: K and Q are (channels, d).
      alpha_init: initial alpha.
      batch_norm: BatchNorm on keys and on queries over their d features (statistics over the
        batch and the site's positions or units; running averages in 'batch_stats'). K and Q then
        have no bias: the normalisation's offset replaces it.
      gatta_shape: if given, LayerNorm over the site's agreement map with one scale and one offset
        per position (or unit): the shape of the map without the batch axis.
      momentum, epsilon: of the BatchNorm (Keras' defaults, 0.99 and 1e-3).
      axis_name: under pmap, the device axis the BatchNorm's batch statistics are averaged over.
      heads, kind: multi-head agreement: with h > 1, a conv site's K and Q are (channels, h*d)
        (head j's in columns j*d .. j*d + d), a dense site's stay (channels, d) (per unit); the
        biases are (h*d,) and alpha is (h,).
    """

    channels: int
    d: int
    alpha_init: float = 0.0
    heads: int = 1
    kind: str = "conv"
    kernel_init: nn.initializers.Initializer = nn.initializers.glorot_uniform()
    batch_norm: bool = False
    gatta_shape: tuple[int, ...] | None = None
    momentum: float = 0.99
    epsilon: float = 1e-3
    axis_name: str | None = None

    def setup(self):
        c, d, h = self.channels, self.d, self.heads
        zeros, ones = nn.initializers.zeros_init(), nn.initializers.ones_init()
        cols = h * d if self.kind == "conv" else d
        # Creation order K, K_bias, Q, Q_bias, alpha: each parameter's init key depends on it.
        self.K = self.param("K", self.kernel_init, (c, cols), jnp.float32)
        k_bias = None if self.batch_norm else self.param("K_bias", zeros, (h * d,), jnp.float32)
        self.Q = self.param("Q", self.kernel_init, (c, cols), jnp.float32)
        q_bias = None if self.batch_norm else self.param("Q_bias", zeros, (h * d,), jnp.float32)
        no_bias = jnp.zeros((d,), jnp.float32)  # under batch_norm the offset replaces the bias
        self.biases = {
            "K": no_bias if k_bias is None else k_bias,
            "Q": no_bias if q_bias is None else q_bias,
        }
        if self.batch_norm:
            self.norms = {
                w: (
                    self.param(f"{w}_bn_scale", ones, (d,), jnp.float32),
                    self.param(f"{w}_bn_offset", zeros, (d,), jnp.float32),
                    self.variable("batch_stats", f"{w}_mean", jnp.zeros, (d,), jnp.float32),
                    self.variable("batch_stats", f"{w}_var", jnp.ones, (d,), jnp.float32),
                )
                for w in ("K", "Q")
            }
        alpha_shape = () if h == 1 else (h,)
        self.alpha = self.param(
            "alpha", nn.initializers.constant(self.alpha_init), alpha_shape, jnp.float32
        )
        if self.gatta_shape is not None:
            self.gatta_scale = self.param("gatta_scale", ones, self.gatta_shape, jnp.float32)
            self.gatta_offset = self.param("gatta_offset", zeros, self.gatta_shape, jnp.float32)

    def __call__(self) -> dict[str, jax.Array]:
        """K, K_bias, Q, Q_bias and alpha (biases are zeros under batch_norm)."""
        return {
            "K": self.K,
            "K_bias": self.biases["K"],
            "Q": self.Q,
            "Q_bias": self.biases["Q"],
            "alpha": self.alpha,
        }

    def normalize(self, which: str, x: jax.Array, train: bool) -> jax.Array:
        """BatchNorm of keys (which='K') or queries ('Q') x (B, *positions, d); the identity
        without batch_norm. Training uses (and records) the batch's statistics."""
        if not self.batch_norm:
            return x
        scale, offset, ra_mean, ra_var = self.norms[which]
        if train:
            axes = tuple(range(x.ndim - 1))
            x32 = x.astype(jnp.float32)
            mean, mean_sq = jnp.mean(x32, axes), jnp.mean(jnp.square(x32), axes)
            if self.axis_name is not None:  # equal shards: the global batch's statistics
                mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
            var = mean_sq - jnp.square(mean)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
                ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
        else:
            mean, var = ra_mean.value, ra_var.value
        s = scale * jax.lax.rsqrt(var + self.epsilon)
        return (x * s.astype(x.dtype) + (offset - mean * s).astype(x.dtype)).astype(x.dtype)

    def folded(self, which: str) -> tuple[jax.Array, jax.Array]:
        """(kernel, bias) of the projection followed by the inference-mode normalisation: one
        affine map, so inference needs no per-position keys or queries."""
        kernel, bias = (self.K, self.biases["K"]) if which == "K" else (self.Q, self.biases["Q"])
        if not self.batch_norm:
            return kernel, bias
        scale, offset, ra_mean, ra_var = self.norms[which]
        s = scale * jax.lax.rsqrt(ra_var.value + self.epsilon)
        return kernel * s, (bias - ra_mean.value) * s + offset

    def normalize_gatta(self, gatta: jax.Array, epsilon: float = 1e-5) -> jax.Array:
        """LayerNorm over the agreement map (B, *positions) with per-position scale and offset;
        the identity without gatta_shape."""
        if self.gatta_shape is None:
            return gatta
        axes = tuple(range(1, gatta.ndim))
        g = gatta.astype(jnp.float32)
        mean = jnp.mean(g, axes, keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axes, keepdims=True)
        out = (g - mean) * jax.lax.rsqrt(var + epsilon) * self.gatta_scale + self.gatta_offset
        return out.astype(gatta.dtype)


class AttentionSystem(nn.Module):
    """GAttANet's global attention agreement system over a fixed list of sites.

    Attributes:
      sites: the sites, in the order of the lesion notation.
      d: attention dimension of keys and queries.
      dropout_rate: dropout on keys and queries while training (the paper: 0.25).
      alpha_init: initial alpha of every site. 0 starts training exactly at the backbone.
      batch_norm_kq: the paper's ResNet variant: BatchNorm on keys and queries at conv sites;
        dense sites keep plain biases. This reading of the paper makes all eight of Table 1's
        ResNet attention parameter counts exact (BatchNorm at the dense sites too would add 4d
        parameters and miss six of them by 0.1K).
      layer_norm_gatta: the paper's ResNet variant: LayerNorm on each site's agreement map, with
        a scale and an offset per position (conv sites) or unit (dense sites).
      axis_name: set under pmap: BatchNorm statistics are averaged over this device axis.
      iterations: modulated passes T of ``two_pass`` (the paper: 1; see there).
      bounded: agreement maps pass through tanh, so each modulation factor stays within
        1 +- |alpha| (a stabiliser for several iterations; off in the paper).
      cue_classes: > 0 adds a learned class embedding (cue_classes, d), 'cue_embedding', for
        top-down cues given as class indices (zeros at init).
      heads: multi-head agreement (see ``agreement.head_agreement``): h heads, each with its
        own K, Q, global query and alpha, each modulating a group of channels (units at dense
        sites); 1 is the paper's model. Cues are then (B, h*d) vectors (embedding (classes,
        h*d)), one d-vector per head.
    """

    sites: tuple[SiteSpec, ...]
    d: int = 16
    dropout_rate: float = 0.25
    alpha_init: float = 0.0
    batch_norm_kq: bool = False
    layer_norm_gatta: bool = False
    axis_name: str | None = None
    iterations: int = 1
    bounded: bool = False
    cue_classes: int = 0
    heads: int = 1

    @nn.compact
    def __call__(
        self,
        site_acts: Mapping[str, jax.Array],
        train: bool = False,
        internals: bool = True,
        example_offset=0,
        cue: jax.Array | None = None,
        cue_weight=0.0,
    ) -> Attention:
        """Keys, queries, q_avg and agreement maps from the sites' pass-1 activations.

        Top-down cue: ``cue`` is a raw query vector per example (B, d), or a class index per
        example (B,) integers, looked up in the learned class embedding (``cue_classes``). It is
        mixed into the global query, q_avg := (1 - w) q_avg + w cue, with ``cue_weight`` w a
        scalar or one weight per example (B,) (0: uncued). Without a cue, q_avg is Eq. 3's.

        With ``internals=False`` outside training, keys and queries are not materialised (the
        returned dicts are empty) and q_avg and gatta come from the activations directly.
        Under ``batch_norm_kq`` with ``train``, the caller makes 'batch_stats' mutable.
        ``example_offset``: the index of the first example of this batch in the global batch
        (data-parallel shards), so that each example gets the same dropout masks however the
        batch is split.
        """
        if self.heads > 1:
            return self._multi_head(site_acts, train, example_offset, cue, cue_weight)
        use_dropout = train and self.dropout_rate > 0
        materialise = internals or use_dropout or (train and self.batch_norm_kq)
        key = self.make_rng("dropout") if use_dropout else None
        mods, params, keys, queries, means = {}, {}, {}, {}, []
        for i, site in enumerate(self.sites):
            mod = SiteParams(
                site.channels,
                self.d,
                self.alpha_init,
                batch_norm=self.batch_norm_kq and site.kind == "conv",
                gatta_shape=gatta_shape(site) if self.layer_norm_gatta else None,
                axis_name=self.axis_name,
                name=param_name(site.name),
            )
            mods[site.name] = mod
            acts = site_acts[site.name]
            p = {k: v.astype(acts.dtype) if v.ndim else v for k, v in mod().items()}
            params[site.name] = p
            if materialise:
                k = mod.normalize("K", agr.project(acts, p["K"], p["K_bias"], site.kind), train)
                q = mod.normalize("Q", agr.project(acts, p["Q"], p["Q_bias"], site.kind), train)
                if use_dropout:
                    k, q = _dropout_kq(key, i, k, q, self.dropout_rate, example_offset)
                keys[site.name], queries[site.name] = k, q
                means.append(agr.site_query(q))
            else:
                kernel, bias = (v.astype(acts.dtype) for v in mod.folded("Q"))
                means.append(agr.mean_query(acts, kernel, bias, site.kind))
        q_avg = jnp.mean(jnp.stack(means), axis=0)  # Eq. 3
        table = None
        if self.cue_classes:
            table = self.param(
                "cue_embedding", nn.initializers.zeros_init(), (self.cue_classes, self.d)
            )
        if cue is not None:
            q_avg = mix_cue(q_avg, cue_vector(cue, table, self.d), cue_weight)
        gatta = {}
        for site in self.sites:
            if materialise:
                g = agr.agreement(keys[site.name], q_avg)
            else:
                acts = site_acts[site.name]
                kernel, bias = (v.astype(acts.dtype) for v in mods[site.name].folded("K"))
                g = agr.agreement_from_acts(acts, kernel, bias, q_avg, site.kind)
            g = mods[site.name].normalize_gatta(g)
            gatta[site.name] = jnp.tanh(g) if self.bounded else g
        alpha = {name: p["alpha"] for name, p in params.items()}
        return Attention(keys=keys, queries=queries, q_avg=q_avg, gatta=gatta, alpha=alpha)

    def _multi_head(self, site_acts, train, example_offset, cue, cue_weight) -> Attention:
        """``__call__`` with h > 1 heads (keys and queries always materialised)."""
        h = self.heads
        if self.batch_norm_kq or self.layer_norm_gatta:
            raise ValueError("multi-head agreement does not support batch_norm_kq/layer_norm_gatta")
        for site in self.sites:
            if site.channels % h:
                raise ValueError(
                    f"heads ({h}) must divide the channels (units) of site {site.name!r} "
                    f"({site.channels})"
                )
        use_dropout = train and self.dropout_rate > 0
        key = self.make_rng("dropout") if use_dropout else None
        keys, queries, alpha, means = {}, {}, {}, []
        for i, site in enumerate(self.sites):
            mod = SiteParams(
                site.channels, self.d, self.alpha_init, heads=h, kind=site.kind,
                name=param_name(site.name),
            )  # fmt: skip
            acts = site_acts[site.name]
            p = {k: v.astype(acts.dtype) if v.ndim > 1 else v for k, v in mod().items()}
            if site.kind == "conv":
                k = agr.conv_project(acts, p["K"], p["K_bias"].astype(acts.dtype))
                q = agr.conv_project(acts, p["Q"], p["Q_bias"].astype(acts.dtype))
            else:
                k = agr.dense_project(acts, p["K"])
                q = agr.dense_project(acts, p["Q"])
            if use_dropout:
                k, q = _dropout_kq(key, i, k, q, self.dropout_rate, example_offset)
            k, q = agr.head_keys(k, h, site.kind), agr.head_keys(q, h, site.kind)
            if site.kind == "dense":  # one bias per head, shared by its units
                kb, qb = (
                    p[b].reshape(h, 1, self.d).astype(acts.dtype) for b in ("K_bias", "Q_bias")
                )
                k, q = k + kb, q + qb
            keys[site.name], queries[site.name] = k, q
            alpha[site.name] = p["alpha"]
            means.append(agr.head_site_query(q, site.kind))
        q_avg = jnp.mean(jnp.stack(means), axis=0)  # (B, h, d)
        table = None
        if self.cue_classes:
            table = self.param(
                "cue_embedding", nn.initializers.zeros_init(), (self.cue_classes, h * self.d)
            )
        if cue is not None:
            flat = q_avg.reshape(q_avg.shape[0], -1)
            q_avg = mix_cue(flat, cue_vector(cue, table, h * self.d), cue_weight).reshape(
                q_avg.shape
            )
        gatta = {}
        for site in self.sites:
            g = agr.head_agreement(keys[site.name], q_avg, site.kind)
            gatta[site.name] = jnp.tanh(g) if self.bounded else g
        return Attention(keys=keys, queries=queries, q_avg=q_avg, gatta=gatta, alpha=alpha)


def _dropout_kq(key, i, k, q, rate, example_offset):
    start = example_offset * math.prod(k.shape[1:])
    k = dropout.dropout(jax.random.fold_in(key, 2 * i), k, rate, start)
    return k, dropout.dropout(jax.random.fold_in(key, 2 * i + 1), q, rate, start)


def cue_vector(cue: jax.Array, table: jax.Array | None, d: int) -> jax.Array:
    """A top-down cue as a (B, d) query: raw vectors as they are, class indices looked up."""
    cue = jnp.asarray(cue)
    if jnp.issubdtype(cue.dtype, jnp.integer):
        if table is None:
            raise ValueError("a class-index cue needs AttentionSystem(cue_classes=...) > 0")
        if cue.ndim != 1:
            raise ValueError(f"a class-index cue must have shape (batch,), got {cue.shape}")
        return table[cue]
    if cue.ndim != 2 or cue.shape[1] != d:
        raise ValueError(f"a query-vector cue must have shape (batch, {d}), got {cue.shape}")
    return cue


def mix_cue(q_avg: jax.Array, cue: jax.Array, weight) -> jax.Array:
    """(1 - w) q_avg + w cue, w a scalar or (B,)."""
    w = jnp.asarray(weight, jnp.float32)
    if w.ndim == 1:
        w = w[:, None]
    elif w.ndim:
        raise ValueError(f"cue_weight must be a scalar or (batch,), got shape {w.shape}")
    return ((1 - w) * q_avg + w * cue.astype(jnp.float32)).astype(q_avg.dtype)


def gatta_shape(site: SiteSpec) -> tuple[int, ...]:
    """The shape of a site's agreement map without the batch axis: (H, W) or (C,)."""
    return site.shape[:-1] if site.kind == "conv" else site.shape


def example_activations(sites: tuple[SiteSpec, ...], batch: int = 1) -> dict[str, jax.Array]:
    return {s.name: jnp.zeros((batch, *s.shape), jnp.float32) for s in sites}


def init_attention(attention: AttentionSystem, rng: jax.Array) -> dict:
    """The attention system's variables (a tree of its own: never mixed with the backbone's)."""
    init = jax.jit(attention.init, static_argnames="train")
    return init({"params": rng}, example_activations(attention.sites), train=False)


def site_alphas(params: Mapping) -> dict[str, jax.Array]:
    """{site parameter name: alpha} of an attention parameter tree (other entries, such as the
    cue embedding, skipped)."""
    return {k: v["alpha"] for k, v in params.items() if isinstance(v, Mapping) and "alpha" in v}


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
