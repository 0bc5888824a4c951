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
      q_avg_source: where each image's global query comes from. 'own': Eq. 3 over the image's
        own queries (the paper). Controls that keep everything else and remove the agreement
        with the image: 'learned', one trained vector ('q_avg_learned', drawn from N(0, 1)) for
        every image; 'shifted', the global query of the previous image in the batch (the
        first takes the last's), in training and test alike (under pmap: within each device's
        part of the batch).
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
    q_avg_source: str = "own"

    @nn.compact
    def __call__(
        self,
        site_acts: Mapping[str, jax.Array],
        train: bool = False,
        internals: bool = True,
        cue: jax.Array | None = None,
        cue_weight=0.0,
        dropout_keys: jax.Array | None = None,
    ) -> Attention:
        """Keys, queries, q_avg and agreement maps from the sites' pass-1 activations.

        Top-down cue: ``cue`` is a raw query vector per example (B, d), or a class index per
        example (B,) integers, looked up in the learned class embedding (``cue_classes``). It is
        mixed into the global query, q_avg := (1 - w) q_avg + w cue, with ``cue_weight`` w a
        scalar or one weight per example (B,) (0: uncued). Without a cue, q_avg is Eq. 3's.

        With ``internals=False`` outside training, keys and queries are not materialised (the
        returned dicts are empty) and q_avg and gatta come from the activations directly.
        Under ``batch_norm_kq`` with ``train``, the caller makes 'batch_stats' mutable.
        Key/query dropout (``train``) draws from the 'dropout' rng stream, or from
        ``dropout_keys``, one key per example (B,): each example's masks then depend on its own
        key alone, so a data-parallel shard given its slice of the keys drops exactly what the
        whole batch would.
        """
        self._check_heads()
        h = self.heads
        use_dropout = train and self.dropout_rate > 0
        materialise = internals or use_dropout or (train and self.batch_norm_kq) or h > 1
        key = None
        if use_dropout:
            key = self.make_rng("dropout") if dropout_keys is None else dropout_keys
        mods = {site.name: self._site_params(site) for site in self.sites}
        keys, queries, means = {}, {}, []
        for i, site in enumerate(self.sites):
            acts, mod = site_acts[site.name], mods[site.name]
            if not materialise:  # Eqs. 1-3 without per-position queries (see agreement.py)
                kernel, bias = (v.astype(acts.dtype) for v in mod.folded("Q"))
                means.append(agr.mean_query(acts, kernel, bias, site.kind))
                continue
            k, q = (self._project(mod, w, acts, site.kind, train) for w in ("K", "Q"))
            if use_dropout:
                k, q = _dropout_kq(key, i, k, q, self.dropout_rate)
            keys[site.name], queries[site.name] = k, q
        if materialise:
            kinds = [site.kind for site in self.sites]
            q_avg = agr.global_query(list(queries.values()), h, kinds)  # Eq. 3
        else:
            q_avg = agr.average_sites(means)
        q_avg = self._mix_cue(self._control(q_avg), cue, cue_weight)
        gatta = {}
        for site in self.sites:
            mod = mods[site.name]
            if not materialise:
                acts = site_acts[site.name]
                kernel, bias = (v.astype(acts.dtype) for v in mod.folded("K"))
                g = agr.agreement_from_acts(acts, kernel, bias, q_avg, site.kind)
            elif h == 1:
                g = agr.agreement(keys[site.name], q_avg)  # Eq. 4
            else:
                g = agr.head_agreement(keys[site.name], q_avg, site.kind)
            g = mod.normalize_gatta(g)
            gatta[site.name] = jnp.tanh(g) if self.bounded else g
        alpha = {name: mod.alpha for name, mod in mods.items()}
        return Attention(keys=keys, queries=queries, q_avg=q_avg, gatta=gatta, alpha=alpha)

    def _check_heads(self):
        if self.heads == 1:
            return
        if self.batch_norm_kq or self.layer_norm_gatta:
            raise ValueError("multi-head agreement does not support batch_norm_kq/layer_norm_gatta")
        for site in self.sites:
            if site.channels % self.heads:
                raise ValueError(
                    f"heads ({self.heads}) must divide the channels (units) of site "
                    f"{site.name!r} ({site.channels})"
                )

    def _site_params(self, site: SiteSpec) -> SiteParams:
        return SiteParams(
            site.channels,
            self.d,
            self.alpha_init,
            heads=self.heads,
            kind=site.kind,
            batch_norm=self.batch_norm_kq and site.kind == "conv",
            gatta_shape=gatta_shape(site) if self.layer_norm_gatta else None,
            axis_name=self.axis_name,
            name=param_name(site.name),
        )

    def _project(self, mod: SiteParams, which: str, acts, kind: str, train: bool) -> jax.Array:
        """A site's keys (which='K') or queries ('Q'): Eqs. 1-2 (normalised under batch_norm),
        (B, *positions, d); with h > 1 heads, per head (``agreement.head_keys``), a dense
        site's bias shared by the units of its head."""
        kernel = mod.K if which == "K" else mod.Q
        kernel, bias = kernel.astype(acts.dtype), mod.biases[which].astype(acts.dtype)
        h = self.heads
        if h == 1:
            return mod.normalize(which, agr.project(acts, kernel, bias, kind), train)
        if kind == "conv":
            return agr.head_keys(agr.conv_project(acts, kernel, bias), h, kind)
        per_head = agr.head_keys(agr.dense_project(acts, kernel), h, kind)
        return per_head + bias.reshape(h, 1, self.d)

    def _control(self, q_avg: jax.Array) -> jax.Array:
        """q_avg as ``q_avg_source`` says: the image's own (Eq. 3), or a control's."""
        if self.q_avg_source == "own":
            return q_avg
        if self.q_avg_source == "shifted":
            return jnp.roll(q_avg, 1, axis=0)
        if self.q_avg_source == "learned":
            init = nn.initializers.normal(1.0)
            learned = self.param("q_avg_learned", init, q_avg.shape[1:], jnp.float32)
            return jnp.broadcast_to(learned.astype(q_avg.dtype), q_avg.shape)
        raise ValueError(
            f"q_avg_source must be 'own', 'learned' or 'shifted', got {self.q_avg_source!r}"
        )

    def _mix_cue(self, q_avg: jax.Array, cue, cue_weight) -> jax.Array:
        """q_avg with a top-down cue mixed in (unchanged without a cue)."""
        width = self.heads * self.d
        table = None
        if self.cue_classes:
            table = self.param(
                "cue_embedding", nn.initializers.zeros_init(), (self.cue_classes, width)
            )
        if cue is None:
            return q_avg
        flat = q_avg.reshape(q_avg.shape[0], -1)
        return mix_cue(flat, cue_vector(cue, table, width), cue_weight).reshape(q_avg.shape)


def _dropout_kq(key, i, k, q, rate):
    k = dropout.dropout(dropout.fold_in(key, 2 * i), k, rate)
    return k, dropout.dropout(dropout.fold_in(key, 2 * i + 1), q, rate)


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
