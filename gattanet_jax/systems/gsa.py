"""GSA, the global self-attention module (Shen et al. 2020): content attention plus axial
positional attention with relative position embeddings, outputs summed.

For X (B, H, W, C_in), 1x1 projections give queries and keys (d_k channels) and values (d_out),
split into ``heads`` groups. As the paper's Appendix B writes it:
  content     C = softmax_over_positions(K)^T V   (d_k x d_v per head: the global context)
              F_c(p) = q(p) C                     linear in the number of positions
  positional  along columns, a BatchNorm, then along rows, with no softmax:
              F_col(y, x) = sum_y' (q(y, x) . r_col[y' - y]) v(y', x)
              F_pos(y, x) = sum_x' (q(y, x) . r_row[x' - x]) BN(F_col)(y, x')
              r_col, r_row: learned embeddings of the 2L - 1 relative offsets -(L-1) .. L-1
  output      F_c + F_pos
The module's one softmax is the content branch's, over the keys' positions. The BatchNorm
normalises each of the d_out value channels of F_col (statistics over batch and positions in
training, running averages in 'batch_stats' otherwise). The pure functions are tested against
loops over positions written from these equations (tests/test_systems.py).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def content_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q, k (B, H, W, h, dk), v (B, H, W, h, dv) -> (B, H, W, h, dv)."""
    b, hh, ww, heads, dk = k.shape
    keys = jax.nn.softmax(k.reshape(b, hh * ww, heads, dk), axis=1)  # over positions
    context = jnp.einsum("bnhk,bnhv->bhkv", keys, v.reshape(b, hh * ww, heads, -1))
    return jnp.einsum("byxhk,bhkv->byxhv", q, context)


def relative_table(table: jax.Array, length: int) -> jax.Array:
    """r[j - i] for every pair (i, j) of ``length`` positions: (L_i, L_j, dk), from ``table``
    (2L - 1, dk) whose row L - 1 + o holds offset o."""
    if table.shape[0] != 2 * length - 1:
        raise ValueError(f"need {2 * length - 1} relative embeddings, got {table.shape[0]}")
    offsets = jnp.arange(length)[None, :] - jnp.arange(length)[:, None]  # [i, j] = j - i
    return table[offsets + length - 1]


def axial_step(q: jax.Array, v: jax.Array, table: jax.Array, axis: int) -> jax.Array:
    """One axial step of positional attention: out(y, x) = sum over the L positions j of the
    pixel's column (axis 1) or row (axis 2) of (q(y, x) . r[j - i]) v at j; no normalisation.

    Computed as sum_k q_k(y, x) (sum_j r_k[j - i] v(j)): the inner sum is one matrix product of
    the (L x dk, L) relative table with the values, which XLA runs faster than the batch of
    small products of the logits form (the logits q . r[j - i] first, then their products with
    v: the same sum, reassociated)."""
    r = relative_table(table, q.shape[axis])
    if axis == 1:
        a = jnp.einsum("yjk,bjxhv->byxhkv", r, v)
    else:
        a = jnp.einsum("xjk,byjhv->byxhkv", r, v)
    return jnp.einsum("byxhk,byxhkv->byxhv", q, a)


def positional_attention(
    q: jax.Array,
    v: jax.Array,
    r_col: jax.Array,
    r_row: jax.Array,
    normalize: Callable[[jax.Array], jax.Array] = lambda t: t,
) -> jax.Array:
    """Axial positional attention: along columns, ``normalize`` (the module's BatchNorm), then
    along rows on the column output."""
    return axial_step(q, normalize(axial_step(q, v, r_col, 1)), r_row, 2)


def dense_2d(layer: nn.Dense, x: jax.Array) -> jax.Array:
    """``layer`` over the last axis of ``x`` (B, H, W, C), applied to the positions as one (B H W,
    C) matrix: XLA's CPU backend computes that product and its gradients several times faster
    than the same product over a 4-D array."""
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


class GSA(nn.Module):
    """A GSA module: (B, H, W, C_in) -> (B, H, W, features).

    Attributes:
      features: output channels (d_out); heads: attention heads (dividing d_k and d_out);
      key_features: d_k (default: features // 2, at least one channel per head).
      momentum, epsilon: of the BatchNorm between the column and row steps.
    Call with ``train=True`` to normalise with the batch's statistics (then make 'batch_stats'
    mutable); inference uses the running averages.
    """

    features: int
    heads: int = 8
    key_features: int | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        b, hh, ww, _ = x.shape
        dk = self.key_features or max(self.heads, self.features // 2)
        if dk % self.heads or self.features % self.heads:
            raise ValueError(
                f"GSA: heads ({self.heads}) must divide key_features ({dk}) and features "
                f"({self.features})"
            )
        # 1x1 projections as dense layers over the channel axis (faster than 1x1 convs on CPU)
        proj = dense_2d(nn.Dense(2 * dk + self.features, use_bias=False, name="qkv"), x)
        q, k, v = jnp.split(proj, [dk, 2 * dk], axis=-1)
        split = lambda t: t.reshape(b, hh, ww, self.heads, -1)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        hk = dk // self.heads
        init = nn.initializers.normal(hk**-0.5)
        r_col = self.param("rel_col", init, (2 * hh - 1, hk))
        r_row = self.param("rel_row", init, (2 * ww - 1, hk))
        norm = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.momentum,
            epsilon=self.epsilon,
            name="col_norm",
        )

        def normalize(f_col):  # over the d_out value channels, heads together
            return norm(f_col.reshape(b, hh, ww, self.features)).reshape(f_col.shape)

        out = content_attention(q, k, v) + positional_attention(q, v, r_col, r_row, normalize)
        return out.reshape(b, hh, ww, self.features)


class ResidualGSA(nn.Module):
    """y + W_out GSA(y): a GSA module added to a site's output (the add-on protocol).

    GSA runs at ``features // reduction`` channels (keys at half that), a 1x1 projection
    ``out`` maps back to ``features``; ``out`` starts at zero, so the untrained module is the
    identity on a frozen backbone. Uses ``heads`` heads where they divide the channels, else one.
    """

    features: int
    heads: int = 8
    reduction: int = 1

    @nn.compact
    def __call__(self, y: jax.Array, train: bool = False) -> jax.Array:
        inner = max(1, self.features // self.reduction)
        heads = self.heads if inner % (2 * self.heads) == 0 else 1
        z = GSA(inner, heads, name="gsa")(y, train)
        out = dense_2d(
            nn.Dense(self.features, use_bias=False, kernel_init=nn.initializers.zeros, name="out"),
            z,
        )
        return y + out.astype(y.dtype)


class GSAConv(nn.Module):
    """A GSA module standing in for a convolution (GSA-ResNet, the GSA toy CNN): (B, H, W, C_in)
    -> (B, H // stride, W // stride, features), then ``activation``.

    A strided convolution's downsampling becomes ``stride`` x ``stride`` average pooling after
    the module (our choice; the paper's summary in shared/papers does not say).
    """

    features: int
    heads: int = 8
    stride: int = 1
    activation: str = "none"  # 'relu' where the replaced layer had one built in (toy ConvReLU)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        heads = self.heads if self.features % (2 * self.heads) == 0 else 1
        y = GSA(self.features, heads, name="gsa")(x, train)
        if self.stride > 1:
            y = nn.avg_pool(y, (self.stride, self.stride), (self.stride, self.stride))
        if self.activation == "relu":
            return nn.relu(y)
        if self.activation != "none":
            raise ValueError(
                f"GSAConv activation must be 'relu' or 'none', got {self.activation!r}"
            )
        return y
