"""GALA, global-and-local attention (Linsley et al. 2019), and SE, its global-only special case.

For a feature map X (B, H, W, C):
  global  s_g = W2 relu(W1 GAP(X))                  (B, C)        as in an SE block
  local   s_l = conv1x1(relu(conv1x1(X)))           (B, H, W, 1)  a one-channel spatial map
  mix     s = squash(a * (s_g + s_l) + m * (s_g * s_l)),  a, m in R^C (per channel)
  output  Y = s * X
``squash='tanh'`` is the paper's formula; ``'sigmoid'`` is the authors' public code's default.
The local map has one channel, as in the authors' code (broadcast over the channels).

``gate='residual'`` (ours, for add-ons to a trained backbone): Y = (1 + gamma * s) * X with a
per-channel gamma initialised to 0, so the untrained module is the identity, as GAttANet's
(1 + alpha * agreement) with alpha = 0 is. The paper's Y = s * X ('direct') rescales every map
at init (tanh(0) = 0, sigmoid(0) = 1/2) and wrecks a frozen backbone before any training.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

SQUASH = {"tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid}
GATES = ("direct", "residual")


def apply_gate(module: nn.Module, gate: str, s: jax.Array, x: jax.Array) -> jax.Array:
    """s * x ('direct'), or (1 + gamma * s) * x with gamma (C,) from zero ('residual')."""
    if gate == "direct":
        return s * x
    if gate != "residual":
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    gamma = module.param("gamma", nn.initializers.zeros_init(), (x.shape[-1],))
    return (1 + gamma * s) * x


class _GlobalPath(nn.Module):
    """W2 relu(W1 GAP(X)): one value per channel."""

    reduction: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        hidden = max(1, c // self.reduction)
        z = jnp.mean(x, axis=(1, 2))
        z = nn.relu(nn.Dense(hidden, name="fc1")(z))
        return nn.Dense(c, name="fc2")(z)


class GALA(nn.Module):
    """Global-and-local attention on a (B, H, W, C) map.

    Attributes:
      reduction: hidden width of both paths is C // reduction.
      squash: 'tanh' (the paper) or 'sigmoid' (the authors' code).
      use_local: False drops the local path (s_l = 0): with squash 'sigmoid' and a = 1 this is
        an SE block.
      gate: 'direct' (Y = s * X, the paper) or 'residual' (Y = (1 + gamma * s) * X, identity at
        init).
    """

    reduction: int = 4
    squash: str = "tanh"
    use_local: bool = True
    gate: str = "direct"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.squash not in SQUASH:
            raise ValueError(f"GALA squash must be one of {sorted(SQUASH)}, got {self.squash!r}")
        c = x.shape[-1]
        s_g = _GlobalPath(self.reduction, name="global")(x)[:, None, None, :]
        if self.use_local:
            hidden = max(1, c // self.reduction)
            # 1x1 convolutions, written as dense layers over the channel axis (the same map;
            # XLA compiles these several times faster on CPU)
            h = nn.relu(nn.Dense(hidden, name="local1")(x))
            s_l = nn.Dense(1, name="local2")(h)
        else:
            s_l = jnp.zeros_like(x[..., :1])
        a = self.param("a", nn.initializers.ones_init(), (c,))
        m = self.param("m", nn.initializers.zeros_init(), (c,))
        # a (s_g + s_l) + m (s_g s_l) = a s_g + (a + m s_g) s_l: the per-channel factors are
        # formed on (B, C) first, so the (B, H, W, C) map costs one multiply-add (and its
        # gradient one reduction each), not five broadcast operations.
        s = SQUASH[self.squash](a * s_g + (a + m * s_g) * s_l)
        return apply_gate(self, self.gate, s, x)


class SqueezeExcitation(nn.Module):
    """SE block (Hu et al. 2018): Y = sigmoid(W2 relu(W1 GAP(X))) * X; ``gate`` as in GALA."""

    reduction: int = 4
    gate: str = "direct"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = jax.nn.sigmoid(_GlobalPath(self.reduction, name="global")(x))[:, None, None]
        return apply_gate(self, self.gate, s, x)
